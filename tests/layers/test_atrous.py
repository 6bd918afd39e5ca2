"""Tests of the resolution-aware atrous rate rule (arXiv 2307.14179, METHODS.md §2)."""
import pytest
import torch
from torch import nn

from kim_plugins.layers.atrous import (measure_output_stride, normalize_crop_size, rate_ladder,
                                       resolution_aware_rates, resolve_dilations)


@pytest.mark.parametrize("crop, stride, expected", [
    # F = ceil(min(H, W)/OS); r_max = floor(F/2); ladder (1, r/3, 2r/3, r) rounded half up.
    ((512, 1024), 8, (1, 11, 21, 32)),    # Cityscapes R-101-D8: F=64, r=32, 10.67->11, 21.33->21
    (896, 8, (1, 19, 37, 56)),            # iSAID R-50-D8: F=112, r=56, 18.67->19, 37.33->37
    (128, 1, (1, 21, 43, 64)),            # STARE / CHASE_DB1 UNet + ASPP: F=128, r=64
    (256, 1, (1, 43, 85, 128)),           # HRF: F=256, r=128
    ((512, 1024), 16, (1, 5, 11, 16)),    # OS16: F=32, r=16, 5.33->5, 10.67->11
    ((100, 60), 4, (1, 2, 5, 7)),         # min side 60: F=15, r=floor(7.5)=7, 2.33->2, 4.67->5
    ((61, 200), 4, (1, 3, 5, 8)),         # F=ceil(15.25)=16, r=8, 2.67->3, 5.33->5
])
def test_table(crop, stride, expected):
    assert resolution_aware_rates(crop, stride) == expected


def test_half_rounds_up_and_ceil_of_feature():
    # r_max = 3 with n = 3 -> 1.5 rounds up to 2 (not banker's 2 either way), r = (1, 2, 3)
    assert resolution_aware_rates(6, 1, num_rates=3) == (1, 2, 3)
    # r_max = 9, n = 3: 4.5 -> 5 (banker's rounding would give 4)
    assert resolution_aware_rates(18, 1, num_rates=3) == (1, 5, 9)
    # F = ceil(65 / 8) = 9 -> r_max = 4; n = 2
    assert resolution_aware_rates(65, 8, num_rates=2) == (1, 4)


def test_num_rates_and_kappa():
    assert resolution_aware_rates(128, 1, num_rates=2) == (1, 64)
    assert resolution_aware_rates(128, 1, num_rates=5) == (1, 16, 32, 48, 64)
    assert resolution_aware_rates(128, 1, kappa=0.25) == (1, 11, 21, 32)
    assert resolution_aware_rates(128, 1, kappa=1.0) == (1, 43, 85, 128)


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
    (dict(crop_size=512, output_stride=8, kappa=0), "kappa must be"),
    (dict(crop_size=512, output_stride=8, kappa=float("nan")), "kappa must be"),
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
    # Smallest r_max with 4 distinct rates: r/3 >= 1.5 -> r_max >= 5 -> F >= 10
    assert resolution_aware_rates(10, 1) == (1, 2, 3, 5)
    with pytest.raises(ValueError):
        resolution_aware_rates(9, 1)


def test_resolve_dilations():
    assert resolve_dilations((1, 12, 24, 36)) == (1, 12, 24, 36)
    assert resolve_dilations([1, 6, 12, 18], crop_size=128, output_stride=1) == (1, 6, 12, 18)
    assert resolve_dilations("auto", crop_size=(512, 1024), output_stride=8) == (1, 11, 21, 32)
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
