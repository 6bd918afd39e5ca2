"""Tests of the resolution-aware atrous rate rule (arXiv 2307.14179, METHODS.md §2)."""
import pytest
import torch
from torch import nn

import warnings

from kim_plugins.layers.atrous import (DegenerateRateWarning, degenerate_rates, feature_size,
                                       max_nondegenerate_rate, measure_output_stride, normalize_crop_size,
                                       rate_ladder, resolution_aware_rates, resolve_dilations)


@pytest.mark.parametrize("crop, stride, expected", [
    # F = ceil(min(H, W)/OS); r_max = min(floor(F/2), floor((F-1)/2)); ladder (1, r/3, 2r/3, r) rounded half up.
    ((512, 1024), 8, (1, 10, 21, 31)),    # Cityscapes R-101-D8: F=64, r=31 (32 is degenerate), 10.33->10, 20.67->21
    (896, 8, (1, 18, 37, 55)),            # iSAID R-50-D8: F=112, r=55, 18.33->18, 36.67->37
    (128, 1, (1, 21, 42, 63)),            # STARE / CHASE_DB1 UNet + ASPP: F=128, r=63
    (256, 1, (1, 42, 85, 127)),           # HRF: F=256, r=127
    ((512, 1024), 16, (1, 5, 10, 15)),    # OS16: F=32, r=15
    ((100, 60), 4, (1, 2, 5, 7)),         # min side 60: F=15 (odd), r=floor(7.5)=7=floor(14/2), 2.33->2, 4.67->5
    ((61, 200), 4, (1, 2, 5, 7)),         # F=ceil(15.25)=16, r=7 (8 is degenerate)
])
def test_table(crop, stride, expected):
    assert resolution_aware_rates(crop, stride) == expected


def test_half_rounds_up_and_ceil_of_feature():
    # r_max = 3 with n = 3 -> 1.5 rounds up to 2 (not banker's 2 either way), r = (1, 2, 3)
    assert resolution_aware_rates(7, 1, num_rates=3) == (1, 2, 3)
    # r_max = 9, n = 3: 4.5 -> 5 (banker's rounding would give 4)
    assert resolution_aware_rates(19, 1, num_rates=3) == (1, 5, 9)
    # F = ceil(65 / 8) = 9 -> r_max = 4; n = 2
    assert resolution_aware_rates(65, 8, num_rates=2) == (1, 4)


def test_num_rates_and_kappa():
    assert resolution_aware_rates(128, 1, num_rates=2) == (1, 63)
    assert resolution_aware_rates(128, 1, num_rates=5) == (1, 16, 32, 47, 63)
    assert resolution_aware_rates(128, 1, kappa=0.25) == (1, 11, 21, 32)
    assert resolution_aware_rates(129, 1, kappa=0.5) == (1, 21, 43, 64)  # odd F: floor(F/2) = floor((F-1)/2)


def test_monotone_in_crop_size():
    for stride in (1, 4, 8, 16):
        prev = None
        for side in range(12 * stride, 1200, 7):
            try:
                rates = resolution_aware_rates(side, stride)
            except ValueError:
                assert prev is None, f"error after a valid size at side={side}"
                continue
            assert len(rates) == 4 and rates[0] == 1
            assert all(b > a for a, b in zip(rates, rates[1:]))
            if prev is not None:
                assert all(b >= a for a, b in zip(prev, rates)), (side, prev, rates)
            prev = rates
        assert prev is not None


@pytest.mark.parametrize("crop, stride", [((512, 1024), 8), (128, 1), (896, 8), ((97, 131), 1), (330, 2)])
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_scale_invariance(crop, stride, scale):
    h, w = normalize_crop_size(crop)
    assert resolution_aware_rates((h * scale, w * scale), stride * scale) == resolution_aware_rates(crop, stride)


def test_only_min_side_matters():
    assert resolution_aware_rates((512, 1024), 8) == resolution_aware_rates((512, 512), 8) \
        == resolution_aware_rates((4096, 512), 8)


@pytest.mark.parametrize("kwargs, match", [
    (dict(crop_size=0, output_stride=8), "crop_size must be positive"),
    (dict(crop_size=(512, -1), output_stride=8), "crop_size must be positive"),
    (dict(crop_size=(512, 512, 3), output_stride=8), r"\(H, W\) pair"),
    (dict(crop_size=512.0, output_stride=8), r"\(H, W\) pair"),
    (dict(crop_size=512, output_stride=0), "output_stride must be positive"),
    (dict(crop_size=512, output_stride=2.5), "output_stride must be a positive int"),
    (dict(crop_size=512, output_stride=8, num_rates=1), "num_rates must be an int >= 2"),
    (dict(crop_size=512, output_stride=8, kappa=0), r"kappa must be a number in \(0, 0.5\], got 0"),
    (dict(crop_size=512, output_stride=8, kappa=-0.1), r"kappa must be a number in \(0, 0.5\]"),
    (dict(crop_size=512, output_stride=8, kappa=0.51), r"kappa must be a number in \(0, 0.5\], got 0.51"),
    (dict(crop_size=512, output_stride=8, kappa=5), r"kappa must be a number in \(0, 0.5\], got 5"),
    (dict(crop_size=512, output_stride=8, kappa=float("nan")), "kappa must be"),
    (dict(crop_size=512, output_stride=8, kappa=True), "kappa must be"),
])
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        resolution_aware_rates(**kwargs)


def test_too_small_names_crop_and_stride():
    with pytest.raises(ValueError, match=r"crop_size=\(32, 64\) with output_stride=8.*too small for 4"):
        resolution_aware_rates((32, 64), 8)
    # r_1 would round to 1 = r_0
    with pytest.raises(ValueError, match="too small"):
        resolution_aware_rates(4, 1, num_rates=4)


def test_smallest_valid_crops():
    # Smallest r_max with 4 distinct rates: r/3 >= 1.5 -> r_max >= 5 -> floor((F - 1) / 2) >= 5 -> F >= 11
    assert resolution_aware_rates(11, 1) == (1, 2, 3, 5)
    with pytest.raises(ValueError):
        resolution_aware_rates(10, 1)  # floor(10/2) = 5 would leave rate 5 degenerate on 10 pixels


def test_resolve_dilations():
    assert resolve_dilations((1, 12, 24, 36)) == (1, 12, 24, 36)
    assert resolve_dilations([1, 6, 12, 18], crop_size=128, output_stride=1) == (1, 6, 12, 18)
    assert resolve_dilations("auto", crop_size=(512, 1024), output_stride=8) == (1, 10, 21, 31)
    assert resolve_dilations("auto", crop_size=128, output_stride=1, num_rates=3, kappa=0.25) == (1, 16, 32)
    with pytest.raises(ValueError, match="needs crop_size and output_stride"):
        resolve_dilations("auto")
    with pytest.raises(ValueError, match="needs output_stride"):
        resolve_dilations("auto", crop_size=128)
    with pytest.raises(ValueError, match="'infer' is resolved by the segmentor"):
        resolve_dilations("auto", crop_size=128, output_stride="infer")
    with pytest.raises(ValueError, match="'auto' or a tuple"):
        resolve_dilations("Auto", crop_size=128, output_stride=1)
    for bad in [(), (1, 0), (1, 2.0), 6, None]:
        with pytest.raises(ValueError, match="dilations must be"):
            resolve_dilations(bad)


def test_measure_output_stride():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Conv2d(4, 4, 3, stride=4, padding=1))
    assert measure_output_stride(net, (64, 96)) == 8
    assert measure_output_stride(nn.Identity(), 33) == 1
    # odd crop: ceil division still rounds to the stride
    assert measure_output_stride(net, (100, 100)) == 8
    with pytest.raises(ValueError, match="must return a \\(N, C, h, w\\)"):
        measure_output_stride(lambda x: x.flatten(1), 32)
    with pytest.raises(ValueError, match="different strides"):
        measure_output_stride(lambda x: x[..., ::2, ::4], 32)
    with pytest.raises(ValueError, match="larger than the crop"):
        measure_output_stride(lambda x: torch.zeros(1, 1, 64, 64), 32)


def test_rate_ladder_is_the_rules_shape():
    assert rate_ladder(36) == (1, 12, 24, 36)  # mmseg's reference ladder is this shape
    assert rate_ladder(32) == (1, 11, 21, 32)
    assert rate_ladder(4) == (1, 1, 3, 4)       # not checked for distinct rates here
    assert rate_ladder(10, num_rates=6) == (1, 2, 4, 6, 8, 10)
    for side, stride in [((512, 1024), 8), (128, 1), (896, 8)]:
        rates = resolution_aware_rates(side, stride)
        assert rate_ladder(rates[-1]) == rates
    with pytest.raises(ValueError, match="num_rates"):
        rate_ladder(10, num_rates=1)


def _has_full_kernel(rate: int, feat: int) -> bool:
    """Brute force: some position y has its taps y - r, y, y + r inside [0, feat - 1]."""
    return any(0 <= y - rate and y + rate <= feat - 1 for y in range(feat))


def test_max_nondegenerate_rate_is_the_brute_force_bound():
    for feat in range(1, 80):
        bound = max_nondegenerate_rate(feat)
        assert bound == (feat - 1) // 2
        assert all(_has_full_kernel(r, feat) for r in range(1, bound + 1))
        assert not _has_full_kernel(bound + 1, feat)


@pytest.mark.parametrize("num_rates", [2, 3, 4, 5, 6])
@pytest.mark.parametrize("kappa", [0.1, 0.3, 0.5])
def test_rule_never_builds_a_degenerate_branch(num_rates, kappa):
    """Every rate of the rule (rate 1, a 1x1 branch, aside) keeps a position with all 3x3 taps inside."""
    built = 0
    for side in range(4, 300):
        for stride in (1, 8):
            try:
                rates = resolution_aware_rates((side, 2 * side), stride, num_rates=num_rates, kappa=kappa)
            except ValueError:
                continue
            built += 1
            feat = feature_size((side, 2 * side), stride)
            assert all(_has_full_kernel(r, feat) for r in rates[1:]), (side, stride, rates)
            assert degenerate_rates(rates, (side, 2 * side), stride) == ()
    assert built > 100


def test_even_feature_size_is_capped():
    """kappa = 0.5 on an even F would give r = F/2, whose taps at y +- F/2 never both fit: capped to F/2 - 1."""
    for feat in (16, 64, 128):
        assert resolution_aware_rates(feat, 1)[-1] == feat // 2 - 1
        assert not _has_full_kernel(feat // 2, feat)


def test_explicit_degenerate_rates_warn():
    """mmseg's (1, 12, 24, 36) on a 64-px crop at OS 8 (F = 8): every dilated branch is degenerate."""
    with pytest.warns(DegenerateRateWarning) as rec:
        assert resolve_dilations((1, 12, 24, 36), crop_size=64, output_stride=8) == (1, 12, 24, 36)
    msg = str(rec[0].message)
    assert "rates 12, 24, 36 > floor((F - 1) / 2) = 3" in msg and "F=8-pixel feature map" in msg
    assert "suggests dilations=(1, 2, 3) (the map is too small for 4 distinct rates)" in msg
    with pytest.warns(DegenerateRateWarning, match=r"rate 36 > floor\(\(F - 1\) / 2\) = 31 .*F=64.*"
                                                   r"suggests dilations=\(1, 10, 21, 31\)"):
        resolve_dilations((1, 12, 24, 36), crop_size=(512, 1024), output_stride=8)
    with pytest.warns(DegenerateRateWarning, match="rate 2 > .* = 1 .*rate 1 only"):
        resolve_dilations((1, 2), crop_size=3, output_stride=1)


def test_non_degenerate_or_unknown_size_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_dilations((1, 12, 24, 36), crop_size=(640, 640), output_stride=8)  # F = 80: bound 39
        resolve_dilations((1, 12, 24, 36))  # no crop: nothing to check
        resolve_dilations("auto", crop_size=(512, 1024), output_stride=8)


def test_resolve_dilations_checks_kappa():
    with pytest.raises(ValueError, match=r"kappa must be a number in \(0, 0.5\], got 5"):
        resolve_dilations("auto", crop_size=64, output_stride=1, kappa=5)
    with pytest.raises(ValueError, match="kappa must be"):
        resolve_dilations((1, 6, 12, 18), kappa=0.0)
