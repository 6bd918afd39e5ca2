"""Variance-safe ViT augmentation (arXiv 2405.14115): Monte Carlo on real Fashion-MNIST through timm's own classes."""
import numpy as np
import pytest
import torch
from timm.data import Mixup, create_transform
from timm.data.random_erasing import RandomErasing
from timm.layers import resample_abs_pos_embed

from kim_plugins.data.fashion_mnist import load_fashion_mnist
from kim_plugins.layers.vit_augmentation import (check_augmentation, expected_within_variance_factor,
                                                 mixup_variance_factor, pe_to_patch_variance_ratio,
                                                 resample_pos_embed, variance_components, variance_preserving_resample,
                                                 variance_safe_mixup_args, variance_safe_random_erasing_args,
                                                 variance_safe_transform_args)

BATCH = 1000


@pytest.fixture(scope="module")
def fmnist():
    """All 10k Fashion-MNIST test images, shuffled, normalised by their own mean/std: (N, 1, 28, 28)."""
    images, _ = load_fashion_mnist("test")
    x = torch.from_numpy(images.copy()).float()[:, None] / 255.0
    x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))]
    return (x - x.mean()) / x.std()


def _apply_mixup(x, **kwargs):
    torch.manual_seed(0)
    np.random.seed(0)  # timm's Mixup draws lam with numpy
    mix = Mixup(**dict(dict(label_smoothing=0.0, num_classes=10, mode="elem"), **kwargs))
    out = []
    for b in x.split(BATCH):
        b = b.clone()
        mix(b, torch.zeros(len(b), dtype=torch.long))
        out.append(b)
    return torch.cat(out)


def test_variance_components_add_up_and_detect_the_mean_image(fmnist):
    v = variance_components(fmnist)
    assert v["total"] == pytest.approx(1.0, rel=1e-3)  # normalised by its own statistics
    assert v["within"] + v["between"] == pytest.approx(v["total"], rel=1e-9)
    assert 0.1 < v["between"] < 0.9  # Fashion-MNIST garments sit in the middle: a strong mean image


@pytest.mark.parametrize("alpha", [0.8, 0.2])
def test_mixup_scales_within_variance_by_the_closed_form(fmnist, alpha):
    before = variance_components(fmnist)
    after = variance_components(_apply_mixup(fmnist, mixup_alpha=alpha, cutmix_alpha=0.0))
    expected = mixup_variance_factor(alpha=alpha)
    assert after["within"] / before["within"] == pytest.approx(expected, rel=0.02)
    assert after["between"] == pytest.approx(before["between"], rel=0.02)  # the mean image is untouched
    assert expected < 0.9  # the shift is real, not within the tolerance


def test_mixup_cutmix_switch_matches_the_weighted_factor(fmnist):
    before = variance_components(fmnist)["within"]
    after = variance_components(_apply_mixup(fmnist, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5))["within"]
    assert after / before == pytest.approx(expected_within_variance_factor(0.8, 1.0, 1.0, 0.5), rel=0.02)


def test_cutmix_keeps_every_variance(fmnist):
    before = variance_components(fmnist)
    after = variance_components(_apply_mixup(fmnist, mixup_alpha=0.0, cutmix_alpha=1.0))
    for key in ("total", "within", "between"):
        assert after[key] == pytest.approx(before[key], rel=0.02), key


def _erase(x, **kwargs):
    torch.manual_seed(0)
    er = RandomErasing(device="cpu", **kwargs)
    return torch.cat([er(b.clone()) for b in x.split(BATCH)])


def test_pixel_erasing_keeps_the_variance_and_const_erasing_does_not(fmnist):
    # timm's DeiT setting re_prob=0.25. Measured: pixel 0.993, const 0.948. (At probability 1 pixel mode gives
    # 0.971 on Fashion-MNIST: boxes favour the centre, where the garments are, so the erased pixels' own
    # statistics are not the image-wide N(0, 1) the fill assumes.)
    before = variance_components(fmnist)["total"]
    pixel = variance_components(_erase(fmnist, probability=0.25, mode="pixel"))["total"]
    const = variance_components(_erase(fmnist, probability=0.25, mode="const"))["total"]
    assert pixel / before == pytest.approx(1.0, rel=0.01)
    assert const / before < 0.96


def test_resample_equals_timms_and_the_rescale_restores_unit_variance():
    torch.manual_seed(0)
    pe = torch.randn(1, 1 + 8 * 8, 32)
    pe[:, 1:] = (pe[:, 1:] - pe[:, 1:].mean(1, keepdim=True)) / pe[:, 1:].std(1, unbiased=False, keepdim=True)
    ours = resample_pos_embed(pe, (16, 16), num_prefix_tokens=1)
    torch.testing.assert_close(ours, resample_abs_pos_embed(pe, [16, 16], num_prefix_tokens=1))
    plain_var = float(ours[:, 1:].var())
    assert plain_var < 0.8  # upsampling an i.i.d. PE loses variance
    fixed = variance_preserving_resample(pe, (16, 16), num_prefix_tokens=1)
    assert float(fixed[:, 1:].var(unbiased=False)) == pytest.approx(1.0, rel=0.01)
    assert torch.equal(fixed[:, :1], pe[:, :1])
    torch.testing.assert_close(variance_preserving_resample(pe, (16, 16), rescale="none"), ours)
    with pytest.raises(ValueError, match="rescale"):
        variance_preserving_resample(pe, (16, 16), rescale="sqrt")


def test_guideline_args_build_timms_classes_and_reject_shifting_values():
    mix = Mixup(**variance_safe_mixup_args(num_classes=10, label_smoothing=0.1))
    assert mix.mixup_alpha == 0.0 and mix.cutmix_alpha == 1.0
    er = RandomErasing(**variance_safe_random_erasing_args(device="cpu"))
    assert er.mode == "pixel" and er.probability == 0.25
    tf = create_transform(28, **variance_safe_transform_args())
    assert any(isinstance(t, RandomErasing) and t.mode == "pixel" for t in tf.transforms)
    with pytest.raises(ValueError, match="mixup_alpha=0.8.*CutMix"):
        variance_safe_mixup_args(10, mixup_alpha=0.8)
    with pytest.raises(ValueError, match="mode='const'.*pixel"):
        variance_safe_random_erasing_args(mode="const")


def test_checker_flags_the_deit_recipe_with_const_erasing_and_passes_the_guideline():
    found = check_augmentation(dict(mixup=0.8, cutmix=1.0, reprob=0.25, remode="const"))
    assert [f.setting for f in found] == ["mixup", "remode"]
    assert found[0].factor == pytest.approx(1 - 0.5 + 0.5 * 1.8 / 2.6) and "mixup=0" in found[0].fix
    assert "remode='pixel'" in found[1].fix
    assert check_augmentation(dict(mixup=0.0, cutmix=1.0, reprob=0.25, remode="pixel")) == []
    assert check_augmentation(dict(mixup_alpha=1.0))[0].severity == "warning"
    assert check_augmentation(dict(re_prob=0.3, re_mode="rand"))[0].severity == "note"
    note = check_augmentation(dict(reprob=0.25, std=(0.5,)), data_std=(0.35,))
    assert [f.severity for f in note] == ["note"]


def test_pe_to_patch_ratio_is_the_variance_quotient():
    tokens = 2 * torch.randn(4, 16, 8, generator=torch.Generator().manual_seed(0))
    pe = torch.randn(1, 17, 8, generator=torch.Generator().manual_seed(1))
    expected = float(pe[:, 1:].double().var(unbiased=False) / tokens.double().var(unbiased=False))
    assert pe_to_patch_variance_ratio(tokens, pe) == pytest.approx(expected, rel=1e-12)
    assert 0.15 < expected < 0.35
