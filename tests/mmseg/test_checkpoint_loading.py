"""Checkpoints written by our runs load safely everywhere users load checkpoints (torch >= 2.6).

mmseg's own ``tools/test.py`` (the one in the wheel), ``mmseg.apis.init_model``, a plain ``torch.load``,
our ``tools/erf.py --checkpoint`` and ``tools/atrous_rates.py --search --checkpoint``; a foreign old-style
runner checkpoint needs ``--trust-checkpoint`` in every tool, and the refusal names it.
"""
import glob
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

import mmseg
from mmengine.logging import HistoryBuffer

import kim_plugins.mmseg  # noqa: F401
from kim_plugins.layers.atrous import resolution_aware_rates
from kim_plugins.mmseg.weights_only import TAG, from_weights_only, to_weights_only

from tests.tools import run_tool

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
MMSEG_TEST_TOOL = os.path.join(os.path.dirname(mmseg.__file__), ".mim", "tools", "test.py")


def _env():
    return dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
                CUDA_VISIBLE_DEVICES="")


@pytest.fixture(scope="module")
def old_style_checkpoint(se_aspp_run, tmp_path_factory):
    """The same checkpoint as mmengine writes it without kim_plugins: HistoryBuffers and numpy scalars pickled."""
    ckpt = torch.load(se_aspp_run.checkpoint, map_location="cpu", weights_only=True)
    path = str(tmp_path_factory.mktemp("old_style") / "iter_2_old_style.pth")
    torch.save(from_weights_only(ckpt), path)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        torch.load(path, weights_only=True)
    return path


def test_to_and_from_weights_only_round_trip_exactly():
    hub = dict(log_scalars={"train/loss": HistoryBuffer([0.25, np.float32(1.5)], [1, 2], max_length=7)},
               runtime_info={"eta": np.float64(1 / 3), "iter": 4, "best": np.int32(7), "arr": np.arange(3.0)})
    sd = torch.nn.BatchNorm2d(2).state_dict()  # an OrderedDict with _metadata: must come back untouched
    ckpt = {"message_hub": hub, "state_dict": sd, "meta": {"dataset_meta": {"classes": ("a", "b")}}}
    unsafe = []
    safe = to_weights_only(ckpt, unsafe=unsafe)
    assert unsafe == [] and safe["state_dict"] is sd and safe["meta"] is ckpt["meta"]
    assert safe["message_hub"]["log_scalars"]["train/loss"][TAG] == "HistoryBuffer"
    buf = __import__("io").BytesIO()
    torch.save(safe, buf)
    buf.seek(0)
    back = from_weights_only(torch.load(buf, weights_only=True))
    hb = back["message_hub"]["log_scalars"]["train/loss"]
    orig = hub["log_scalars"]["train/loss"]
    assert isinstance(hb, HistoryBuffer) and hb.max_length == 7
    assert hb._log_history.dtype == orig._log_history.dtype and np.array_equal(hb._log_history, orig._log_history)
    assert np.array_equal(hb._count_history, orig._count_history)
    info = back["message_hub"]["runtime_info"]
    assert type(info["eta"]) is np.float64 and info["eta"] == np.float64(1 / 3)
    assert type(info["best"]) is np.int32 and info["best"] == 7 and info["iter"] == 4
    assert np.array_equal(info["arr"], np.arange(3.0)) and info["arr"].dtype == np.float64
    assert hasattr(back["state_dict"], "_metadata")
    # anything else that safe loading refuses is kept and reported
    unsafe = []
    to_weights_only({"x": {"odd": object()}}, unsafe=unsafe)
    assert unsafe == ["checkpoint['x']['odd']: builtins.object"]


def test_our_checkpoint_loads_weights_only_in_a_process_without_kim_plugins(se_aspp_run):
    code = ("import sys, torch\n"
            "ck = torch.load(sys.argv[1], map_location='cpu', weights_only=True)\n"
            "assert not any(m.startswith('kim_plugins') or m.startswith('mmengine') for m in sys.modules)\n"
            "print(sorted(ck), len(ck['state_dict']))\n")
    out = subprocess.run([sys.executable, "-c", code, se_aspp_run.checkpoint], capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "'message_hub'" in out.stdout and "'optimizer'" in out.stdout


def test_mmseg_own_test_tool_evaluates_our_checkpoint(se_aspp_run, tmp_path):
    """mmseg's tools/test.py from the wheel, unmodified, on a checkpoint our training wrote."""
    assert os.path.isfile(MMSEG_TEST_TOOL)
    work = str(tmp_path / "mmseg_test")
    out = subprocess.run([sys.executable, MMSEG_TEST_TOOL, se_aspp_run.config, se_aspp_run.checkpoint,
                          "--work-dir", work], capture_output=True, text=True, env=_env(), timeout=600)
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-3000:])
    (result,) = glob.glob(os.path.join(work, "*", "*.json"))
    metrics = json.load(open(result))
    assert {"aAcc", "mDice"} <= set(metrics)
    assert "scale equalizers folded for inference" in out.stdout + out.stderr  # item: folded at test time


def test_init_model_loads_our_checkpoint(se_aspp_run):
    from mmseg.apis import init_model

    model = init_model(se_aspp_run.config, se_aspp_run.checkpoint, device="cpu")
    saved = torch.load(se_aspp_run.checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    state = model.state_dict()
    assert state.keys() == saved.keys()
    for k in saved:
        assert torch.equal(state[k], saved[k]), k
    assert bool(model.decode_head.scale_equalizers["image_pool"].calibrated)


def test_resume_restores_the_message_hub_exactly(se_aspp_run):
    """The safe format changes nothing a resumed run sees: history buffers and numpy values come back as saved."""
    from mmengine.runner import Runner

    from kim_plugins.mmseg.resume import trusted_resume_paths

    cfg = se_aspp_run.cfg.copy()
    cfg.work_dir = os.path.join(se_aspp_run.work_dir, "resumed")
    cfg.experiment_name = "resume_check"
    runner = Runner.from_cfg(cfg)
    runner.resume(se_aspp_run.checkpoint)
    assert trusted_resume_paths() == frozenset()
    for key in ("train/loss", "train/lr"):
        a, b = se_aspp_run.message_hub.log_scalars[key], runner.message_hub.log_scalars[key]
        assert isinstance(b, HistoryBuffer)
        assert a._log_history.dtype == b._log_history.dtype and np.array_equal(a._log_history, b._log_history), key
        assert np.array_equal(a._count_history, b._count_history)
    assert isinstance(runner.message_hub.get_info("eta"), np.floating)
    assert runner.iter == 2


def test_old_style_checkpoint_needs_trust_in_every_tool_and_the_error_names_it(se_aspp_run, old_style_checkpoint,
                                                                               tmp_path):
    from mmengine.runner.checkpoint import CheckpointLoader
    from mmseg.apis import init_model

    # the Python API: the refusal names both ways to trust the file
    with pytest.raises(pickle.UnpicklingError, match="--trust-checkpoint.*trust_local_checkpoint"):
        init_model(se_aspp_run.config, old_style_checkpoint, device="cpu")
    with pytest.raises(pickle.UnpicklingError, match="--trust-checkpoint"):
        CheckpointLoader.load_checkpoint(old_style_checkpoint, map_location="cpu")

    erf_args = [se_aspp_run.config, "--checkpoint", old_style_checkpoint, "--num-images", "1", "--size", "64",
                "--out-dir", str(tmp_path / "erf")]
    search_args = [se_aspp_run.config, "--search", "--checkpoint", old_style_checkpoint, "--r-max", "3", "3",
                   "--grid", "1", "--num-images", "1", "--out-dir", str(tmp_path / "search")]
    test_args = [se_aspp_run.config, old_style_checkpoint, "--work-dir", str(tmp_path / "test")]
    bench_args = [se_aspp_run.config, "--checkpoint", old_style_checkpoint, "--rounds", "3", "--warmup", "0",
                  "--shape", "64", "--folded-only"]
    for tool, args in (("erf", erf_args), ("atrous_rates", search_args), ("test", test_args),
                       ("benchmark", bench_args)):
        with pytest.raises(pickle.UnpicklingError, match="--trust-checkpoint"):
            run_tool(tool, args)
    # with the flag each loads it
    out = run_tool("erf", erf_args + ["--trust-checkpoint"])
    assert json.load(open(out["json"]))["weights"] == f"checkpoint {old_style_checkpoint}"
    out = run_tool("atrous_rates", search_args + ["--trust-checkpoint"])
    assert out["search"]["weights"] == f"checkpoint {old_style_checkpoint}"


def test_erf_and_atrous_rates_tools_read_our_checkpoint_without_trust(se_aspp_run, tmp_path):
    out = run_tool("erf", [se_aspp_run.config, "--checkpoint", se_aspp_run.checkpoint, "--num-images", "1",
                           "--size", "64", "--out-dir", str(tmp_path / "erf")])
    nums = json.load(open(out["json"]))
    assert nums["weights"] == f"checkpoint {se_aspp_run.checkpoint}" and nums["num_images"] == 1
    out = run_tool("atrous_rates", [se_aspp_run.config, "--search", "--checkpoint", se_aspp_run.checkpoint,
                                    "--r-max", "3", "3", "--grid", "1", "--num-images", "1",
                                    "--out-dir", str(tmp_path / "search")])
    s = out["search"]
    assert s["weights"] == f"checkpoint {se_aspp_run.checkpoint}"
    assert s["rule_rates_full"] == list(resolution_aware_rates((64, 64), 8, num_rates=3))
    assert [d["r_max"] for d in s["results"]] == [3]
