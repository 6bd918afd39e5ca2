"""Tiny on-disk datasets in the exact mmseg layouts of every dataset kim_plugins evaluates on.

None of ADE20K, Cityscapes, PASCAL VOC 2012 (+aug), STARE, CHASE_DB1, HRF,
iSAID or NYU Depth V2 can be downloaded on the project's machines, so the tests (and anyone
who wants to dry-run a config) use these fixtures: a few small images and
label maps written with each dataset's directory layout, file suffixes and
label conventions, so that mmseg's own dataset classes and pipelines read them
unchanged; ``fashion_scenes`` is the layout of kim_plugins' own
``FashionScenesDataset``.

Images are smooth random colour fields; labels are a random blob map with
values drawn from the dataset's label set, so every class of a fixture is
deterministic for a seed. Nothing here imports mmseg.

Usage::

    from kim_plugins.dry_run.dataset_fixtures import make_dataset_fixture
    root = make_dataset_fixture('ade20k', '/tmp/fixtures')  # -> '/tmp/fixtures/ade20k'

or let the tools write the one a config needs: ``tools/train.py CONFIG --tiny auto``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

__all__ = ["FixtureSpec", "FIXTURES", "fixture_for_config", "make_dataset_fixture", "make_all_fixtures"]


@dataclass(frozen=True)
class FixtureSpec:
    """Layout and label convention of one dataset.

    Attributes:
        name: Fixture key (also the folder name under the output root).
        mmseg_class: Name of the mmseg dataset class that reads it.
        img_dir: Per-split image folder, ``{split}`` substituted.
        ann_dir: Per-split label folder, ``{split}`` substituted.
        img_suffix: Image file suffix.
        seg_suffix: Label file suffix.
        splits: Split names as the dataset spells them (train, val).
        label_values: Values a label map may hold (ignore values included).
        num_train: Training samples written.
        num_val: Validation samples written.
        size: (height, width) of every image.
        subdirs: City-like sub-folders (Cityscapes) the samples are spread over.
        ann_files: For list-file datasets (VOC): file -> (split, list of sample
            indices of that split); the files are written under
            ``ImageSets/Segmentation``.
        shared_folders: True when train and val share one image/label folder
            and are told apart by list files (VOC).
        extra_ann_dirs: More label folders written with the same maps (VOC's
            ``SegmentationClassAug``).
        depth: The labels are depth maps (NYU: uint16 PNG in millimetres, 0 =
            no measurement) instead of class maps; ``label_values`` is then
            (min, max) depth in millimetres.
    """

    name: str
    mmseg_class: str
    img_dir: str
    ann_dir: str
    img_suffix: str
    seg_suffix: str
    splits: Tuple[str, str]
    label_values: Tuple[int, ...]
    num_train: int = 4
    num_val: int = 2
    size: Tuple[int, int] = (48, 64)
    subdirs: Tuple[str, ...] = ()
    shared_folders: bool = False
    extra_ann_dirs: Tuple[str, ...] = ()
    depth: bool = False


def _range(n: int, ignore: Optional[int] = None) -> Tuple[int, ...]:
    return tuple(range(n)) + ((ignore,) if ignore is not None else ())


FIXTURES: Dict[str, FixtureSpec] = {
    # ADE20K: 0 = "other", reduced to 255 by reduce_zero_label; classes 1..150.
    "ade20k": FixtureSpec("ade20k", "ADE20KDataset", "images/{split}", "annotations/{split}", ".jpg", ".png",
                          ("training", "validation"), _range(151)),
    "cityscapes": FixtureSpec("cityscapes", "CityscapesDataset", "leftImg8bit/{split}", "gtFine/{split}",
                              "_leftImg8bit.png", "_gtFine_labelTrainIds.png", ("train", "val"), _range(19, 255),
                              size=(32, 64), subdirs=("aachen", "bremen")),
    # VOC: one folder for all splits, train/val told apart by ImageSets/Segmentation/*.txt;
    # 255 marks object boundaries. aug.txt + SegmentationClassAug mirror the SBD-augmented split.
    "voc2012": FixtureSpec("voc2012", "PascalVOCDataset", "JPEGImages", "SegmentationClass", ".jpg", ".png",
                           ("train", "val"), _range(21, 255), shared_folders=True,
                           extra_ann_dirs=("SegmentationClassAug",)),
    "stare": FixtureSpec("stare", "STAREDataset", "images/{split}", "annotations/{split}", ".png", ".ah.png",
                         ("training", "validation"), (0, 1)),
    "chase_db1": FixtureSpec("chase_db1", "ChaseDB1Dataset", "images/{split}", "annotations/{split}", ".png",
                             "_1stHO.png", ("training", "validation"), (0, 1)),
    "hrf": FixtureSpec("hrf", "HRFDataset", "images/{split}", "annotations/{split}", ".png", ".png",
                       ("training", "validation"), (0, 1)),
    # iSAID: 16 classes (0 = background), 255 = ignore.
    "isaid": FixtureSpec("isaid", "iSAIDDataset", "img_dir/{split}", "ann_dir/{split}", ".png",
                         "_instance_color_RGB.png", ("train", "val"), _range(16, 255)),
    # NYU Depth V2 (mmseg's NYUDataset): depth in mm as uint16 PNG, 0 = no measurement; the
    # stems carry a scene class as in the real files ("bedroom_0001").
    "nyu": FixtureSpec("nyu", "NYUDataset", "images/{split}", "annotations/{split}", ".jpg", ".png",
                       ("train", "test"), (500, 9500), depth=True),
    # kim_plugins' own Fashion scenes (kim_plugins.mmseg.datasets.FashionScenesDataset): 0 = background,
    # 1..10 the Fashion-MNIST classes; the layout of kim_plugins.data.fashion_scenes.
    "fashion_scenes": FixtureSpec("fashion_scenes", "FashionScenesDataset", "img_dir/{split}", "ann_dir/{split}",
                                  ".png", ".png", ("train", "val"), _range(11)),
}


def fixture_for_config(cfg: Any) -> str:
    """The fixture in the layout of a config's training data (``train_dataloader.dataset``).

    The dataset classes are read through ``RepeatDataset``/``ConcatDataset``
    wrappers (:func:`kim_plugins.config.inspect.dataset_leaves`).

    Raises:
        ValueError: No training dataset, or its classes are not all one
            fixture's (the message lists the classes that have one).
    """
    from kim_plugins.config.inspect import dataset_leaves

    by_class = {s.mmseg_class: name for name, s in FIXTURES.items()}
    loader = cfg.get("train_dataloader") if hasattr(cfg, "get") else None
    if not loader or not loader.get("dataset"):
        raise ValueError("the config has no train_dataloader.dataset to take a dataset fixture from")
    types = sorted({str(leaf["type"]) for leaf in dataset_leaves(loader["dataset"])})
    names = {by_class.get(t) for t in types}
    if len(names) != 1 or None in names:
        raise ValueError(f"no dataset fixture for {types}; fixtures exist for {sorted(by_class)}")
    return names.pop()


def _smooth_noise(rng: np.random.Generator, h: int, w: int, channels: int, cell: int = 8) -> np.ndarray:
    """Blocky-then-smoothed noise in [0, 1): a cheap stand-in for natural image structure."""
    gh, gw = -(-h // cell) + 1, -(-w // cell) + 1
    coarse = rng.random((gh, gw, channels))
    ys = np.linspace(0, gh - 1, h)
    xs = np.linspace(0, gw - 1, w)
    y0 = np.floor(ys).astype(int).clip(0, gh - 2)
    x0 = np.floor(xs).astype(int).clip(0, gw - 2)
    fy = (ys - y0)[:, None, None]
    fx = (xs - x0)[None, :, None]
    a = coarse[y0][:, x0]
    b = coarse[y0][:, x0 + 1]
    c = coarse[y0 + 1][:, x0]
    d = coarse[y0 + 1][:, x0 + 1]
    return (a * (1 - fx) * (1 - fy) + b * fx * (1 - fy) + c * (1 - fx) * fy + d * fx * fy)


def _label_map(rng: np.random.Generator, h: int, w: int, values: Sequence[int]) -> np.ndarray:
    """A map of random blobs whose values come from ``values``; every value appears when space allows."""
    field_ = _smooth_noise(rng, h, w, len(values), cell=6)
    lab = np.asarray(values, dtype=np.int64)[field_.argmax(-1)]
    # Guarantee presence of each value in a thin stripe so label-value checks see the full set.
    flat = lab.reshape(-1)
    if flat.size >= 4 * len(values):
        pos = rng.choice(flat.size, size=len(values), replace=False)
        flat[pos] = values
    return lab.astype(np.uint8)


def _depth_map(rng: np.random.Generator, h: int, w: int, depth_range_mm: Sequence[int]) -> np.ndarray:
    """Smooth depth in millimetres (uint16) with about 15 % unmeasured (0) pixels in blobs, as NYU's raw maps."""
    lo, hi = depth_range_mm
    depth = lo + (hi - lo) * _smooth_noise(rng, h, w, 1, cell=12)[..., 0]
    holes = _smooth_noise(rng, h, w, 1, cell=5)[..., 0] < 0.3
    depth[holes] = 0
    return np.round(depth).astype(np.uint16)


def _write(path: str, array: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = Image.fromarray(array)
    if path.endswith(".jpg"):
        img.save(path, quality=95)
    else:
        img.save(path)


def make_dataset_fixture(name: str, root: str, seed: int = 0, num_train: Optional[int] = None,
                         num_val: Optional[int] = None, size: Optional[Tuple[int, int]] = None) -> str:
    """Write one dataset fixture under ``root/name`` and return that folder (the config's ``data_root``).

    Args:
        name: One of :data:`FIXTURES` (``ade20k``, ``cityscapes``, ``voc2012``,
            ``stare``, ``chase_db1``, ``hrf``, ``isaid``, ``nyu``,
            ``fashion_scenes``).
        root: Parent folder.
        seed: Seed of the images and labels.
        num_train: Override of the number of training samples.
        num_val: Override of the number of validation samples.
        size: Override of (height, width).

    Returns:
        The fixture's data root.

    Raises:
        KeyError: Unknown ``name``.
    """
    if name not in FIXTURES:
        raise KeyError(f"unknown dataset fixture {name!r}; choose from {sorted(FIXTURES)}")
    spec = FIXTURES[name]
    n_train = spec.num_train if num_train is None else num_train
    n_val = spec.num_val if num_val is None else num_val
    h, w = spec.size if size is None else size
    data_root = os.path.join(root, name)
    rng = np.random.default_rng(seed)
    lists: Dict[str, List[str]] = {}
    for split, count in zip(spec.splits, (n_train, n_val)):
        names = []
        for i in range(count):
            stem = f"bedroom_{i:04d}" if spec.depth else f"{split}_{i:04d}"
            sub = ""
            if spec.subdirs:
                city = spec.subdirs[i % len(spec.subdirs)]
                stem = f"{city}_{i:06d}_{19 if split == 'val' else 0:06d}"
                sub = city
            img = (255 * _smooth_noise(rng, h, w, 3)).astype(np.uint8)
            lab = (_depth_map if spec.depth else _label_map)(rng, h, w, spec.label_values)
            img_dir = spec.img_dir.format(split=split)
            ann_dir = spec.ann_dir.format(split=split)
            _write(os.path.join(data_root, img_dir, sub, stem + spec.img_suffix), img)
            _write(os.path.join(data_root, ann_dir, sub, stem + spec.seg_suffix), lab)
            for extra in spec.extra_ann_dirs:
                _write(os.path.join(data_root, extra, sub, stem + spec.seg_suffix), lab)
            names.append(stem)
        lists[split] = names
    if spec.shared_folders:
        list_dir = os.path.join(data_root, "ImageSets", "Segmentation")
        os.makedirs(list_dir, exist_ok=True)
        files = {"train.txt": lists["train"], "val.txt": lists["val"], "trainval.txt": lists["train"] + lists["val"],
                 "aug.txt": lists["train"]}
        for fname, stems in files.items():
            with open(os.path.join(list_dir, fname), "w") as f:
                f.write("\n".join(stems) + "\n")
    return data_root


def make_all_fixtures(root: str, seed: int = 0) -> Dict[str, str]:
    """Write every fixture under ``root``; return name -> data root."""
    return {name: make_dataset_fixture(name, root, seed=seed) for name in FIXTURES}
