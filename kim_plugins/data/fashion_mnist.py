"""Read Fashion-MNIST from its standard idx files (the Debian package ``dataset-fashion-mnist``).

Xiao, Rasul and Vollgraf, "Fashion-MNIST: a Novel Image Dataset for Benchmarking
Machine Learning Algorithms" (arXiv 1708.07747): 60k training and 10k test
greyscale 28x28 images of 10 garment classes.
"""
from __future__ import annotations

import gzip
import os
from typing import Optional, Tuple

import numpy as np

__all__ = ["CLASSES", "DEFAULT_DIR", "find_fashion_mnist", "load_fashion_mnist"]

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot")
DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
HOW_TO_GET = (
    "Fashion-MNIST was not found. Install it with `apt-get install dataset-fashion-mnist` "
    f"(files land in {DEFAULT_DIR}), or pass --fashion-mnist DIR pointing to a folder with the four "
    "standard idx files (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
    "t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz])."
)


def _path(directory: str, stem: str) -> Optional[str]:
    for name in (stem + ".gz", stem):
        p = os.path.join(directory, name)
        if os.path.isfile(p):
            return p
    return None


def find_fashion_mnist(directory: Optional[str] = None) -> str:
    """Return the folder holding the idx files, or raise ``FileNotFoundError`` saying how to get them."""
    candidates = [directory] if directory else [os.environ.get("FASHION_MNIST_DIR"), DEFAULT_DIR]
    for d in candidates:
        if d and all(_path(d, s) for pair in _FILES.values() for s in pair):
            return d
    where = directory or f"{DEFAULT_DIR} (or $FASHION_MNIST_DIR)"
    raise FileNotFoundError(f"{HOW_TO_GET} Looked in: {where}.")


def _read_idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    ndim = magic & 0xFF
    if magic >> 8 != 0x08:  # unsigned byte
        raise ValueError(f"{path}: not an unsigned-byte idx file (magic {magic:#x})")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(split: str, directory: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Load one split.

    Args:
        split: ``'train'`` (60k) or ``'test'`` (10k).
        directory: Folder with the idx files (default: the Debian package's).

    Returns:
        ``(images, labels)``: uint8 arrays of shape (N, 28, 28) and (N,).
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    d = find_fashion_mnist(directory)
    images = _read_idx(_path(d, _FILES[split][0]))
    labels = _read_idx(_path(d, _FILES[split][1]))
    if len(images) != len(labels):
        raise ValueError(f"{d}: {len(images)} images but {len(labels)} labels in split {split!r}")
    return images, labels
