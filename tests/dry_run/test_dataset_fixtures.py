"""Every dataset fixture loads through mmseg's own dataset class and base config."""
import os

import numpy as np
import pytest

from kim_plugins.dry_run.dataset_fixtures import FIXTURES, make_dataset_fixture

import mmseg

BASE_CONFIG = {
    "ade20k": "ade20k.py",
    "cityscapes": "cityscapes.py",
    "voc2012": "pascal_voc12_aug.py",
    "stare": "stare.py",
    "chase_db1": "chase_db1.py",
    "hrf": "hrf.py",
    "isaid": "isaid.py",
    "nyu": "nyu.py",
}


def _build(loader_cfg, data_root, depth=False):
    from mmengine.registry import init_default_scope
    from mmseg.registry import DATASETS

    from kim_plugins.config.rewrite import walk_dicts

    init_default_scope("mmseg")
    ds_cfg = loader_cfg.dataset

    def fix(d):
        if "data_root" in d:
            d["data_root"] = data_root
            d["pipeline"] = [dict(type="LoadImageFromFile"),
                             dict(type="LoadDepthAnnotation") if depth else dict(type="LoadAnnotations")]
        if d.get("type") == "RepeatDataset":
            d["times"] = 1

    walk_dicts(ds_cfg, fix)
    return DATASETS.build(ds_cfg)


def test_every_fixture_is_checked_against_its_dataset_class():
    assert set(FIXTURES) == set(BASE_CONFIG) | {"fashion_scenes"}


@pytest.mark.parametrize("name", sorted(BASE_CONFIG))
def test_fixture_loads_through_mmseg_class(name, fixture_root):
    from mmengine.config import Config

    spec = FIXTURES[name]
    cfg = Config.fromfile(os.path.join(os.path.dirname(mmseg.__file__), ".mim", "configs", "_base_",
                                       "datasets", BASE_CONFIG[name]))
    data_root = os.path.join(fixture_root, name)
    train = _build(cfg.train_dataloader, data_root, spec.depth)
    val = _build(cfg.val_dataloader, data_root, spec.depth)
    # VOC aug concatenates the train list and the aug list (same stems here).
    expected_train = 2 * spec.num_train if name == "voc2012" else spec.num_train
    assert len(train) == expected_train
    assert len(val) == spec.num_val
    assert type(val).__name__ == spec.mmseg_class

    if spec.depth:  # millimetres in [min, max], about a fifth unmeasured (0)
        depth = np.concatenate([val[i]["gt_depth_map"].ravel() for i in range(len(val))])
        assert val[0]["img"].shape[:2] == spec.size and depth.dtype == np.float32
        lo, hi = spec.label_values
        assert 0.05 < (depth == 0).mean() < 0.5 and lo <= depth[depth > 0].min() and depth.max() <= hi
        return
    seen = set()
    for i in range(len(val)):
        sample = val[i]
        assert sample["img"].shape[:2] == spec.size
        seen |= set(np.unique(sample["gt_seg_map"]).tolist())
    if name == "ade20k":
        # reduce_zero_label: 0 ("other") -> 255, k -> k - 1 for the 150 classes.
        expected = set(range(150)) | {255}
    else:
        expected = set(spec.label_values)
    assert seen == expected, sorted(seen ^ expected)


def test_fixture_is_deterministic(tmp_path):
    a = make_dataset_fixture("stare", str(tmp_path / "a"), seed=3)
    b = make_dataset_fixture("stare", str(tmp_path / "b"), seed=3)
    from PIL import Image
    for rel in ("images/training/training_0000.png", "annotations/validation/validation_0001.ah.png"):
        assert np.array_equal(np.asarray(Image.open(os.path.join(a, rel))), np.asarray(Image.open(os.path.join(b, rel))))


def test_unknown_fixture_name_is_a_clear_error(tmp_path):
    with pytest.raises(KeyError, match="unknown dataset fixture 'ade'"):
        make_dataset_fixture("ade", str(tmp_path))


def test_tiny_auto_writes_a_fashion_scenes_fixture_that_our_dataset_class_reads(tmp_path):
    """``--tiny auto`` on a config of kim_plugins' own FashionScenesDataset (the main job's data)."""
    import kim_plugins.mmseg  # noqa: F401  registers FashionScenesDataset
    from kim_plugins.dry_run.tiny import tiny_data_root
    from kim_plugins.suite.seg import seg_runner_cfg

    cfg = seg_runner_cfg(dict(type="EncoderDecoder"), "data/fashion_scenes", 64, 64, str(tmp_path / "work"),
                         iters=1, batch_size=2, lr=0.01, seed=0)
    root = tiny_data_root(cfg, "auto")
    assert root == os.path.join(str(tmp_path / "work"), "tiny_data", "rank0", "fashion_scenes")
    spec = FIXTURES["fashion_scenes"]
    seen = set()
    for key, count in (("train_dataloader", spec.num_train), ("val_dataloader", spec.num_val)):
        ds = _build(cfg[key], root)
        assert type(ds).__name__ == "FashionScenesDataset" and len(ds) == count
        for i in range(len(ds)):
            seen |= set(np.unique(ds[i]["gt_seg_map"]).tolist())
    assert seen == set(range(11))  # background 0 and the ten garment classes, no reduce_zero_label
