"""The library internals kim_plugins.mmseg.compat relies on are still there, as checked.

One check per entry of the :mod:`kim_plugins.mmseg.compat` docstring. Each
failure names the entry to re-check. With the checked versions installed all
pass; with another version of mmengine / mmseg / mmcv the version test fails
loudly, unless every entry's check still holds (then it only warns: re-check
and update ``CHECKED_VERSIONS``).
"""
import importlib.metadata
import inspect
import warnings

import pytest

pytest.importorskip("mmseg")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from kim_plugins.mmseg import compat  # noqa: E402


def _source(fn) -> str:
    return inspect.getsource(inspect.unwrap(fn))


def _params(fn):
    return list(inspect.signature(inspect.unwrap(fn)).parameters)


def _local_checkpoint_loader():
    from mmengine.runner.checkpoint import CheckpointLoader

    loader = inspect.unwrap(CheckpointLoader._schemes[""])
    assert loader.__name__ == "load_from_local", f"the '' scheme is {loader!r}, not load_from_local"
    assert _params(loader) == ["filename", "map_location"], _params(loader)
    assert {"prefixes", "loader", "force"} <= set(_params(CheckpointLoader.register_scheme))
    assert compat.is_local_checkpoint("/tmp/some.pth") and compat.is_local_checkpoint("rel/some.pth")
    assert not compat.is_local_checkpoint("https://host/some.pth")
    assert not compat.is_local_checkpoint("open-mmlab://resnet50")
    assert not compat.is_local_checkpoint(None)


def _runner_resume():
    from mmengine.runner import Runner

    assert _params(Runner.resume)[:2] == ["self", "filename"], _params(Runner.resume)
    assert "self.load_checkpoint(" in _source(Runner.resume)  # loads through CheckpointLoader
    load_or_resume = _source(Runner.load_or_resume)
    assert "self.resume(" in load_or_resume and "self.load_checkpoint(self._load_from)" in load_or_resume


def _runner_register_hooks():
    from mmengine.logging import HistoryBuffer
    from mmengine.runner import Runner

    assert _params(Runner.register_hooks) == ["self", "default_hooks", "custom_hooks"], \
        _params(Runner.register_hooks)
    assert _params(HistoryBuffer.__init__)[:4] == ["self", "log_history", "count_history", "max_length"]
    buffer = HistoryBuffer(np.array([1.5, 2.0]), np.array([1, 2]), 7)
    log, count = compat.history_buffer_arrays(buffer)
    assert isinstance(log, np.ndarray) and isinstance(count, np.ndarray) and buffer.max_length == 7
    assert log.tolist() == [1.5, 2.0] and count.tolist() == [1, 2]


def _segmentor_test_step():
    import mmseg.apis.inference as inference
    from mmengine.runner.loops import TestLoop, ValLoop
    from mmseg.models.segmentors import BaseSegmentor

    assert _params(BaseSegmentor.test_step) == ["self", "data"], _params(BaseSegmentor.test_step)
    assert ".test_step(" in _source(TestLoop.run_iter) and ".val_step(" in _source(ValLoop.run_iter)
    assert ".test_step(" in _source(inference.inference_model)


def _flop_tables():
    from mmengine.analysis import FlopAnalyzer, complexity_analysis as ca
    from mmengine.analysis.jit_handles import generic_activation_jit, get_shape

    assert isinstance(ca._DEFAULT_SUPPORTED_FLOP_OPS, dict) and isinstance(ca._DEFAULT_SUPPORTED_ACT_OPS, dict)
    init = _source(FlopAnalyzer.__init__)
    assert "_DEFAULT_SUPPORTED_FLOP_OPS" in init, "FlopAnalyzer no longer reads the module's default table"
    assert callable(get_shape) and callable(generic_activation_jit())
    from kim_plugins.mmseg.complexity import SDPA_OP, sdpa_flop_jit
    assert ca._DEFAULT_SUPPORTED_FLOP_OPS[SDPA_OP] is sdpa_flop_jit


def _launcher_environment():
    from mmengine.dist import utils
    from mmengine.runner import Runner

    slurm = _source(utils._init_dist_slurm)
    for needle in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_NODELIST", "SLURM_LOCALID", "scontrol show hostname",
                   "'29500'", "'MASTER_ADDR' not in os.environ", "os.environ['WORLD_SIZE']",
                   "os.environ['LOCAL_RANK']", "os.environ['RANK']"):
        assert needle in slurm, f"_init_dist_slurm no longer has {needle!r}"
    mpi = _source(utils._init_dist_mpi)
    for needle in ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "'29500'",
                   "The environment variable MASTER_ADDR is not set"):
        assert needle in mpi, f"_init_dist_mpi no longer has {needle!r}"
    assert "torch.cuda.set_device" in slurm + mpi, "mmengine no longer selects a CUDA device: is the fix needed?"
    assert "device_ids=[int(os.environ['LOCAL_RANK'])]" in _source(Runner.wrap_model)


def _runner_device():
    import mmengine.device.utils as du
    from mmengine.device import get_device

    before = du.DEVICE
    assert isinstance(before, str) and get_device() == before
    for device, expected in (("cpu", "cpu"), ("cuda:1", "cuda")):
        with compat.runner_device(device):
            assert du.DEVICE == expected and get_device() == expected
        assert du.DEVICE == before
    with pytest.raises(KeyError), compat.runner_device("cpu"):
        raise KeyError("restored on errors too")
    assert du.DEVICE == before


def _infinite_sampler():
    from mmengine.dataset import InfiniteSampler

    assert "yield from self.indices" in _source(InfiniteSampler.__iter__)  # one generator: no restart
    sampler = InfiniteSampler(range(5), shuffle=True, seed=3)
    sampler.rank, sampler.world_size = 1, 2
    g = torch.Generator().manual_seed(3)
    stream = sum((torch.randperm(5, generator=g).tolist() for _ in range(3)), [])
    for _ in range(2):  # a fresh pass each time
        indices = compat.infinite_sampler_indices(sampler)
        assert [next(indices) for _ in range(6)] == stream[1::2][:6]


ENTRIES = {
    "1. local checkpoint loader (resume.py)": _local_checkpoint_loader,
    "2. Runner.resume (resume.py)": _runner_resume,
    "3. Runner.register_hooks + HistoryBuffer (weights_only.py)": _runner_register_hooks,
    "4. BaseSegmentor.test_step (se_inference.py)": _segmentor_test_step,
    "5. FLOP / activation op tables (complexity.py)": _flop_tables,
    "6. launcher environment + wrap_model device_ids (distributed.py)": _launcher_environment,
    "7. mmengine.device.utils.DEVICE (runner_device, suite)": _runner_device,
    "8. InfiniteSampler._indices_of_rank (se_hook.py)": _infinite_sampler,
}


def _failure(check):
    try:
        check()
    except AssertionError as err:
        return str(err) or "assertion failed"
    except (AttributeError, TypeError, ValueError, KeyError, OSError, ImportError) as err:
        return f"{type(err).__name__}: {err}"
    return None


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_compat_entry_still_holds(entry):
    problem = _failure(ENTRIES[entry])
    assert problem is None, (f"kim_plugins.mmseg.compat entry {entry} no longer matches the installed libraries "
                             f"({_installed()}; checked against {compat.CHECKED_VERSIONS}): {problem}. "
                             f"Re-check that patch in kim_plugins/mmseg/compat.py.")


def _installed():
    return {"mmengine": importlib.metadata.version("mmengine"),
            "mmseg": importlib.metadata.version("mmsegmentation"),
            "mmcv": importlib.metadata.version("mmcv")}


def test_installed_versions_are_the_checked_ones_or_every_entry_still_holds():
    installed = _installed()
    differ = {k: v for k, v in installed.items() if v != compat.CHECKED_VERSIONS[k]}
    if not differ:
        return
    broken = {entry: problem for entry, check in ENTRIES.items() if (problem := _failure(check)) is not None}
    assert not broken, (f"installed {differ} differ from the versions kim_plugins.mmseg.compat was checked against "
                        f"({compat.CHECKED_VERSIONS}), and these patches depend on what changed; re-check each: "
                        + "; ".join(f"[{entry}] {problem}" for entry, problem in broken.items()))
    warnings.warn(f"installed {differ} differ from kim_plugins.mmseg.compat.CHECKED_VERSIONS "
                  f"{compat.CHECKED_VERSIONS}; every dependency check holds: re-check the entries and update "
                  f"CHECKED_VERSIONS", stacklevel=1)


def test_feature_modules_reach_the_libraries_through_compat():
    """The patches are applied where the compat docstring says (the feature modules import it)."""
    from mmengine.runner import Runner
    from mmengine.runner.checkpoint import CheckpointLoader
    from mmseg.models.segmentors import BaseSegmentor

    assert getattr(CheckpointLoader._schemes[""], "_kim_plugins_resume_fix", False)
    assert getattr(Runner.resume, "_kim_plugins_resume_fix", False)
    assert Runner.register_hooks.__wrapped__ is not None and BaseSegmentor.test_step.__wrapped__ is not None
    for name in ("resume", "weights_only", "se_inference", "complexity", "distributed", "se_hook"):
        module = importlib.import_module(f"kim_plugins.mmseg.{name}")
        assert "from .compat import" in inspect.getsource(module), name
