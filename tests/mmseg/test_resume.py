"""Checkpoint resume on torch >= 2.6 (kim_plugins.mmseg.resume) and safe loading everywhere else."""
import os
import pickle

import pytest
import torch

import kim_plugins.mmseg  # noqa: F401  applies the scoped resume fix
from kim_plugins.mmseg.resume import trusted_resume_paths
from kim_plugins.dry_run.tiny import tiny_config

SMOKE = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "smoke",
                     "fcn_r18-tiny-d8_1xb2-4i_stare-32x32.py")


def _cfg(fixture_root, work_dir, stop_at=None):
    cfg = tiny_config(SMOKE, os.path.join(fixture_root, "stare"), str(work_dir), crop_size=(32, 32),
                      max_iters=4, device="cpu")
    cfg.default_hooks.checkpoint.interval = 2
    if stop_at is not None:
        cfg.train_cfg.max_iters = stop_at  # same 4-iteration LR schedule, stopped early
    return cfg


def _train(cfg, resume=False):
    from mmengine.runner import Runner
    cfg.resume = resume
    runner = Runner.from_cfg(cfg)
    runner.train()
    return runner


def _trusted_load(path):
    return torch.load(path, map_location="cpu", weights_only=False)  # the test's own files


def test_resume_equals_uninterrupted_run_bitwise(fixture_root, tmp_path):
    full = _train(_cfg(fixture_root, tmp_path / "full"))
    _train(_cfg(fixture_root, tmp_path / "split", stop_at=2))
    assert os.path.isfile(tmp_path / "split" / "iter_2.pth")
    resumed = _train(_cfg(fixture_root, tmp_path / "split"), resume=True)
    assert trusted_resume_paths() == frozenset()  # scope ends with the resume call

    a = _trusted_load(tmp_path / "full" / "iter_4.pth")
    b = _trusted_load(tmp_path / "split" / "iter_4.pth")
    assert a["meta"]["iter"] == b["meta"]["iter"] == 4 == resumed.iter
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and len(sa) > 0
    for k in sa:
        for name in sa[k]:
            assert torch.equal(torch.as_tensor(sa[k][name]), torch.as_tensor(sb[k][name])), (k, name)
    lr_a = [g["lr"] for g in a["optimizer"]["param_groups"]]
    lr_b = [g["lr"] for g in b["optimizer"]["param_groups"]]
    assert lr_a == lr_b
    assert [g["lr"] for g in full.optim_wrapper.optimizer.param_groups] == \
        [g["lr"] for g in resumed.optim_wrapper.optimizer.param_groups]
    assert a["param_schedulers"] == b["param_schedulers"]


def test_unpatched_resume_fails_on_an_old_style_checkpoint(fixture_root, tmp_path):
    """The failure the resume scope exists for: mmengine's own format (weights_only_checkpoint hook off)."""
    from mmengine.runner import Runner
    cfg = _cfg(fixture_root, tmp_path / "w", stop_at=2)
    cfg.default_hooks.weights_only_checkpoint = None  # opt out: mmengine's plain checkpoint format
    _train(cfg)
    runner = Runner.from_cfg(_cfg(fixture_root, tmp_path / "w"))
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        Runner.resume.__wrapped__(runner, str(tmp_path / "w" / "iter_2.pth"))
    Runner.resume(runner, str(tmp_path / "w" / "iter_2.pth"))  # the scoped resume unpickles exactly this file
    assert runner.iter == 2


def test_unpatched_resume_reads_our_checkpoints_safely(fixture_root, tmp_path):
    """Checkpoints written with kim_plugins imported need no trust, not even mmengine's unpatched resume."""
    from mmengine.runner import Runner
    _train(_cfg(fixture_root, tmp_path / "w", stop_at=2))
    torch.load(tmp_path / "w" / "iter_2.pth", weights_only=True)
    runner = Runner.from_cfg(_cfg(fixture_root, tmp_path / "w"))
    Runner.resume.__wrapped__(runner, str(tmp_path / "w" / "iter_2.pth"))
    assert runner.iter == 2 and runner.message_hub.get_scalar("train/loss").current() > 0


class _Arbitrary:
    """Any class outside torch's allow-list: safe loading must refuse it."""

    def __reduce__(self):
        return (os.getcwd, ())


def test_load_from_still_refuses_arbitrary_pickles(fixture_root, tmp_path):
    from mmengine.runner import Runner
    bad = tmp_path / "bad.pth"
    torch.save({"state_dict": {}, "payload": _Arbitrary()}, bad)
    cfg = _cfg(fixture_root, tmp_path / "work")
    cfg.load_from = str(bad)
    runner = Runner.from_cfg(cfg)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        runner.load_or_resume()


def test_resume_of_an_arbitrary_pickle_needs_the_resume_call(tmp_path):
    """The trusted scope covers exactly the file passed to Runner.resume, nothing else."""
    from mmengine.runner.checkpoint import CheckpointLoader
    bad = tmp_path / "bad.pth"
    torch.save({"payload": _Arbitrary()}, bad)
    with pytest.raises(pickle.UnpicklingError):
        CheckpointLoader.load_checkpoint(str(bad), map_location="cpu")
