"""Check a prepared dataset against what a config will read, before a long run starts.

Usage::

    python tools/check_dataset.py CONFIG [--data-root DIR] [--splits train val test]
        [--cfg-options KEY=VALUE ...] [--max-label-files N] [--strict]

For every dataset the config's train/val/test dataloaders read (through
``RepeatDataset``/``ConcatDataset`` wrappers), with the suffixes, class count
and ``reduce_zero_label`` of its mmseg dataset class, it checks:

- layout: ``data_root``, the image and label folders, the split list
  (``ann_file``, VOC) exist;
- pairing: every image has its label file, named as mmseg derives it
  (image name minus ``img_suffix`` plus ``seg_map_suffix``); a label stored
  under another suffix is reported by name with the suffix expected; label
  files whose names end in another suffix are reported;
- counts: images per split against the official split sizes (a warning: a
  subset can be intentional);
- labels: single-channel maps, of the image's size, with values in
  ``0..C-1`` (``0..C`` with ``reduce_zero_label``) or the ignore index 255;
  binary datasets whose masks hold 0/255 (not converted) are reported.

Prints a report naming each problem and the converter command that prepares
the dataset; exits 1 if there is an error (or a warning, with ``--strict``).
"""
from __future__ import annotations

import argparse
import bisect
import os
import sys
import os.path as osp
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
from mmengine.config import Config, ConfigDict, DictAction

from kim_plugins.config.inspect import dataset_leaves

IGNORE_INDEX = 255
_CONVERTERS = ("python $(python -c 'import mmseg,os;print(os.path.dirname(mmseg.__file__))')"
               "/.mim/tools/dataset_converters")

#: How each dataset is prepared (docs/datasets.md has the details).
PREPARE = {
    "ADE20KDataset": "unzip ADEChallengeData2016.zip into data/ade/ (no converter)",
    "CityscapesDataset": f"{_CONVERTERS}/cityscapes.py data/cityscapes --nproc 8  (needs cityscapesscripts)",
    "PascalVOCDataset": f"{_CONVERTERS}/voc_aug.py data/VOCdevkit data/VOCdevkit/VOCaug --nproc 8",
    "STAREDataset": f"{_CONVERTERS}/stare.py stare-images.tar labels-ah.tar labels-vk.tar",
    "ChaseDB1Dataset": f"{_CONVERTERS}/chase_db1.py CHASEDB1.zip",
    "HRFDataset": (f"{_CONVERTERS}/hrf.py healthy.zip healthy_manualsegm.zip glaucoma.zip "
                   "glaucoma_manualsegm.zip diabetic_retinopathy.zip diabetic_retinopathy_manualsegm.zip"),
    "iSAIDDataset": f"{_CONVERTERS}/isaid.py /path/to/iSAID  (896x896 patches, overlap 384)",
}

#: Official split sizes after the mmseg converters, keyed by (dataset class, split folder or list file).
OFFICIAL_COUNTS = {
    ("ADE20KDataset", "images/training"): 20210,
    ("ADE20KDataset", "images/validation"): 2000,
    ("CityscapesDataset", "leftImg8bit/train"): 2975,
    ("CityscapesDataset", "leftImg8bit/val"): 500,
    ("PascalVOCDataset", "train.txt"): 1464,
    ("PascalVOCDataset", "val.txt"): 1449,
    ("PascalVOCDataset", "aug.txt"): 10582 - 1464,
    ("PascalVOCDataset", "trainaug.txt"): 10582,
    ("STAREDataset", "images/training"): 10,
    ("STAREDataset", "images/validation"): 10,
    ("ChaseDB1Dataset", "images/training"): 20,
    ("ChaseDB1Dataset", "images/validation"): 8,
    ("HRFDataset", "images/training"): 15,
    ("HRFDataset", "images/validation"): 30,
    ("iSAIDDataset", "img_dir/train"): 33978,  # 896x896 patches, overlap 384 (converter defaults)
    ("iSAIDDataset", "img_dir/val"): 11644,
}


@dataclass
class Finding:
    """One problem: ``level`` is ``'ERROR'`` or ``'WARNING'``."""

    level: str
    split: str
    message: str

    def __str__(self) -> str:
        return f"[{self.level}] {self.split}: {self.message}"


@dataclass
class DatasetInfo:
    split: str
    type: str
    data_root: str
    img_dir: str
    ann_dir: Optional[str]
    ann_file: str
    img_suffix: str
    seg_map_suffix: str
    num_classes: int
    reduce_zero_label: bool
    ignore_index: int
    build_error: str = ""


def dataset_infos(cfg: Config, splits: Sequence[str], data_root: Optional[str] = None) -> List[DatasetInfo]:
    """The datasets a config reads, as mmseg's own classes resolve them (built with ``lazy_init``)."""
    import kim_plugins.mmseg  # noqa: F401  registrations (kim_plugins datasets, if any)
    from mmengine.registry import init_default_scope
    from mmseg.registry import DATASETS

    init_default_scope(cfg.get("default_scope", "mmseg"))
    infos, seen = [], set()
    for split in splits:
        loader = cfg.get(f"{split}_dataloader")
        if not loader:
            continue
        for leaf in dataset_leaves(loader["dataset"]):
            leaf = ConfigDict(leaf).copy()
            if data_root is not None:
                leaf.data_root = data_root
            leaf.lazy_init = True
            leaf.pipeline = []
            try:
                ds = DATASETS.build(leaf)
            except (AssertionError, OSError) as e:  # some classes assert their folders exist
                root = leaf.get("data_root") or ""
                prefix = leaf.get("data_prefix") or {}
                info = DatasetInfo(split=split, type=str(leaf.type), data_root=root,
                                   img_dir=osp.join(root, prefix.get("img_path", "")),
                                   ann_dir=osp.join(root, prefix["seg_map_path"]) if "seg_map_path" in prefix
                                   else None, ann_file="", img_suffix="", seg_map_suffix="", num_classes=0,
                                   reduce_zero_label=False, ignore_index=IGNORE_INDEX,
                                   build_error=f"{type(e).__name__}: {e}")
                infos.append(info)
                continue
            info = DatasetInfo(split=split, type=type(ds).__name__, data_root=ds.data_root or "",
                               img_dir=ds.data_prefix.get("img_path", ""), ann_dir=ds.data_prefix.get("seg_map_path"),
                               ann_file=ds.ann_file or "", img_suffix=ds.img_suffix,
                               seg_map_suffix=ds.seg_map_suffix, num_classes=len(ds.metainfo["classes"]),
                               reduce_zero_label=bool(ds.reduce_zero_label), ignore_index=int(ds.ignore_index))
            key = (info.type, info.img_dir, info.ann_dir, info.ann_file)
            if key not in seen:
                seen.add(key)
                infos.append(info)
    return infos


def _list_files(folder: str) -> List[str]:
    out = []
    for dirpath, _, files in os.walk(folder):
        for f in files:
            out.append(osp.relpath(osp.join(dirpath, f), folder))
    return sorted(out)


def _with_prefix(sorted_files: Sequence[str], stem: str) -> List[str]:
    """Files named ``stem`` + a suffix starting with '.', '_' or '-' (a label stored under another suffix)."""
    out = []
    i = bisect.bisect_left(sorted_files, stem)
    while i < len(sorted_files) and sorted_files[i].startswith(stem):
        rest = sorted_files[i][len(stem):]
        if rest[:1] in (".", "_", "-"):
            out.append(sorted_files[i])
        i += 1
    return out


def _label_stem(rel: str, img_suffix: str) -> str:
    return rel[: -len(img_suffix)] if img_suffix and rel.endswith(img_suffix) else rel


def check_dataset(info: DatasetInfo, max_label_files: Optional[int] = None,
                  progress: bool = False) -> Tuple[List[Finding], Dict[str, int]]:
    """Check one dataset; return the findings and counts (images, labels checked)."""
    from PIL import Image

    split = f"{info.split} ({info.type}, {info.img_dir or '.'})"
    found: List[Finding] = []

    def err(msg: str) -> None:
        found.append(Finding("ERROR", split, msg))

    def warn(msg: str) -> None:
        found.append(Finding("WARNING", split, msg))

    prepare = PREPARE.get(info.type)
    hint = f" Prepare it with: {prepare}" if prepare else ""
    if not osp.isdir(info.data_root):
        err(f"data_root {info.data_root!r} does not exist.{hint}")
        return found, dict(images=0, labels_checked=0)
    if not osp.isdir(info.img_dir):
        err(f"image folder {info.img_dir!r} does not exist.{hint}")
        return found, dict(images=0, labels_checked=0)
    if info.ann_dir is not None and not osp.isdir(info.ann_dir):
        err(f"label folder {info.ann_dir!r} does not exist.{hint}")
        return found, dict(images=0, labels_checked=0)
    if info.build_error:
        err(f"mmseg cannot build the dataset: {info.build_error}")
        return found, dict(images=0, labels_checked=0)

    # samples, exactly as BaseSegDataset.load_data_list derives them
    if info.ann_file:
        if not osp.isfile(info.ann_file):
            err(f"split list {info.ann_file!r} does not exist.{hint}")
            return found, dict(images=0, labels_checked=0)
        with open(info.ann_file) as f:
            stems = [line.strip() for line in f if line.strip()]
        samples = [(s + info.img_suffix, s) for s in stems]
        missing_img = [rel for rel, _ in samples if not osp.isfile(osp.join(info.img_dir, rel))]
        for rel in missing_img[:20]:
            err(f"image {osp.join(info.img_dir, rel)} listed in {osp.basename(info.ann_file)} is missing")
        if len(missing_img) > 20:
            err(f"... and {len(missing_img) - 20} more listed images are missing")
        count_key = osp.basename(info.ann_file)
    else:
        all_imgs = _list_files(info.img_dir)
        samples = [(rel, _label_stem(rel, info.img_suffix)) for rel in all_imgs if rel.endswith(info.img_suffix)]
        others = Counter(osp.splitext(rel)[1] for rel in all_imgs if not rel.endswith(info.img_suffix))
        if not samples and others:
            err(f"no image ends with img_suffix {info.img_suffix!r}; found suffixes {dict(others)}")
        elif others:
            warn(f"{sum(others.values())} file(s) in the image folder do not end with {info.img_suffix!r} "
                 f"and are ignored: {dict(others)}")
        count_key = osp.relpath(info.img_dir, info.data_root)
    n = len(samples)
    if n == 0:
        err(f"no samples found.{hint}")
    official = OFFICIAL_COUNTS.get((info.type, count_key))
    if official is not None and n != official:
        warn(f"{n} images, the official split has {official}")

    if info.ann_dir is None:
        return found, dict(images=n, labels_checked=0)

    # pairing and suffixes
    label_files = _list_files(info.ann_dir)
    label_set = set(label_files)
    expected = {stem + info.seg_map_suffix for _, stem in samples}
    to_read = []
    for rel, stem in samples:
        lab = stem + info.seg_map_suffix
        if lab in label_set:
            to_read.append((rel, lab))
            continue
        near = [f for f in _with_prefix(label_files, stem) if f != lab]
        if near:
            err(f"label of {rel} is missing: expected {osp.join(info.ann_dir, lab)}, found "
                f"{', '.join(near)} (wrong suffix: seg_map_suffix is {info.seg_map_suffix!r})")
        else:
            err(f"label of {rel} is missing: expected {osp.join(info.ann_dir, lab)}")
    if not info.ann_file:
        orphans = [f for f in label_files if f.endswith(info.seg_map_suffix) and f not in expected]
        for f in orphans[:20]:
            warn(f"label file {osp.join(info.ann_dir, f)} has no image")
        if len(orphans) > 20:
            warn(f"... and {len(orphans) - 20} more label files without image")

    # label values
    num = info.num_classes + (1 if info.reduce_zero_label else 0)
    allowed = set(range(num)) | {info.ignore_index}
    seen_values: Set[int] = set()
    if max_label_files is not None:
        to_read = to_read[:max_label_files]
    bar = None
    if progress and to_read:
        from mmengine.utils import ProgressBar
        bar = ProgressBar(len(to_read), file=sys.stdout)
    for rel, lab in to_read:
        path = osp.join(info.ann_dir, lab)
        if bar is not None:
            bar.update()
        try:
            with Image.open(path) as im:
                arr = np.asarray(im)
            img_path = osp.join(info.img_dir, rel)
            img_size = None
            if osp.isfile(img_path):  # a missing listed image is reported above
                with Image.open(img_path) as im:
                    img_size = im.size  # (W, H), header only
        except (OSError, ValueError) as e:
            err(f"cannot read {path} or its image: {e}")
            continue
        if arr.ndim != 2:
            err(f"label map {path} has shape {arr.shape}: expected one channel of class indices "
                f"(a colour mask? run the converter).{hint}")
            continue
        if img_size is not None and (arr.shape[1], arr.shape[0]) != img_size:
            err(f"label map {path} is {arr.shape[1]}x{arr.shape[0]} but its image is {img_size[0]}x{img_size[1]}")
        values = set(np.unique(arr).tolist())
        seen_values |= values
        bad = sorted(values - allowed)
        if bad:
            shown = bad if len(bad) <= 10 else bad[:10] + ["..."]
            err(f"label map {path} has values {shown} outside 0..{num - 1} and ignore {info.ignore_index}"
                + (" (reduce_zero_label: 0 is 'other')" if info.reduce_zero_label else ""))
    if bar is not None:
        print()
    if info.num_classes == 2 and 1 not in seen_values and info.ignore_index in seen_values:
        err(f"the binary label maps hold 0/{info.ignore_index}, never 1: raw masks, not class indices.{hint}")
    return found, dict(images=n, labels_checked=len(to_read))


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Check a prepared dataset's layout, counts and label values "
                                            "against a config")
    p.add_argument("config", help="the config whose datasets to check")
    p.add_argument("--data-root", help="check this folder instead of the config's data_root")
    p.add_argument("--splits", nargs="+", default=["train", "val", "test"], choices=["train", "val", "test"])
    p.add_argument("--max-label-files", type=int, default=None,
                   help="read at most this many label maps per dataset (default: all)")
    p.add_argument("--strict", action="store_true", help="warnings (e.g. split sizes) also fail")
    p.add_argument("--cfg-options", nargs="+", action=DictAction, help="config overrides (xxx=yyy)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    """Run the checks; return the exit code (0 fine, 1 problems)."""
    args = parse_args(argv)
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    infos = dataset_infos(cfg, args.splits, args.data_root)
    if not infos:
        print(f"{args.config} has no {'/'.join(args.splits)} dataloader")
        return 1
    findings: List[Finding] = []
    for info in infos:
        print(f"checking {info.split}: {info.type} images {info.img_dir} labels {info.ann_dir} "
              f"{'list ' + info.ann_file if info.ann_file else ''}".rstrip())
        f, counts = check_dataset(info, args.max_label_files, progress=not args.no_progress)
        print(f"  {counts['images']} images, {counts['labels_checked']} label maps read, "
              f"{sum(x.level == 'ERROR' for x in f)} error(s), {sum(x.level == 'WARNING' for x in f)} warning(s)")
        findings += f
    for f in findings:
        print(f)
    errors = sum(f.level == "ERROR" for f in findings)
    warnings = len(findings) - errors
    failed = errors > 0 or (args.strict and warnings > 0)
    print(f"{'FAILED' if failed else 'OK'}: {errors} error(s), {warnings} warning(s)")
    return 1 if failed else 0
