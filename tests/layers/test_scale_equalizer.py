"""Tests of the scale equalizer layer, calibration and folding (arXiv 2402.01149, METHODS.md §1)."""
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kim_plugins.layers.scale_equalizer import (BorderCorrectedConv2d, ScaleEqualizer,
                                                bilinear_upsampling_variance_ratio,
                                                calibrate_scale_equalizers, fold_input_affine,
                                                merge_moments)

EPS = 1e-5


# ---------------------------------------------------------------------------------------------------------
# The problem: bilinear upsampling shrinks the variance
# ---------------------------------------------------------------------------------------------------------

def test_analytic_variance_ratios():
    assert bilinear_upsampling_variance_ratio(1) == 1.0
    assert bilinear_upsampling_variance_ratio(2) == 0.390625          # (0.75^2 + 0.25^2)^2
    assert bilinear_upsampling_variance_ratio(4) == 0.4306640625      # ((0.78125 + 0.53125) / 2)^2
    assert abs(bilinear_upsampling_variance_ratio(512) - 4 / 9) < 1e-5  # (integral of (1-f)^2 + f^2)^2
    with pytest.raises(ValueError, match="factor"):
        bilinear_upsampling_variance_ratio(0)


@pytest.mark.parametrize("factor, expected", [(2, 0.3906), (4, 0.4307)])
def test_measured_variance_ratio_matches_analytic(factor, expected):
    # i.i.d. N(0, 1) input, 384x384 -> the ratio's sampling error is ~0.3 % (stated tolerance: 0.005
    # absolute, about 4 standard errors); borders (clamped source indices) are excluded.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 384, 384, generator=g, dtype=torch.float64)
    y = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
    b = 2 * factor
    ratio = y[..., b:-b, b:-b].var().item() / x.var().item()
    assert abs(ratio - expected) < 0.005
    assert abs(bilinear_upsampling_variance_ratio(factor) - expected) < 1e-4


# ---------------------------------------------------------------------------------------------------------
# A toy decoder with a dependency chain: se1 -> se2, se3 independent, BN + dropout before them
# ---------------------------------------------------------------------------------------------------------

class Toy(nn.Module):
    def __init__(self, mode: str = "dataset", rng_in_forward: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.se1, self.se2, self.se3 = (ScaleEqualizer(mode) for _ in range(3))
        self.fuse = nn.Conv2d(8, 4, 3, padding=1)
        self.rng_in_forward = rng_in_forward

    def forward(self, x):
        if self.rng_in_forward:  # a forward that draws from every global RNG
            torch.rand(1), np.random.rand(), random.random()
        a = self.drop(self.bn(self.conv(x)))
        up = self.se1(F.interpolate(F.avg_pool2d(a, 2), size=a.shape[-2:], mode="bilinear"))
        b = self.se2(F.interpolate(F.avg_pool2d(up, 2), size=a.shape[-2:], mode="bilinear"))
        c = self.se3(3 * a + 1)
        return self.fuse(torch.cat([b, c], 1))


def _batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 9, 11, generator=g) for _ in range(n)]


def _se_outputs(model, batches):
    """Every equalizer's output over ``batches`` (flattened, float64), model in train mode, dropout off."""
    outs = {k: [] for k in ("se1", "se2", "se3")}
    hooks = [getattr(model, k).register_forward_hook(lambda m, i, o, k=k: outs[k].append(o.flatten().double()))
             for k in outs]
    model.train()
    model.drop.eval()
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in hooks:
        h.remove()
    return {k: torch.cat(v) for k, v in outs.items()}


def test_calibrated_output_has_mean_zero_and_variance_v_over_v_plus_eps():
    torch.manual_seed(0)
    model = Toy()
    batches = _batches()
    stats = calibrate_scale_equalizers(model, batches)
    assert set(stats) == {"se1", "se2", "se3"}
    outs = _se_outputs(model, batches)
    for k, o in outs.items():
        v = getattr(model, k).var.item()
        assert stats[k][1] == pytest.approx(v, rel=1e-6)
        assert abs(o.mean().item()) < 1e-4, k
        assert abs(o.var(unbiased=False).item() - v / (v + EPS)) < 1e-4, k
    # se3's input is 3 * BN(conv(x)) + 1 with BN on batch statistics: mean 1, variance 9 * var/(var + bn_eps)
    assert stats["se3"][0] == pytest.approx(1.0, abs=1e-5)
    assert 8.99 < stats["se3"][1] < 9.0


def test_calibration_statistics_are_the_float64_population_moments():
    torch.manual_seed(0)
    model = Toy()
    batches = _batches()
    stats = calibrate_scale_equalizers(model, batches)
    # se1's input, recomputed by hand with BN on batch statistics and no dropout
    feats = []
    with torch.no_grad():
        for b in batches:
            a = F.batch_norm(model.conv(b), None, None, model.bn.weight, model.bn.bias, training=True)
            feats.append(F.interpolate(F.avg_pool2d(a, 2), size=a.shape[-2:], mode="bilinear").flatten().double())
    ref = torch.cat(feats)
    assert stats["se1"][0] == pytest.approx(ref.mean().item(), abs=1e-7)
    assert stats["se1"][1] == pytest.approx(ref.var(unbiased=False).item(), rel=1e-5)


def test_calibration_leaves_rng_bn_statistics_modes_and_grads_untouched():
    torch.manual_seed(0)
    model = Toy(rng_in_forward=True)
    model.bn.running_mean.normal_()
    model.fuse.weight.requires_grad_(False)
    model.eval()
    model.drop.train()
    bufs = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("se")}
    modes = {n: m.training for n, m in model.named_modules()}
    batches = _batches()
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    calibrate_scale_equalizers(model, batches)
    got = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]
    after = model.state_dict()
    for k, v in bufs.items():
        assert torch.equal(after[k], v), k  # running_mean/var and num_batches_tracked included
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert model.conv.weight.requires_grad and not model.fuse.weight.requires_grad
    assert all(bool(getattr(model, k).calibrated) for k in ("se1", "se2", "se3"))


def test_calibration_errors():
    model = Toy()
    with pytest.raises(ValueError, match="at least one batch"):
        calibrate_scale_equalizers(model, [])

    class Unreached(nn.Module):
        def __init__(self):
            super().__init__()
            self.se, self.other = ScaleEqualizer(), ScaleEqualizer()

        def forward(self, x):
            return self.se(x)

    with pytest.raises(RuntimeError, match="other"):
        calibrate_scale_equalizers(Unreached(), [torch.randn(4)])

    # A failing forward leaves every statistic as it was.
    calls = []

    def failing(m, b):
        calls.append(1)
        if len(calls) > 2:
            raise KeyError("boom")
        return m(b)

    with pytest.raises(KeyError):
        calibrate_scale_equalizers(model, _batches(), forward_fn=failing)
    assert not any(bool(getattr(model, k).calibrated) for k in ("se1", "se2", "se3"))
    assert model.se1.mean.item() == 0 and model.se1.var.item() == 1 and model.se1._calib is None


def test_recalibrate_false_only_measures_uncalibrated():
    model = Toy()
    calibrate_scale_equalizers(model, _batches())
    model.se1.mean.fill_(0.25)
    model.se2.calibrated.fill_(False)
    stats = calibrate_scale_equalizers(model, _batches(seed=1), recalibrate=False)
    assert set(stats) == {"se2"} and model.se1.mean.item() == 0.25 and bool(model.se2.calibrated)


# ---------------------------------------------------------------------------------------------------------
# Modes and bad input
# ---------------------------------------------------------------------------------------------------------

def test_uncalibrated_dataset_mode_errors_name_the_hook():
    se = ScaleEqualizer()
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match="ScaleEqualizerCalibrationHook"):
        se.train()(x)
    with pytest.raises(RuntimeError, match="allow_uncalibrated"):
        se.eval()(x)
    se = ScaleEqualizer(allow_uncalibrated=True).eval()
    assert torch.allclose(se(x), x / (1 + EPS) ** 0.5, rtol=0, atol=1e-7)
    with pytest.raises(RuntimeError, match="ScaleEqualizerCalibrationHook"):
        se.train()(x)  # allow_uncalibrated never allows training


@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="global"), "mode='global'"),
    (dict(mode=None), "mode=None"),
    (dict(eps=0.0), "eps=0.0"),
    (dict(momentum=0.0), "momentum=0.0"),
    (dict(momentum=1.5), "momentum=1.5"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(")):
        ScaleEqualizer(**kwargs)


def test_zero_variance_input_gives_zeros():
    se = ScaleEqualizer()
    calibrate_scale_equalizers(se, [torch.full((2, 3, 4, 4), 7.0)])
    assert se.mean.item() == 7.0 and se.var.item() == 0.0
    out = se.train()(torch.full((2, 3, 4, 4), 7.0))
    assert torch.equal(out, torch.zeros_like(out))
    # eps keeps a constant batch finite in 'batch' mode too
    out = ScaleEqualizer("batch").train()(torch.full((1, 2, 3, 3), -2.0))
    assert torch.isfinite(out).all() and out.abs().max() == 0


def test_batch_mode_standardises_per_batch_and_eval_uses_running_estimates():
    torch.manual_seed(0)
    se = ScaleEqualizer("batch", momentum=0.25)
    xs = [3 * torch.randn(2, 4, 5, 6) + 2 for _ in range(3)]
    rm, rv = 0.0, 1.0
    for x in xs:
        y = se.train()(x)
        xd = x.double()
        v = xd.var(unbiased=False).item()
        assert abs(y.double().mean().item()) < 1e-6
        assert y.double().var(unbiased=False).item() == pytest.approx(v / (v + EPS), abs=1e-5)
        rm, rv = 0.75 * rm + 0.25 * xd.mean().item(), 0.75 * rv + 0.25 * v
    assert se.mean.item() == pytest.approx(rm, rel=1e-5) and se.var.item() == pytest.approx(rv, rel=1e-5)
    x = torch.randn(1, 4, 5, 6)
    assert torch.allclose(se.eval()(x), (x - rm) / (rv + EPS) ** 0.5, atol=1e-6)
    # gradients flow through the batch statistics (BatchNorm-like): sum of a standardised map is constant
    x = xs[0].clone().requires_grad_(True)
    se.train()(x).sum().backward()
    assert x.grad.abs().max() < 1e-4
    # batch mode needs no calibration
    assert se.is_calibrated and calibrate_scale_equalizers(se, [x.detach()]) == {}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_batch_mode_statistics_are_float32_whatever_the_input_dtype(dtype):
    # std 300: the variance 9e4 overflows float16 (max 65504); statistics taken in the input dtype gave inf,
    # rsqrt(inf) = 0 and a silently zeroed branch.
    g = torch.Generator().manual_seed(0)
    x32 = torch.randn(2, 8, 16, 16, generator=g) * 300 + 50
    x = x32.to(dtype).requires_grad_(True)
    se = ScaleEqualizer("batch", momentum=0.5)
    y = se.train()(x)
    assert y.dtype == dtype
    assert torch.isfinite(y).all()
    ref = (x.detach().float() - x.detach().float().mean()) / x.detach().float().var(unbiased=False).add(EPS).sqrt()
    # only the output's rounding to the input dtype (half an ulp: finfo.eps / 2 relative) differs
    assert torch.allclose(y.float(), ref, rtol=torch.finfo(dtype).eps, atol=1e-6)
    assert abs(y.float().var(unbiased=False).item() - 1) < 0.01
    v = x.detach().float().var(unbiased=False).item()
    assert se.var.dtype == torch.float32 and se.var.item() == pytest.approx(0.5 + 0.5 * v, rel=1e-5)
    y.float().square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().max() > 0


def test_batch_mode_running_estimates_skip_a_non_finite_batch():
    se = ScaleEqualizer("batch", momentum=0.5).train()
    se(torch.randn(2, 3, 4, 4) * 2)
    mean, var = se.mean.clone(), se.var.clone()
    for bad in (float("inf"), float("nan")):
        x = torch.randn(2, 3, 4, 4)
        x[0, 0, 0, 0] = bad
        se(x)
        assert torch.equal(se.mean, mean) and torch.equal(se.var, var)
    se.eval()
    assert torch.isfinite(se(torch.randn(1, 3, 4, 4))).all()


def test_dataset_mode_gradient_is_the_constant_scale():
    se = ScaleEqualizer()
    calibrate_scale_equalizers(se, [torch.randn(4, 3, 5, 5) * 2])
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    se.train()(x).sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, (se.var.item() + EPS) ** -0.5))


def test_merge_moments_matches_the_union():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, generator=g, dtype=torch.float64) * 3 + 1, torch.randn(37, generator=g,
                                                                                      dtype=torch.float64) - 5

    def moments(t):
        return t.numel(), t.mean(), (t - t.mean()).square().sum()

    n, mean, m2 = merge_moments(moments(a), moments(b))
    u = torch.cat([a, b])
    assert n == u.numel()
    assert torch.allclose(mean, u.mean(), rtol=0, atol=1e-12)
    assert torch.allclose(m2 / n, u.var(unbiased=False), rtol=1e-12)


def _dist_worker(rank, world, init_file, q):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    se = ScaleEqualizer()
    g = torch.Generator().manual_seed(rank)
    data = [torch.randn(2, 3, 4, 4, generator=g) * (rank + 1) + rank for _ in range(2)]
    stats = calibrate_scale_equalizers(se, data)
    q.put((rank, stats[""]))
    dist.destroy_process_group()


def test_calibration_merges_statistics_across_processes(tmp_path):
    import torch.multiprocessing as mp
    ctx = mp.get_context("fork")  # no re-import of torch in the children
    q = ctx.Queue()
    procs = [ctx.Process(target=_dist_worker, args=(r, 2, str(tmp_path / "init"), q)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
    ref = []
    for rank in range(2):
        g = torch.Generator().manual_seed(rank)
        ref += [(torch.randn(2, 3, 4, 4, generator=g) * (rank + 1) + rank).double().flatten() for _ in range(2)]
    ref = torch.cat(ref)
    for rank in range(2):
        assert results[rank][0] == pytest.approx(ref.mean().item(), abs=1e-12)
        assert results[rank][1] == pytest.approx(ref.var(unbiased=False).item(), rel=1e-12)


def _batch_sync_worker(rank, world, init_file, q, sync):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    se = ScaleEqualizer("batch", momentum=1.0, sync_batch_stats=sync).train()
    x = _rank_batch(rank).requires_grad_(True)
    y = se(x)
    (y * _rank_weights(rank)).sum().backward()
    # numpy arrays travel by value (a tensor would travel as a shared-memory handle the exiting child closes)
    q.put((rank, y.detach().numpy(), x.grad.numpy(), se.mean.item(), se.var.item()))
    dist.destroy_process_group()


def _rank_batch(rank):  # different sizes, means and scales per process
    g = torch.Generator().manual_seed(rank)
    return torch.randn(rank + 1, 3, 4, 5, generator=g) * (rank + 1) + 2 * rank


def _rank_weights(rank):
    g = torch.Generator().manual_seed(10 + rank)
    return torch.randn(rank + 1, 3, 4, 5, generator=g)


def _run_two_processes(tmp_path, target, *args):
    import torch.multiprocessing as mp
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, 2, str(tmp_path / "init"), q) + args) for r in range(2)]
    for p in procs:
        p.start()
    results = {}
    for _ in procs:
        item = q.get(timeout=120)
        results[item[0]] = item[1:]
    for p in procs:
        p.join(60)
    return results


@pytest.mark.parametrize("sync", [True, False])
def test_batch_mode_statistics_are_synchronised_across_processes(tmp_path, sync):
    """2 gloo processes == one process holding both batches (sync, values and gradients); else per process."""
    results = _run_two_processes(tmp_path, _batch_sync_worker, sync)
    xs = [_rank_batch(r).double().requires_grad_(True) for r in range(2)]
    if sync:  # the reference: one equalizer over the union of both batches, loss = sum of both ranks' losses
        union = torch.cat([x.flatten() for x in xs])
        var, mean = torch.var_mean(union, correction=0)
        ys = [(x - mean) / (var + EPS).sqrt() for x in xs]
        stats = [(mean.item(), var.item())] * 2
    else:
        ys, stats = [], []
        for x in xs:
            var, mean = torch.var_mean(x, correction=0)
            ys.append((x - mean) / (var + EPS).sqrt())
            stats.append((mean.item(), var.item()))
    sum((y * _rank_weights(r).double()).sum() for r, y in enumerate(ys)).backward()
    for r in range(2):
        y, grad, run_mean, run_var = results[r]
        assert torch.allclose(torch.from_numpy(y).double(), ys[r].detach(), atol=1e-5), r
        assert torch.allclose(torch.from_numpy(grad).double(), xs[r].grad, atol=1e-5), r
        assert run_mean == pytest.approx(stats[r][0], abs=1e-5) and run_var == pytest.approx(stats[r][1], rel=1e-5)
    if sync:
        assert results[0][2] == results[1][2] and results[0][3] == results[1][3]  # identical running estimates


# ---------------------------------------------------------------------------------------------------------
# Folding into the consumer convolution
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("conv_kwargs, border", [
    (dict(kernel_size=3, padding=1), True),
    (dict(kernel_size=3, padding=2, dilation=2, stride=2), True),
    (dict(kernel_size=3, padding=1, groups=6), True),             # depthwise (SepASPP)
    (dict(kernel_size=3, padding=1, groups=2, bias=False), True),
    (dict(kernel_size=(3, 5), padding="same"), True),
    (dict(kernel_size=1), False),                                  # exact without any correction
    (dict(kernel_size=3, padding=1, padding_mode="reflect"), False),  # pads a constant with itself
])
def test_fold_input_affine_is_exact_at_every_pixel(conv_kwargs, border):
    torch.manual_seed(0)
    cout = 6 if conv_kwargs.get("groups") == 6 else 4
    conv = nn.Conv2d(6, cout, **conv_kwargs)
    scale, shift = torch.rand(6) + 0.5, torch.randn(6) * 3
    folded = fold_input_affine(conv, scale, shift)
    assert isinstance(folded, BorderCorrectedConv2d) and (folded.border_kernel is not None) == border
    for hw in [(13, 10), (7, 21), (13, 10)]:  # two sizes, then the cached one again
        x = torch.randn(2, 6, *hw)
        ref = conv(x * scale[:, None, None] + shift[:, None, None])
        assert torch.allclose(folded(x), ref, rtol=1e-5, atol=1e-5)
    assert len(folded._strips) == (2 if border else 0)


def test_fold_border_strips_are_only_at_the_border():
    conv = nn.Conv2d(2, 3, 3, padding=1)
    folded = fold_input_affine(conv, torch.ones(2), torch.ones(2))
    top, bottom, left, right = folded._border_strips((20, 30), (20, 30), torch.device("cpu"), torch.float32)[:4]
    assert (top, bottom, left, right) == (1, 1, 1, 1)
    with pytest.raises(ValueError, match="in_channels=2"):
        fold_input_affine(conv, torch.ones(3), torch.ones(3))
    with pytest.raises(TypeError, match="not yet folded"):
        fold_input_affine(folded, torch.ones(2), torch.ones(2))
