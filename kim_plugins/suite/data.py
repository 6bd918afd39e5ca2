"""The suite's data: Fashion-MNIST arrays and the Fashion-scenes segmentation set, cached on disk."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from kim_plugins.data.fashion_mnist import find_fashion_mnist, load_fashion_mnist
from kim_plugins.data.fashion_scenes import generate_fashion_scenes

__all__ = ["SuiteData", "prepare_data", "default_data_root", "scenes_dir", "cached_scenes"]


@dataclass
class SuiteData:
    """Everything the pairs read.

    Attributes:
        fashion_mnist_dir: Folder of the idx files.
        train_images / train_labels: (60000, 28, 28) uint8 / (60000,) int64.
        test_images / test_labels: (10000, 28, 28) uint8 / (10000,) int64.
        scenes_root: ``data_root`` of the FashionScenesDataset.
        num_train_scenes / num_val_scenes / scene_size / scene_seed: how the scenes were made.
    """

    fashion_mnist_dir: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    scenes_root: Optional[str]
    num_train_scenes: int
    num_val_scenes: int
    scene_size: int
    scene_seed: int


def default_data_root() -> str:
    """``$KIM_PLUGINS_DATA`` or ``./data`` (git-ignored in the repository)."""
    return os.environ.get("KIM_PLUGINS_DATA", "data")


def scenes_dir(data_root: str, scene_size: int, scene_seed: int = 0) -> str:
    """Cache folder of the Fashion scenes of one canvas size and seed."""
    return os.path.join(data_root, "fashion_scenes", f"{scene_size}px_seed{scene_seed}")


def cached_scenes(data_root: str, scene_size: int, scene_seed: int = 0) -> Tuple[int, int]:
    """``(num_train, num_val)`` scenes already written for this size and seed ((0, 0) if none)."""
    path = os.path.join(scenes_dir(data_root, scene_size, scene_seed), "meta.json")
    if not os.path.isfile(path):
        return 0, 0
    with open(path) as f:
        meta = json.load(f)
    if meta.get("seed") != scene_seed or meta.get("size") != [scene_size, scene_size] or meta.get("compose"):
        return 0, 0
    return int(meta.get("num_train", 0)), int(meta.get("num_val", 0))


def prepare_data(fashion_mnist_dir: Optional[str], data_root: str, *, num_train_scenes: int, num_val_scenes: int,
                 scene_size: int, scene_seed: int = 0, scenes: bool = True, progress: bool = True) -> SuiteData:
    """Load Fashion-MNIST and write (or reuse) the Fashion scenes.

    Scene ``i`` depends only on ``(seed, split, i)``, so a cached set with at
    least as many scenes is reused: the datasets read its first
    ``num_train_scenes`` / ``num_val_scenes`` files (mmengine's ``indices``).

    Args:
        fashion_mnist_dir: Folder with the idx files (None: the Debian package's folder or
            ``$FASHION_MNIST_DIR``). A missing folder raises ``FileNotFoundError`` saying how to get it.
        data_root: Cache folder; the scenes go to ``<data_root>/fashion_scenes/<size>px_seed<seed>``.
        num_train_scenes / num_val_scenes / scene_size / scene_seed: The scene set.
        scenes: Write the scenes (False when no segmentation pair runs).
        progress: Progress bar while generating.
    """
    directory = find_fashion_mnist(fashion_mnist_dir)
    train_x, train_y = load_fashion_mnist("train", directory)
    test_x, test_y = load_fashion_mnist("test", directory)
    root = None
    if scenes:
        root = scenes_dir(data_root, scene_size, scene_seed)
        have_train, have_val = cached_scenes(data_root, scene_size, scene_seed)
        if have_train < num_train_scenes or have_val < num_val_scenes:
            generate_fashion_scenes(root, num_train=max(have_train, num_train_scenes),
                                    num_val=max(have_val, num_val_scenes), seed=scene_seed,
                                    size=(scene_size, scene_size), fashion_mnist_dir=directory, progress=progress)
    return SuiteData(fashion_mnist_dir=directory, train_images=train_x, train_labels=train_y.astype(np.int64),
                     test_images=test_x, test_labels=test_y.astype(np.int64), scenes_root=root,
                     num_train_scenes=num_train_scenes, num_val_scenes=num_val_scenes, scene_size=scene_size,
                     scene_seed=scene_seed)
