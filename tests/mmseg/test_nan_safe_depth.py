"""NaN-safe depth in mmseg: StableSiLogLoss vs SiLogLoss, the log-space head, the non-finite-loss hook, the config pair."""
import os
import types
import warnings

import pytest
import torch

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "nan_safe_depth")


@pytest.fixture(scope="module")
def registry():
    import kim_plugins.mmseg  # noqa: F401
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    init_default_scope("mmseg")
    return MODELS


def _depth_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(4, 1, 12, 16, generator=g) * 9 + 0.5
    target[torch.rand(4, 1, 12, 16, generator=g) < 0.3] = 0.0
    pred = target.clamp(min=0.5) * torch.exp(0.3 * torch.randn(4, 1, 12, 16, generator=g))
    return pred, target


@pytest.mark.parametrize("reduction", ["mean", "none", "sum"])
def test_plain_mode_equals_mmseg_silogloss(registry, reduction):
    pred, target = _depth_batch()
    weight = torch.tensor([1.0, 0.5, 2.0, 1.0])
    ours = registry.build(dict(type="StableSiLogLoss", sqrt_mode="plain", reduction=reduction))
    theirs = registry.build(dict(type="SiLogLoss", reduction=reduction))
    assert ours.loss_name == theirs.loss_name == "loss_silog"
    assert torch.allclose(ours(pred, target), theirs(pred, target), rtol=1e-6, atol=1e-7)
    assert torch.allclose(ours(pred, target, weight=weight), theirs(pred, target, weight=weight), rtol=1e-6)


def test_mmseg_silogloss_gives_nan_gradients_where_the_stable_loss_does_not(registry):
    _, target = _depth_batch()
    target[0] = 0.0                                  # a crop with no valid pixel (mmseg: gradient 0, no nan)
    target[1, 0, 2:, :] = 0.0
    target[1, 0, :2, :] = 3.0                        # pred == target on every valid pixel: sqrt'(0) = inf
    results = {}
    for cfg in (dict(type="SiLogLoss"), dict(type="StableSiLogLoss")):
        pred = target.clone().clamp(min=0.5)
        pred[2:] *= 1.3
        pred.requires_grad_(True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")          # the stable loss warns about the empty crop
            registry.build(cfg)(pred, target).backward()
        results[cfg["type"]] = pred.grad
    assert torch.isnan(results["SiLogLoss"][1]).any() and torch.isfinite(results["SiLogLoss"][[0, 2, 3]]).all()
    assert torch.isfinite(results["StableSiLogLoss"]).all()


def _tiny_head(registry, type_, **kw):
    cfg = dict(type=type_, in_channels=(16, 16, 32, 32), embed_dim=2, feature_dim=16, num_deconv_layers=1,
               num_deconv_filters=(8,), max_depth=10.0, **kw)
    return registry.build(cfg)


def _features(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 16, 16, 16, generator=g), torch.randn(2, 16, 8, 8, generator=g),
            torch.randn(2, 32, 4, 4, generator=g), torch.randn(2, 32, 2, 2, generator=g)]


def test_log_space_head_predicts_the_same_depth_as_vpd_head(registry):
    torch.manual_seed(0)
    plain = _tiny_head(registry, "VPDDepthHead").eval()
    ours = _tiny_head(registry, "StableVPDDepthHead").eval()
    ours.load_state_dict(plain.state_dict())          # no new parameter
    metas = [dict(img_shape=(20, 24), pad_shape=(20, 24))] * 2
    x = _features()
    a = plain.predict(x, metas, None)
    b = ours.predict(x, metas, None)
    assert a.shape == b.shape == (2, 1, 20, 24)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_saturated_pixels_keep_their_gradient_only_in_log_space(registry):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    samples = []
    for _ in range(2):
        s = SegDataSample()
        s.gt_depth_map = PixelData(data=torch.full((1, 16, 16), 2.0))
        samples.append(s)
    grads = {}
    for type_, extra in (("VPDDepthHead", {}), ("StableVPDDepthHead", dict(loss_decode=dict(type="StableSiLogLoss")))):
        torch.manual_seed(0)
        head = _tiny_head(registry, type_, **extra).train()
        with torch.no_grad():
            head.depth_pred_layer[-1].bias.fill_(-50.0)     # sigmoid(-50) * 10 = 2e-21 < eps: saturated
        losses = head.loss(_features(), samples, None)
        sum(losses.values()).backward()
        grads[type_] = head.depth_pred_layer[-1].bias.grad.item()
    assert grads["VPDDepthHead"] == 0.0                     # stuck: log(clamp(.)) passes no gradient
    assert grads["StableVPDDepthHead"] < -0.5               # log-sigmoid: pushes the depth up


def test_log_space_head_rejects_a_loss_that_takes_depth(registry):
    with pytest.raises(ValueError, match="StableSiLogLoss"):
        _tiny_head(registry, "StableVPDDepthHead", loss_decode=dict(type="SiLogLoss"))


def test_non_finite_loss_hook_stops_and_reports(registry):
    from mmengine.structures import PixelData
    from mmseg.registry import HOOKS
    from mmseg.structures import SegDataSample

    hook = HOOKS.build(dict(type="NonFiniteLossHook"))
    loss = registry.build(dict(type="StableSiLogLoss"))
    loss.last_num_valid = torch.tensor([5.0, 1.0])
    model = torch.nn.Module()
    model.loss = loss
    logged = []
    runner = types.SimpleNamespace(iter=7, model=model, logger=types.SimpleNamespace(error=logged.append))
    samples = []
    for n_valid in (5, 1):
        s = SegDataSample()
        d = torch.zeros(1, 4, 4)
        d.view(-1)[:n_valid] = 1.5
        s.gt_depth_map = PixelData(data=d)
        samples.append(s)
    hook.after_train_iter(runner, 3, dict(data_samples=samples), dict(loss=torch.tensor(1.0), loss_silog=0.5))
    with pytest.raises(RuntimeError) as err:
        hook.after_train_iter(runner, 3, dict(data_samples=samples),
                              dict(loss=torch.tensor(float("nan")), loss_silog=torch.tensor(float("inf")),
                                   acc=float("nan")))
    msg = str(err.value)
    assert "iteration 8" in msg and "loss=nan" in msg and "loss_silog=inf" in msg and "acc" not in msg
    assert "[5, 1]" in msg and "[5.0, 1.0]" in msg
    assert logged and logged[0] in msg


def test_config_pair_trains_and_evaluates_on_the_nyu_fixture(fixture_root, tmp_path):
    from kim_plugins.dry_run.tiny import run_tiny, tiny_config

    cfg = tiny_config(os.path.join(CONFIGS, "vpdhead-nansafe_r50_4xb8-25k_nyu-480x480.py"),
                      os.path.join(fixture_root, "nyu"), str(tmp_path), crop_size=(32, 32), max_iters=1,
                      device="cpu")
    assert cfg.model.decode_head.type == "StableVPDDepthHead"
    assert any(h["type"] == "NonFiniteLossHook" for h in cfg.custom_hooks)
    metrics = run_tiny(cfg)
    assert {"rmse", "abs_rel", "log10"} <= set(metrics), metrics
    assert all(torch.isfinite(torch.tensor(float(v))) for v in metrics.values())
