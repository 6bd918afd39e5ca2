"""A real mmseg segmentor with a stock head trains on CPU through mmengine's Runner."""
import os

import torch

from kim_plugins.dry_run.tiny import run_tiny, tiny_config

SMOKE = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "smoke",
                     "fcn_r18-tiny-d8_1xb2-4i_stare-32x32.py")


def test_stock_fcn_trains_one_iteration_and_evaluates(fixture_root, tmp_path):
    from mmengine.runner import Runner

    cfg = tiny_config(SMOKE, os.path.join(fixture_root, "stare"), str(tmp_path), crop_size=(32, 32),
                      max_iters=1, device="cpu")
    runner = Runner.from_cfg(cfg)
    before = {k: v.detach().clone() for k, v in runner.model.state_dict().items()}
    runner.train()
    after = runner.model.state_dict()
    changed = [k for k in before if before[k].is_floating_point() and not torch.equal(before[k], after[k])]
    assert any(k.startswith("decode_head.conv_seg") for k in changed)
    assert any(k.startswith("backbone.") for k in changed)
    loss = runner.message_hub.get_scalar("train/loss").current()
    assert torch.isfinite(torch.tensor(loss)) and loss > 0


def test_run_tiny_returns_validation_metrics(fixture_root, tmp_path):
    cfg = tiny_config(SMOKE, os.path.join(fixture_root, "stare"), str(tmp_path), crop_size=(32, 32),
                      max_iters=1, device="cpu")
    metrics = run_tiny(cfg)
    assert set(metrics) >= {"aAcc", "mDice"}
    assert 0.0 <= metrics["aAcc"] <= 100.0
