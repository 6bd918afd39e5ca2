"""Fashion scenes: a deterministic multi-scale segmentation set composed of real Fashion-MNIST garments.

Each scene is a canvas (default 128x128) onto which 2-6 garments are pasted at
scales from 0.5x to 3x of their 28-pixel size, at random positions, overlaps
allowed, later garments on top. The label of a pixel is the class of the
topmost garment whose (resized) pixel exceeds ``threshold``, plus one; 0 is
background. Training scenes draw garments only from Fashion-MNIST's 60k
training items and validation scenes only from its 10k test items, so no
garment is shared between the splits.

Scene ``i`` of a split depends only on ``(seed, split, i)``, so a prefix of a
larger set equals a smaller set. The background is faint deterministic noise
so that "dark" is not a perfect background cue.

Layout written (read by :class:`kim_plugins.mmseg.datasets.FashionScenesDataset`)::

    <root>/img_dir/{train,val}/00000.png   (RGB, garments in grey)
    <root>/ann_dir/{train,val}/00000.png   (uint8 labels 0..10)
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from .fashion_mnist import CLASSES as GARMENT_CLASSES
from .fashion_mnist import load_fashion_mnist

__all__ = ["CLASSES", "PALETTE", "compose_scene", "generate_fashion_scenes"]

CLASSES = ("background",) + GARMENT_CLASSES
PALETTE = [[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
           [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212]]
_SPLIT_ID = {"train": 0, "val": 1}


def compose_scene(garments: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
                  size: Tuple[int, int] = (128, 128), num_garments: Tuple[int, int] = (2, 6),
                  scale_range: Tuple[float, float] = (0.5, 3.0), threshold: int = 50
                  ) -> Tuple[np.ndarray, np.ndarray, list]:
    """Compose one scene.

    Args:
        garments: (N, 28, 28) uint8 garment images to draw from.
        labels: (N,) garment classes 0..9.
        rng: Random generator (fully determines the scene).
        size: Canvas (height, width).
        num_garments: Inclusive range of garments per scene.
        scale_range: Range of the scale factor applied to the 28-pixel garments.
        threshold: A resized garment pixel above this value is foreground.

    Returns:
        ``(image, label, placed)``: (H, W, 3) uint8 image, (H, W) uint8 labels in 0..10,
        and the list of (item index, class, scale, top, left) placed, bottom to top.
    """
    h, w = size
    largest = max(4, int(round(28 * scale_range[1])))
    if min(h, w) < 3 * largest // 4 + 1:
        raise ValueError(f"canvas size {tuple(size)} is too small for garments up to {largest} px "
                         f"(scale_range={tuple(scale_range)}): each side must be at least {3 * largest // 4 + 1} px "
                         f"(a garment may hang a quarter of its side over the border); enlarge the canvas or lower "
                         f"scale_range")
    image = (rng.random((h, w)) * 24).astype(np.float32)  # faint background noise
    label = np.zeros((h, w), np.uint8)
    placed = []
    for _ in range(int(rng.integers(num_garments[0], num_garments[1] + 1))):
        idx = int(rng.integers(len(garments)))
        scale = float(rng.uniform(*scale_range))
        side = max(4, int(round(28 * scale)))
        g = np.asarray(Image.fromarray(garments[idx]).resize((side, side), Image.BILINEAR), np.float32)
        top = int(rng.integers(-side // 4, h - 3 * side // 4))
        left = int(rng.integers(-side // 4, w - 3 * side // 4))
        y0, x0 = max(top, 0), max(left, 0)
        y1, x1 = min(top + side, h), min(left + side, w)
        if y1 <= y0 or x1 <= x0:
            continue
        patch = g[y0 - top:y1 - top, x0 - left:x1 - left]
        fg = patch > threshold
        image[y0:y1, x0:x1][fg] = patch[fg]
        label[y0:y1, x0:x1][fg] = int(labels[idx]) + 1
        placed.append((idx, int(labels[idx]), scale, top, left))
    rgb = np.repeat(np.clip(image, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
    return rgb, label, placed


def generate_fashion_scenes(root: str, num_train: int = 2000, num_val: int = 500, seed: int = 0,
                            size: Tuple[int, int] = (128, 128), fashion_mnist_dir: Optional[str] = None,
                            progress: bool = False, **compose_kwargs) -> str:
    """Write the Fashion-scenes set under ``root`` (cached: skipped when the same set exists).

    Args:
        root: Output folder (the dataset's ``data_root``).
        num_train: Training scenes (garments from the 60k training items only).
        num_val: Validation scenes (garments from the 10k test items only).
        seed: Generator seed.
        size: Canvas (height, width).
        fashion_mnist_dir: Folder with the Fashion-MNIST idx files.
        progress: Show a progress bar.
        **compose_kwargs: Passed to :func:`compose_scene`.

    Returns:
        ``root``.
    """
    meta: Dict = dict(num_train=num_train, num_val=num_val, seed=seed, size=list(size),
                      compose=dict(sorted(compose_kwargs.items())), version=1)
    meta_path = os.path.join(root, "meta.json")
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            if json.load(f) == meta:
                return root
    sources = {"train": load_fashion_mnist("train", fashion_mnist_dir),
               "val": load_fashion_mnist("test", fashion_mnist_dir)}
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=num_train + num_val, desc="fashion scenes", unit="scene")
    for split, count in (("train", num_train), ("val", num_val)):
        garments, labels = sources[split]
        for d in ("img_dir", "ann_dir"):
            os.makedirs(os.path.join(root, d, split), exist_ok=True)
        for i in range(count):
            rng = np.random.default_rng([seed, _SPLIT_ID[split], i])
            img, lab, _ = compose_scene(garments, labels, rng, size=size, **compose_kwargs)
            Image.fromarray(img).save(os.path.join(root, "img_dir", split, f"{i:05d}.png"))
            Image.fromarray(lab).save(os.path.join(root, "ann_dir", split, f"{i:05d}.png"))
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    return root


def scene_items(split: str, index: int, seed: int, num_items: int, **compose_kwargs) -> Sequence[int]:
    """Indices of the source items scene ``index`` of ``split`` uses (for overlap checks)."""
    rng = np.random.default_rng([seed, _SPLIT_ID[split], index])
    dummy = np.zeros((num_items, 28, 28), np.uint8)
    _, _, placed = compose_scene(dummy, np.zeros(num_items, np.int64), rng, **compose_kwargs)
    return [p[0] for p in placed]
