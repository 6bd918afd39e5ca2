"""tools/check_dataset.py: layout, pairing, counts and label values of a prepared dataset."""
import os
import shutil

import mmseg
import numpy as np
import pytest
from PIL import Image

from kim_plugins.dry_run.dataset_fixtures import make_dataset_fixture

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
MMSEG_DATASETS = os.path.join(os.path.dirname(mmseg.__file__), ".mim", "configs", "_base_", "datasets")
# the mmseg dataset config that reads each fixture
CONFIGS = {"ade20k": "ade20k.py", "cityscapes": "cityscapes.py", "voc2012": "pascal_voc12_aug.py",
           "stare": "stare.py", "chase_db1": "chase_db1.py", "hrf": "hrf.py", "isaid": "isaid.py"}


@pytest.fixture(scope="module")
def tool():
    from kim_plugins.cli import check_dataset

    return check_dataset


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_fixture_layout_passes_with_only_split_size_warnings(tool, fixture_root, name, capsys):
    cfg = os.path.join(MMSEG_DATASETS, CONFIGS[name])
    rc = tool.main([cfg, "--data-root", os.path.join(fixture_root, name), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "[ERROR]" not in out
    # fixtures are smaller than the official splits: reported, but only as warnings
    assert "the official split has" in out
    assert tool.main([cfg, "--data-root", os.path.join(fixture_root, name), "--no-progress", "--strict"]) == 1


def test_missing_label_wrong_suffix_and_out_of_range_values_are_each_named(tool, tmp_path, capsys):
    root = make_dataset_fixture("stare", str(tmp_path))
    ann = os.path.join(root, "annotations", "training")
    os.remove(os.path.join(ann, "training_0000.ah.png"))                                   # missing label
    os.rename(os.path.join(ann, "training_0001.ah.png"), os.path.join(ann, "training_0001.png"))  # wrong suffix
    bad = np.asarray(Image.open(os.path.join(ann, "training_0002.ah.png"))).copy()
    bad[0, :3] = (2, 7, 254)                                                                # out of range
    Image.fromarray(bad).save(os.path.join(ann, "training_0002.ah.png"))
    rgb = np.stack([np.asarray(Image.open(os.path.join(ann, "training_0003.ah.png")))] * 3, -1)
    Image.fromarray(rgb).save(os.path.join(ann, "training_0003.ah.png"))                    # colour mask

    rc = tool.main([os.path.join(MMSEG_DATASETS, "stare.py"), "--data-root", root, "--splits", "train",
                    "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 1
    errors = [line for line in out.splitlines() if line.startswith("[ERROR]")]
    assert len(errors) == 4, out
    assert any("label of training_0000.png is missing" in e and "training_0000.ah.png" in e for e in errors)
    assert any("label of training_0001.png is missing" in e and "found training_0001.png (wrong suffix: "
               "seg_map_suffix is '.ah.png')" in e for e in errors)
    assert any("training_0002.ah.png has values [2, 7, 254] outside 0..1 and ignore 255" in e for e in errors)
    assert any("training_0003.ah.png has shape (48, 64, 3)" in e for e in errors)
    assert "FAILED: 4 error(s)" in out


def test_unconverted_binary_masks_and_missing_root_name_the_converter(tool, tmp_path, capsys):
    root = make_dataset_fixture("chase_db1", str(tmp_path))
    ann = os.path.join(root, "annotations", "validation")
    for f in os.listdir(ann):
        lab = np.asarray(Image.open(os.path.join(ann, f)))
        Image.fromarray((lab * 255).astype(np.uint8)).save(os.path.join(ann, f))  # raw 0/255 masks
    cfg = os.path.join(MMSEG_DATASETS, "chase_db1.py")
    assert tool.main([cfg, "--data-root", root, "--splits", "val", "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "hold 0/255, never 1: raw masks" in out and "chase_db1.py CHASEDB1.zip" in out

    shutil.rmtree(root)
    assert tool.main([cfg, "--data-root", root, "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert f"data_root '{root}' does not exist" in out and "dataset_converters/chase_db1.py" in out


def test_voc_list_file_naming_a_missing_image(tool, tmp_path, capsys):
    root = make_dataset_fixture("voc2012", str(tmp_path))
    os.remove(os.path.join(root, "JPEGImages", "val_0001.jpg"))
    rc = tool.main([os.path.join(MMSEG_DATASETS, "pascal_voc12_aug.py"), "--data-root", root, "--splits", "val",
                    "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 1 and "val_0001.jpg listed in val.txt is missing" in out
