"""NaN-safe SILog loss and log-space depth (METHODS.md §7, NaN divergence in depth estimation)."""
import math

import pytest
import torch

from kim_plugins.layers.nan_safe_depth import (StableSiLogLoss, log_depth_from_logits, silog_variance,
                                               stable_silog_loss)


def _mmseg_formula(pred, target, eps=1e-6):
    """mmseg 1.2.2 ``silog_loss`` written out (one-pass moments, plain sqrt), reduction='none'."""
    pred, target = pred.flatten(1), target.flatten(1)
    diff = torch.log(target.clamp(min=eps)) - torch.log(pred.clamp(min=eps))
    valid = (target > eps) & ~torch.isnan(diff)
    diff = diff.masked_fill(~valid, 0.0)
    v = valid.to(diff.dtype)
    sq = (diff.pow(2) * v).sum(1) / v.sum(1).clamp(min=eps)
    m = (diff * v).sum(1) / v.sum(1).clamp(min=eps)
    return torch.sqrt(sq - 0.5 * m.pow(2))


def _batch(n=3, h=7, w=9, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(n, 1, h, w, generator=g, dtype=dtype) * 9 + 0.5
    target[torch.rand(n, 1, h, w, generator=g) < 0.3] = 0.0  # sparse invalid pixels
    pred = target.clamp(min=0.5) * torch.exp(0.3 * torch.randn(n, 1, h, w, generator=g, dtype=dtype))
    return pred, target


def test_plain_mode_equals_the_mmseg_formula():
    pred, target = _batch()
    loss, counts = stable_silog_loss(pred, target, sqrt_mode="plain", reduction="none")
    assert torch.allclose(loss, _mmseg_formula(pred, target), rtol=1e-12, atol=0)
    assert counts.tolist() == (target.flatten(1) > 1e-6).sum(1).tolist()


def test_modes_against_the_closed_form_of_a_constant_log_error():
    # d = c on every valid pixel: E[d^2] - 0.5 E[d]^2 = 0.5 c^2 exactly
    target = torch.full((2, 1, 4, 4), 3.0, dtype=torch.float64)
    c = 0.25
    pred = target * math.exp(-c)
    d = 0.5 * c * c
    for mode, expected in (("none", d), ("plain", math.sqrt(d)), ("eps", math.sqrt(d + 1e-6))):
        loss, _ = stable_silog_loss(pred, target, sqrt_mode=mode)
        assert abs(loss.item() - expected) < 1e-12, mode


def test_two_pass_form_is_nonnegative_where_one_pass_float32_goes_negative():
    g = torch.Generator().manual_seed(0)
    d = 8.0 + 1e-4 * torch.randn(64, 4096, generator=g)          # large mean, tiny spread, lambda = 1
    target = torch.ones_like(d)
    pred = torch.exp(-d)
    one_pass = d.pow(2).mean(1) - d.mean(1).pow(2)
    assert (one_pass < 0).any()                                    # the vulnerability, in float32
    value, _ = silog_variance(pred, target, variance_focus=1.0)
    assert (value >= 0).all()
    exact = d.double().var(1, unbiased=False)
    assert torch.allclose(value.double(), exact, rtol=0.05, atol=1e-9)


@pytest.mark.parametrize("mode", ["eps", "none"])
def test_pred_equal_target_has_finite_gradients(mode):
    _, target = _batch()
    pred = target.clone().clamp(min=0.5).requires_grad_(True)
    target = pred.detach().clone()
    loss, _ = stable_silog_loss(pred, target, sqrt_mode=mode)
    loss.backward()
    assert torch.isfinite(pred.grad).all()
    assert loss.item() == pytest.approx(math.sqrt(1e-6) if mode == "eps" else 0.0, abs=1e-12)


def test_plain_sqrt_at_pred_equal_target_is_the_nan_the_paper_describes():
    target = torch.full((1, 1, 3, 3), 2.0)
    pred = target.clone().requires_grad_(True)
    loss, _ = stable_silog_loss(pred, target, sqrt_mode="plain")
    loss.backward()
    assert torch.isnan(pred.grad).all()


def test_guarded_sqrt_gradient_matches_its_bound_where_plain_sqrt_explodes():
    # two pixels with log errors d = +-1e-9: m = 0, D = 1e-18. dL/dpred_i = dL/dD * (2 d_i / n) * (-1 / pred_i)
    target = torch.full((1, 1, 1, 2), 2.0, dtype=torch.float64)
    d = torch.tensor([1e-9, -1e-9], dtype=torch.float64)
    grads = {}
    for mode in ("eps", "plain"):
        pred = (target * torch.exp(-d).view(1, 1, 1, 2)).requires_grad_(True)
        stable_silog_loss(pred, target, sqrt_mode=mode)[0].backward()
        grads[mode] = pred.grad.flatten()
    pred = (target * torch.exp(-d)).flatten()
    dl_dd = {"eps": 1 / (2 * math.sqrt(1e-18 + 1e-6)), "plain": 1 / (2 * math.sqrt(1e-18))}
    for mode in grads:
        expected = dl_dd[mode] * d * (-1 / pred)
        assert torch.allclose(grads[mode], expected, rtol=1e-6), mode
    assert grads["eps"].abs().max() < 3e-7 and grads["plain"].abs().max() > 0.2   # bounded vs 1e6 times larger


@pytest.mark.parametrize("num_valid", [0, 1])
def test_samples_with_fewer_than_two_valid_pixels_contribute_zero_and_are_counted(num_valid):
    pred, target = _batch(n=2, dtype=torch.float32)
    target[1] = 0.0
    if num_valid:
        target[1, 0, 3, 3] = 4.0
    pred.requires_grad_(True)
    criterion = StableSiLogLoss(reduction="none", sqrt_mode="plain")
    with pytest.warns(UserWarning, match="fewer than 2 valid"):
        loss = criterion(pred, target)
    loss.sum().backward()
    assert loss[1].item() == 0.0 and loss[0].item() > 0
    assert torch.isfinite(pred.grad).all() and (pred.grad[1] == 0).all()
    assert criterion.skipped_samples == 1 and criterion.last_num_valid[1].item() == num_valid


def test_depths_below_eps_give_finite_gradients():
    pred, target = _batch(dtype=torch.float32)
    pred = pred.clone()
    pred[:, :, :3] = 1e-9          # predicted depth below eps: clamped, zero gradient, finite
    target[:, :, -2:] = 1e-8       # ground truth below eps: invalid pixels
    pred.requires_grad_(True)
    loss = StableSiLogLoss()(pred, target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pred.grad).all()
    assert (pred.grad[:, :, -2:] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_computed_in_float32(dtype):
    pred, target = _batch(dtype=torch.float32)
    ref = StableSiLogLoss()(pred, target)
    p = pred.to(dtype).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = StableSiLogLoss()(p, target.to(dtype))
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(p.grad.float()).all()
    assert abs(loss.item() - ref.item()) < 0.02 * ref.item()


def test_log_sigmoid_gradient_at_minus_50_is_one_where_log_of_sigmoid_is_zero():
    x = torch.tensor([-50.0, 0.0, 50.0], requires_grad=True)
    log_depth_from_logits(x, 10.0).sum().backward()
    assert torch.allclose(x.grad, torch.tensor([1.0, 0.5, 0.0]), atol=1e-6)
    y = x.detach().clone().requires_grad_(True)
    torch.log((torch.sigmoid(y) * 10.0).clamp(min=1e-6)).sum().backward()   # what SiLogLoss sees
    assert y.grad[0].item() == 0.0
    assert torch.allclose(log_depth_from_logits(torch.tensor([0.3]), 10.0), torch.log(torch.sigmoid(torch.tensor([0.3])) * 10))


def test_log_input_gives_the_same_loss_as_depth_input():
    pred, target = _batch()
    a, _ = stable_silog_loss(pred, target)
    b, _ = stable_silog_loss(torch.log(pred), target, pred_is_log=True)
    assert torch.allclose(a, b, rtol=1e-12)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="sqrt_mode"):
        StableSiLogLoss(sqrt_mode="soft")
    with pytest.raises(ValueError, match="variance_focus"):
        StableSiLogLoss(variance_focus=1.5)
    with pytest.raises(ValueError, match="min_valid_pixels"):
        StableSiLogLoss(min_valid_pixels=0)
    with pytest.raises(ValueError, match="same shape"):
        StableSiLogLoss()(torch.ones(2, 1, 3, 3), torch.ones(2, 1, 3, 4))
