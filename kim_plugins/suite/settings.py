"""Sizes of the benchmark suite: the ``quick`` (2 CPU cores, <= 15 min) and ``full`` (one GPU) presets.

Every number that decides how much work a run does lives here, so the report
can print the plan it ran and a budget cap can shrink it in one place
(:meth:`SuiteSettings.scaled`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Dict, Tuple

__all__ = ["SuiteSettings", "preset"]

@dataclass
class SuiteSettings:
    """The work one suite run does.

    Attributes:
        name: ``'quick'`` or ``'full'``.
        seeds: Seeds per variant (every variant of a pair uses the same seeds).
        scene_size: Canvas side of the Fashion scenes (the generator's default is 128).
        num_train_scenes / num_val_scenes: Scenes generated (train from the 60k training
            garments, val from the 10k test garments).
        seg_iters: Training iterations of every segmentation run.
        seg_batch: Segmentation batch size.
        seg_lr: SGD learning rate of the segmentation runs (momentum 0.9, poly decay).
        se_calib_batches: Batches of the scale-equalizer calibration hook.
        rates_sizes: The two input sizes (square, scenes resized) of the atrous-rates pairs.
        cls_iters: Training iterations of every classification run.
        cls_batch: Classification batch size.
        cls_lr: AdamW learning rate of the classification runs.
        cls_test_images: Fashion-MNIST test images used for top-1 (at most 10000).
        stab_iters: Training iterations of every run of the stability pairs (dropout, gamma, infonce).
        knn_train_images: Training images of the kNN feature bank of the infonce pair.
        stab_test_images: Test images evaluated by the stability pairs.
        depth_train_scenes / depth_val_scenes: In-memory 64x64 depth scenes of the depth pair.
        robustness_images: Test images for the contrast-robustness curve.
        erf_images: Validation scenes accumulated into each ERF map.
        variance_images: Validation scenes of the per-branch variance measurement.
        vit: Overrides of the patch-4, 32x32 ViT (``timm.create_model`` kwargs).
        swin: Overrides of the 32x32 Swin of the Swin GAB pair (patch 2, window 4: a 16x16 then 8x8 grid,
            shifted windows in both stages).
        resnet: Overrides of the ResNet-18-D of the SAP pair.
        diag_iters: Training iterations of the diagnostics pairs (dead pixel test, ViT augmentation).
        diag_test_images: Test images of the diagnostics pairs.
        min_iters: Floor of the iteration counts when a budget cap scales or a re-plan shrinks them.
    """

    name: str = "quick"
    seeds: int = 2
    scene_size: int = 128
    num_train_scenes: int = 1000
    num_val_scenes: int = 200
    seg_iters: int = 200
    seg_batch: int = 8
    seg_lr: float = 0.05
    se_calib_batches: int = 10
    rates_sizes: Tuple[int, int] = (96, 128)
    cls_iters: int = 400
    cls_batch: int = 32
    cls_lr: float = 2e-3
    cls_test_images: int = 5000
    stab_iters: int = 60
    knn_train_images: int = 1000
    stab_test_images: int = 1000
    depth_train_scenes: int = 256
    depth_val_scenes: int = 32
    robustness_images: int = 1000
    erf_images: int = 16
    variance_images: int = 16
    vit: Dict = field(default_factory=lambda: dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=2))
    swin: Dict = field(default_factory=lambda: dict(img_size=32, patch_size=2, embed_dim=32, depths=(2, 2),
                                                    num_heads=(2, 4), window_size=4))
    resnet: Dict = field(default_factory=lambda: dict(channels=(16, 32, 64, 128), stem_width=16, output_stride=8))
    diag_iters: int = 200
    diag_test_images: int = 1000
    min_iters: int = 2

    def scaled(self, factor: float) -> "SuiteSettings":
        """A copy with iterations and evaluation/data sizes multiplied by ``factor`` (<= 1), floored.

        Model sizes, batch sizes and seeds never change, so a capped run is the
        same experiment, shorter.
        """
        if factor >= 1.0:
            return dataclasses.replace(self)

        def sc(v: int, floor: int) -> int:
            return max(floor, int(math.floor(v * factor)))

        return dataclasses.replace(
            self,
            num_train_scenes=sc(self.num_train_scenes, 4 * self.seg_batch),
            num_val_scenes=sc(self.num_val_scenes, 8),
            seg_iters=sc(self.seg_iters, self.min_iters),
            se_calib_batches=sc(self.se_calib_batches, 1),
            cls_iters=sc(self.cls_iters, self.min_iters),
            cls_test_images=sc(self.cls_test_images, 64),
            stab_iters=sc(self.stab_iters, self.min_iters),
            knn_train_images=sc(self.knn_train_images, 64),
            stab_test_images=sc(self.stab_test_images, 64),
            depth_train_scenes=sc(self.depth_train_scenes, 4 * self.cls_batch),
            depth_val_scenes=sc(self.depth_val_scenes, 8),
            robustness_images=sc(self.robustness_images, 64),
            erf_images=sc(self.erf_images, 2),
            variance_images=sc(self.variance_images, 2),
            diag_iters=sc(self.diag_iters, self.min_iters),
            diag_test_images=sc(self.diag_test_images, 64),
        )


def preset(name: str) -> SuiteSettings:
    """The ``quick`` (CPU, minutes) or ``full`` (one GPU) preset."""
    if name == "quick":
        return SuiteSettings()
    if name == "full":
        return SuiteSettings(name="full", seeds=3, num_train_scenes=10000, num_val_scenes=1000, seg_iters=8000,
                             seg_batch=16, seg_lr=0.01, se_calib_batches=50, rates_sizes=(128, 256),
                             cls_iters=6000, cls_batch=128, cls_lr=1e-3, cls_test_images=10000, robustness_images=10000, erf_images=64,
                             stab_iters=3000, knn_train_images=10000, stab_test_images=10000,
                             depth_train_scenes=4000, depth_val_scenes=500,
                             variance_images=64, diag_iters=3000, diag_test_images=10000,
                             vit=dict(img_size=32, patch_size=4, embed_dim=192, depth=9, num_heads=3),
                             swin=dict(img_size=32, patch_size=2, embed_dim=96, depths=(2, 6),
                                       num_heads=(3, 6), window_size=4),
                             resnet=dict(channels=(64, 128, 256, 512), stem_width=32, output_stride=8))
    raise ValueError(f"--suite must be 'quick' or 'full', got {name!r}")
