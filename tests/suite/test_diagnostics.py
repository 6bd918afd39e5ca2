"""The suite's diagnostics pairs (dead pixel test, variance-safe ViT augmentation): probes against known answers."""
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from kim_plugins.suite import diagnostics


class _EvenPixelsOnly(nn.Module):
    """Logits from a 1x1 stride-2 convolution: blind to every pixel but the (even, even) ones."""

    pretrained_cfg = dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 1, stride=2)
        self.fc = nn.Linear(4 * 16 * 16, 10)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))


def test_response_by_parity_sees_only_the_live_pixels():
    images = np.random.default_rng(0).integers(0, 256, size=(20, 28, 28), dtype=np.uint8)
    out = diagnostics.sensitivity_by_parity(_EvenPixelsOnly(), images, "cpu", per_image=8)
    assert out["response even/even"] > 0.01
    for key in ("even/odd", "odd/even", "odd/odd"):
        assert out[f"response {key}"] == 0.0
    assert out["response max/min"] == float("inf")


def test_pe_patch_shift_is_one_without_augmentation_and_below_for_mixup():
    from timm.data import Mixup

    from kim_plugins.suite.cls import make_classifier

    model = make_classifier("vit_tiny_patch16_224", dict(img_size=32, patch_size=4, embed_dim=32, depth=1,
                                                         num_heads=2), 0)
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    same = diagnostics.pe_patch_shift(model, x, x, lambda a, y: (a, y))
    assert same["train / test"] == pytest.approx(1.0, rel=1e-9)
    np.random.seed(0)
    mix = Mixup(mixup_alpha=1.0, cutmix_alpha=0.0, label_smoothing=0.0, num_classes=10, mode="elem")
    shifted = diagnostics.pe_patch_shift(model, x.clone(), x, lambda a, y: mix(a, y))
    # i.i.d. inputs: Mixup leaves E[lam^2 + (1 - lam)^2] = 2/3 of the patch variance, so the PE's share grows.
    assert shifted["image variance train / test"] == pytest.approx(2 / 3, rel=0.08)
    assert shifted["train / test"] > 1.2


def test_pairs_run_end_to_end_at_tiny_size(tmp_path):
    from kim_plugins.data.fashion_mnist import load_fashion_mnist
    from kim_plugins.suite.data import SuiteData
    from kim_plugins.suite.settings import preset

    tr, te = load_fashion_mnist("train"), load_fashion_mnist("test")
    data = SuiteData("", tr[0][:256], tr[1][:256].astype(np.int64), te[0][:256], te[1][:256].astype(np.int64),
                     None, 0, 0, 0, 0)
    settings = dataclasses.replace(preset("quick"), diag_iters=2, diag_test_images=64,
                                   vit=dict(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2),
                                   resnet=dict(channels=(8, 8, 8, 8)))
    for pair, spec in diagnostics.DIAG_PAIRS.items():
        pr = spec.run(settings, data, str(tmp_path), "cpu", {})
        assert [r.baseline for r in pr.runs] == [True, False]
        assert pr.runs[0].data_order == pr.runs[1].data_order  # same batches and flips in both variants
        assert len(pr.mechanism[pair]) == 2 and spec.report_section([pr])[0].startswith("### ")
    assert set(pr.mechanism["vitaug"][0]) >= {"PE/patch train", "PE/patch test", "train / test"}
