"""Tests of stochastic average pooling (arXiv 2409.16630, METHODS.md §5).

Most checks read the pooling as a linear map: for one draw, SAP is
``out[n, c, o] = sum_i J_n[o, i] x[n, c, i]`` with a random ``J_n`` shared by
the channels of sample ``n``. Feeding the identity basis as channels
(``x[n, c] = e_c``) returns ``J_n`` itself in one forward pass, and the plain
op's ``J`` gives the reference windows, straight from torch.
"""
import math
from itertools import combinations

import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from timm.layers import AvgPool2dSame, SelectAdaptivePool2d
from timm.layers.padding import pad_same
from torch import nn

from kim_plugins.layers.stochastic_pool import (StochasticAdaptiveAvgPool1d, StochasticAdaptiveAvgPool2d,
                                                StochasticAvgPool1d, StochasticAvgPool2d,
                                                StochasticAvgPool2dSame, convert_to_stochastic_pooling,
                                                num_kept, stochastic_avg_pool2d)

P = 0.5


# (name, plain pool, input spatial size): the shortcut and global pools of ResNet-D, partial border
# windows, zero padding in and out of the count, divisor_override, overlapping windows, timm's
# 'SAME' pool, uneven adaptive bins (PSP), and the 1D forms.
CASES = [
    ("resnetd_shortcut_odd", nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False), (7, 7)),
    ("pad_counted", nn.AvgPool2d(3, 2, padding=1), (6, 5)),
    ("pad_not_counted_ceil", nn.AvgPool2d(3, 2, padding=1, ceil_mode=True, count_include_pad=False), (6, 5)),
    ("overlap_divisor", nn.AvgPool2d((3, 2), (1, 2), padding=(1, 0), ceil_mode=True, divisor_override=4), (5, 5)),
    ("timm_same_k2s1", AvgPool2dSame(2, 1, ceil_mode=True, count_include_pad=False), (5, 6)),
    ("timm_same_k3s2", AvgPool2dSame(3, 2), (6, 7)),
    ("global", nn.AdaptiveAvgPool2d(1), (7, 7)),
    ("psp_bin3_uneven", nn.AdaptiveAvgPool2d(3), (7, 8)),
    ("adaptive_none", nn.AdaptiveAvgPool2d((2, None)), (5, 3)),
    ("avg1d", nn.AvgPool1d(3, 2, padding=1, ceil_mode=True, count_include_pad=False), (10,)),
    ("adaptive1d", nn.AdaptiveAvgPool1d(3), (10,)),
]
IDS = [c[0] for c in CASES]


def _sap(plain: nn.Module, keep_prob: float = P) -> nn.Module:
    return convert_to_stochastic_pooling(plain, keep_prob)


def _basis(n: int, spatial, dtype=torch.float64) -> torch.Tensor:
    """x[s, c] = e_c: the identity basis as channels, repeated for n samples."""
    m = math.prod(spatial)
    return torch.eye(m, dtype=dtype).view(1, m, *spatial).repeat(n, 1, *([1] * len(spatial)))


def _jacobian(pool: nn.Module, n: int, spatial) -> torch.Tensor:
    """(n, outputs, inputs): one draw per sample."""
    out = pool(_basis(n, spatial))
    return out.flatten(2).transpose(1, 2)


def _reference(plain: nn.Module, spatial):
    """Per output window, from torch alone: real-position mask (O, I), K and the divisor."""
    real = _jacobian(plain, 1, spatial)[0] != 0               # plain J has entries 1/divisor on the window
    real_count = real.sum(-1).double()
    if isinstance(plain, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)):
        return real, real_count, real_count
    ones = torch.ones(1, 1, *spatial, dtype=torch.float64)
    if isinstance(plain, AvgPool2dSame):                      # its external zero padding is part of K
        padded = pad_same(ones, plain.kernel_size, plain.stride, value=1.0)
        size = F.avg_pool2d(padded, plain.kernel_size, plain.stride, 0, plain.ceil_mode, True, 1).flatten()
        return real, size, size
    if plain.count_include_pad:                               # K = torch's pool_size = real / mean of ones
        no_override = type(plain)(plain.kernel_size, plain.stride, plain.padding, plain.ceil_mode, True)
        size = real_count / no_override(ones).flatten()
    else:
        size = real_count
    override = getattr(plain, "divisor_override", None)
    return real, size, torch.full_like(size, override) if override else size


# --------------------------------------------------------------------------- eval == plain op


@pytest.mark.parametrize("name, plain, spatial", CASES, ids=IDS)
def test_eval_is_bit_identical(name, plain, spatial):
    sap = _sap(plain).eval()
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        x = torch.randn(2, 3, *spatial).to(dtype)
        assert torch.equal(sap(x), plain(x)), (name, dtype)
        assert torch.equal(sap(x[0]), plain(x[0])), (name, "unbatched")
    if len(spatial) == 2:
        x = torch.randn(2, 3, *spatial).to(memory_format=torch.channels_last)
        assert torch.equal(sap(x), plain(x))


def test_functional_eval_matches_and_global_pool_equals_timm_fast_mean():
    x = torch.randn(2, 4, 7, 5)
    assert torch.equal(stochastic_avg_pool2d(x, 3, 2, 1, True, False, None, training=False),
                       F.avg_pool2d(x, 3, 2, 1, True, False))
    sel = SelectAdaptivePool2d(pool_type="fast", flatten=True).eval()
    assert torch.equal(convert_to_stochastic_pooling(sel)(x), sel(x))
    sel = SelectAdaptivePool2d(pool_type="avg", flatten=True).eval()
    assert torch.equal(StochasticAdaptiveAvgPool2d.from_module(sel).eval()(x), sel(x))


# --------------------------------------------------------------------------- one draw: structure


@pytest.mark.parametrize("name, plain, spatial", CASES, ids=IDS)
def test_each_output_is_the_mean_of_k_positions_of_its_window(name, plain, spatial):
    real, size, divisor = _reference(plain, spatial)
    kept = num_kept(size.long(), P)
    torch.manual_seed(1)
    jac = _jacobian(_sap(plain).train(), 16, spatial)         # 16 independent draws
    nz = jac != 0
    # only real positions of the window are ever used (never outside it, never padding) ...
    assert not (nz & ~real).any(), name
    # ... each with weight K / (k * divisor): the mean of the kept values (scaled for divisor_override)
    expected = (size / (kept * divisor))[None, :, None].expand_as(jac)
    torch.testing.assert_close(jac[nz], expected[nz], rtol=1e-12, atol=0)
    # exactly k positions are kept; with counted zero padding, k minus the padded ones picked
    count = nz.sum(-1)
    padded = (size - real.sum(-1)).long()
    assert ((count <= kept) & (count >= kept - padded)).all(), name
    no_pad = padded == 0
    assert (count[:, no_pad] == kept[no_pad]).all(), name
    # and padding is really drawn from when it is counted (partial windows then average fewer reals)
    if (padded > 0).any():
        assert (count[:, padded > 0] < kept[padded > 0]).any(), name


def test_k_at_half_and_sizes_of_common_windows():
    assert [num_kept(k, 0.5) for k in (1, 2, 3, 4, 9, 49)] == [1, 1, 2, 2, 5, 25]
    assert num_kept(10, 0.01) == 1 and num_kept(10, 1.0) == 10 and num_kept(3, 0.25) == 1
    torch.manual_seed(0)
    # 3x3 windows (K = 9) keep 5 positions; a 7x7 global pool (K = 49) keeps 25
    x = torch.randn(2, 3, 9, 9, requires_grad=True)
    StochasticAvgPool2d(3, keep_prob=0.5)(x).sum().backward()
    per_window = (x.grad != 0).view(2, 3, 3, 3, 3, 3).permute(0, 1, 2, 4, 3, 5).sum((-1, -2))
    assert (per_window == 5).all()
    x = torch.randn(2, 3, 7, 7, requires_grad=True)
    StochasticAdaptiveAvgPool2d(1, keep_prob=0.5)(x).sum().backward()
    assert ((x.grad != 0).sum((-1, -2)) == 25).all()


def test_same_positions_for_all_channels_independent_across_samples_and_gradients_exact():
    torch.manual_seed(3)
    pool = StochasticAvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)
    x = torch.randn(6, 5, 7, 9, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(4)
    out = pool(x)
    out.backward(torch.ones_like(out))
    kept = x.grad != 0
    assert (kept == kept[:, :1]).all()                             # shared by the channels of a sample
    assert len({tuple(k.flatten().tolist()) for k in kept[:, 0]}) > 1   # not shared across samples
    # the same draw as a linear map: output and gradient are exactly J x and J^T 1
    torch.manual_seed(4)
    jac = _jacobian(pool, 6, (7, 9))                              # the draw depends on N, not on C
    torch.testing.assert_close(out.flatten(2), torch.einsum("noi,nci->nco", jac, x.detach().flatten(2)))
    torch.testing.assert_close(x.grad[:, 0].flatten(1), jac.sum(1))
    assert torch.equal(kept[:, 0].flatten(1), jac.sum(1) != 0)    # gradients reach exactly the kept positions


def test_deterministic_under_manual_seed():
    pool = StochasticAdaptiveAvgPool2d(3)
    x = torch.randn(2, 3, 8, 8)
    torch.manual_seed(7)
    a = pool(x)
    torch.manual_seed(7)
    b = pool(x)
    c = pool(x)
    assert torch.equal(a, b) and not torch.equal(b, c)


def test_keep_prob_one_is_plain_average_pooling_in_training():
    torch.manual_seed(0)
    for name, plain, spatial in CASES:
        x = torch.randn(2, 3, *spatial)
        assert torch.equal(_sap(plain, 1.0).train()(x), plain(x)), name
    # windows of one position (the dilated stages' kernel-1 shortcut pools) are plain pooling too
    x = torch.randn(2, 3, 5, 5)
    assert torch.equal(StochasticAvgPool2d(1, 1).train()(x), F.avg_pool2d(x, 1, 1))


# --------------------------------------------------------------------------- many draws: statistics


def _z(alpha: float, tests: int) -> float:
    """Two-sided normal quantile with a Bonferroni correction over ``tests`` comparisons."""
    return float(stats.norm.ppf(1 - alpha / (2 * tests)))


@pytest.mark.parametrize("name, plain, spatial", CASES, ids=IDS)
def test_mean_of_draws_converges_to_plain_average(name, plain, spatial):
    """Unbiased, with the variance of sampling k of K without replacement.

    One draw of a window with values v_1..v_K (zero padding included when
    counted) has variance (K/d)^2 * s2/k * (K-k)/(K-1), s2 the population
    variance of v. The mean of T draws is within z*sqrt(var/T) of the plain
    output (Bonferroni z over all outputs); the standardised errors have mean
    square 1 within 6 standard deviations (sqrt(2/M)), which checks the variance itself.
    """
    real, size, divisor = _reference(plain, spatial)
    kept = num_kept(size.long(), P).double()
    draws = 4000
    torch.manual_seed(11)
    x = torch.randn(1, 4, *spatial, dtype=torch.float64)
    sap = _sap(plain).train()
    mean = sap(x.expand(draws, *x.shape[1:])).mean(0)           # T independent draws, one batch
    target = plain(x)[0]
    # window values, padding zeros included, from the reference windows
    values = x[0].flatten(1)[:, None, :] * real[None]            # (C, O, I)
    s1 = values.sum(-1)
    s2 = (values ** 2).sum(-1)
    pop_var = s2 / size - (s1 / size) ** 2
    var = (size / divisor) ** 2 * pop_var / kept * (size - kept) / (size - 1).clamp_min(1)
    var = var.view_as(target)
    err = (mean - target)[var > 0]
    sd = (var[var > 0] / draws).sqrt()
    assert torch.equal(mean[var == 0], target[var == 0]) or torch.allclose(mean[var == 0], target[var == 0],
                                                                           rtol=1e-12, atol=1e-12)
    zs = err / sd
    assert zs.abs().max() < _z(1e-3, zs.numel()), name
    m = zs.numel()
    assert abs(float((zs ** 2).mean()) - 1.0) < 6 * math.sqrt(2.0 / m) + 0.05, (name, float((zs ** 2).mean()))


def test_inclusion_probability_is_k_over_k_for_every_position():
    """Each counted position is kept with probability k/K (Bernoulli variance bound)."""
    plain = nn.AvgPool2d(3, 2, padding=1, ceil_mode=True, count_include_pad=False)
    spatial = (7, 6)
    real, size, divisor = _reference(plain, spatial)
    kept = num_kept(size.long(), P).double()
    draws = 3000
    torch.manual_seed(5)
    freq = (_jacobian(_sap(plain).train(), draws, spatial) != 0).double().mean(0)   # (O, I)
    prob = (kept / size)[:, None].expand_as(freq)[real]
    sd = (prob * (1 - prob) / draws).sqrt()
    z = (freq[real] - prob) / sd.clamp_min(1e-12)
    assert z.abs().max() < _z(1e-3, z.numel())


def test_subsets_are_uniform():
    """K = 4, k = 2: the six pairs of a 2x2 window are equally likely (chi-square, 5 dof)."""
    draws = 6000
    torch.manual_seed(9)
    x = torch.zeros(draws, 1, 2, 2, requires_grad=True)
    StochasticAvgPool2d(2).train()(x).sum().backward()
    picks = (x.grad.view(draws, 4) != 0)
    assert (picks.sum(1) == 2).all()
    pairs = {p: 0 for p in combinations(range(4), 2)}
    for row in picks.nonzero()[:, 1].view(draws, 2).tolist():
        pairs[tuple(row)] += 1
    chi2 = sum((c - draws / 6) ** 2 / (draws / 6) for c in pairs.values())
    assert chi2 < stats.chi2.ppf(1 - 1e-4, df=5), pairs


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.5, float("nan"), float("inf")])
def test_keep_prob_out_of_range(bad):
    with pytest.raises(ValueError, match=r"keep_prob must be in \(0, 1\]"):
        StochasticAvgPool2d(2, keep_prob=bad)
    with pytest.raises(ValueError, match="keep_prob"):
        convert_to_stochastic_pooling(nn.AvgPool2d(2), bad)


@pytest.mark.parametrize("bad", [True, "0.5", None])
def test_keep_prob_wrong_type(bad):
    with pytest.raises(TypeError, match="keep_prob"):
        StochasticAdaptiveAvgPool2d(1, keep_prob=bad)


@pytest.mark.parametrize("plain, shape", [
    (nn.AvgPool2d(3), (2, 3, 2, 2)),                    # output too small
    (nn.AvgPool2d(3, 1, 2), (2, 3, 5, 5)),              # padding > kernel / 2
    (nn.AvgPool2d(2), (2, 3, 4, 4, 4)),                 # 5D input
    (nn.AvgPool2d(2, divisor_override=0), (1, 1, 4, 4)),
    (nn.AdaptiveAvgPool2d(2), (2, 3, 0, 5)),            # empty spatial dim
    (nn.AdaptiveAvgPool2d(2), (5,)),
    (nn.AdaptiveAvgPool2d((2, 2, 2)), (2, 3, 4, 4)),
    (nn.AvgPool1d(3), (2, 3, 2)),
    (nn.AvgPool1d(3), (2, 3, 4, 4)),
    (nn.AdaptiveAvgPool1d(3), (2, 3, 0)),
])
def test_shapes_torch_rejects_raise_torchs_error(plain, shape):
    x = torch.randn(shape)
    with pytest.raises(Exception) as expected:
        plain(x)
    sap = _sap(plain).train()
    with pytest.raises(type(expected.value)) as got:
        sap(x)
    assert str(got.value) == str(expected.value)


def test_shapes_torch_accepts_do_not_raise():
    for sap, plain, shape in [(StochasticAvgPool2d(2), nn.AvgPool2d(2), (0, 3, 4, 4)),        # empty batch
                              (StochasticAdaptiveAvgPool2d(3), nn.AdaptiveAvgPool2d(3), (0, 2, 5, 5)),
                              (StochasticAdaptiveAvgPool2d(4), nn.AdaptiveAvgPool2d(4), (1, 2, 2, 3)),  # O > H
                              (StochasticAvgPool1d(2), nn.AvgPool1d(2), (3, 4))]:          # unbatched 1D
        x = torch.randn(shape)
        assert sap.train()(x).shape == plain(x).shape


# --------------------------------------------------------------------------- conversion


def test_convert_every_supported_pool_keeps_state_dict_and_eval_output():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AvgPool2d(2, ceil_mode=True, count_include_pad=False),
                          AvgPool2dSame(2, 1), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(2),
                          nn.Sequential(SelectAdaptivePool2d(pool_type="avg", flatten=True)),
                          nn.Unflatten(1, (4, 1)), nn.AvgPool1d(1), nn.AdaptiveAvgPool1d(1))
    model.eval()
    x = torch.randn(2, 3, 15, 15)
    ref = model(x)
    keys = list(model.state_dict())
    convert_to_stochastic_pooling(model, keep_prob=0.25)
    assert list(model.state_dict()) == keys
    assert [type(m) for m in model] [1:5] == [StochasticAvgPool2d, StochasticAvgPool2dSame, nn.MaxPool2d,
                                              StochasticAdaptiveAvgPool2d]
    assert type(model[5][0]) is SelectAdaptivePool2d and type(model[5][0].pool) is StochasticAdaptiveAvgPool2d
    assert model[5][0].pool_type == "avg" and model[5][0].feat_mult() == 1
    assert type(model[7]) is StochasticAvgPool1d and type(model[8]) is StochasticAdaptiveAvgPool1d
    assert all(not m.training for m in model.modules())          # modes kept
    assert model[1].keep_prob == 0.25 and model[1].ceil_mode and not model[1].count_include_pad
    assert torch.equal(model(x), ref)
    model.train()
    assert not torch.equal(model(x), ref)


def test_convert_include_exclude_and_root():
    model = nn.Sequential(nn.AvgPool2d(2), nn.Sequential(nn.AdaptiveAvgPool2d(1)))
    convert_to_stochastic_pooling(model, include="1.*")
    assert type(model[0]) is nn.AvgPool2d and type(model[1][0]) is StochasticAdaptiveAvgPool2d
    before = model[1][0]
    convert_to_stochastic_pooling(model, keep_prob=0.9, exclude=["0"])   # already stochastic: kept
    assert model[1][0] is before and type(model[0]) is nn.AvgPool2d
    with pytest.raises(ValueError, match=r"include pattern\(s\) \['head\.\*'\] match no supported average pool"):
        convert_to_stochastic_pooling(model, include=["head.*"])
    assert type(convert_to_stochastic_pooling(nn.AvgPool1d(2))) is StochasticAvgPool1d


def test_convert_refuses_unknown_subclasses_and_non_average_pools():
    class MyPool(nn.AvgPool2d):
        def forward(self, x):
            return super().forward(x) * 2

    with pytest.raises(TypeError, match="exclude="):
        convert_to_stochastic_pooling(nn.Sequential(MyPool(2)))
    assert type(convert_to_stochastic_pooling(nn.Sequential(MyPool(2)), exclude="0")[0]) is MyPool
    with pytest.raises(ValueError, match="pool_type='max'"):
        StochasticAdaptiveAvgPool2d.from_module(SelectAdaptivePool2d(pool_type="max"))
    with pytest.raises(TypeError, match="converts torch.nn.AvgPool2d"):
        StochasticAvgPool2d.from_module(nn.MaxPool2d(2))


def test_from_module_copies_arguments():
    p = StochasticAvgPool2d.from_module(nn.AvgPool2d((3, 2), (2, 1), (1, 0), True, False, 5), 0.3)
    assert (p.kernel_size, p.stride, p.padding, p.ceil_mode, p.count_include_pad, p.divisor_override,
            p.keep_prob) == ((3, 2), (2, 1), (1, 0), True, False, 5, 0.3)
    s = StochasticAvgPool2d.from_module(AvgPool2dSame(2, 1, ceil_mode=True, count_include_pad=False))
    assert type(s) is StochasticAvgPool2dSame and s.kernel_size == (2, 2) and s.stride == (1, 1)
    assert "keep_prob=0.5" in repr(s)
    a = StochasticAdaptiveAvgPool1d.from_module(nn.AdaptiveAvgPool1d(4))
    assert a.output_size == 4


def test_dtypes_and_cuda():
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            x = torch.randn(2, 3, 9, 9, device=device).to(dtype).requires_grad_()
            for pool in (StochasticAvgPool2d(2, 2, ceil_mode=True, count_include_pad=False),
                         StochasticAdaptiveAvgPool2d((1, 3))):
                y = pool.to(device).train()(x)
                assert y.dtype == dtype and y.device == x.device
                y.float().sum().backward()
                assert x.grad.dtype == dtype
                assert torch.equal(pool.eval()(x), pool.__class__.__bases__[0].forward(pool, x))


def test_values_that_are_not_kept_do_not_leak():
    """An inf at a position that is not drawn leaves the output finite (no 0 * inf)."""
    x = torch.zeros(200, 1, 2, 2)
    x[:, 0, 0, 0] = float("inf")
    torch.manual_seed(0)
    out = StochasticAvgPool2d(2).train()(x).flatten()
    assert not out.isnan().any()
    assert ((out == 0) | (out == float("inf"))).all() and (out == 0).any() and (out == float("inf")).any()
