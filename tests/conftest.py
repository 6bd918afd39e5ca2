"""Shared pytest fixtures: the dataset fixtures in every mmseg layout, written once per session."""
import os

# One intra-op thread per process: the suite runs tiny models (where threading buys
# little), and subprocess tests (torchrun with 2 ranks) would otherwise oversubscribe
# 2 cores, where OpenMP's spin-waiting makes a forward pass tens of times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from kim_plugins.dry_run.dataset_fixtures import FIXTURES, make_all_fixtures  # noqa: E402

torch.set_num_threads(1)

# Keep runs reproducible and quiet; nothing may reach the network in tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """Every test starts on one intra-op thread, even after a tool run in-process set ``--threads``."""
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def fixture_root(tmp_path_factory) -> str:
    """Folder holding every dataset fixture: ``<root>/<name>`` for each of FIXTURES."""
    root = str(tmp_path_factory.mktemp("dataset_fixtures"))
    make_all_fixtures(root)
    return root


@pytest.fixture(scope="session", params=sorted(FIXTURES))
def dataset_fixture(request, fixture_root):
    """(name, data_root) for each dataset fixture."""
    return request.param, os.path.join(fixture_root, request.param)


@pytest.fixture
def current_log_messages(request):
    """Messages logged to mmengine's current logger (``print_log(..., logger='current')``) during the test."""
    import logging

    from mmengine.logging import MMLogger

    logger = MMLogger.get_instance(f"test_log_{request.node.name}")  # the newest instance is the current one
    messages = []

    class Catch(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = Catch()
    logger.addHandler(handler)
    yield messages
    logger.removeHandler(handler)
