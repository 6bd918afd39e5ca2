"""tools/dead_pixel_test.py end to end on CPU at tiny sizes."""
import json
import os

import pytest

from tests.tools import run_tool


def test_dead_pixel_tool_timm_writes_table_plot_and_numbers(tmp_path, capsys):
    from kim_plugins.dry_run.dataset_fixtures import make_dataset_fixture
    root = make_dataset_fixture("ade20k", str(tmp_path / "data"), num_train=2, num_val=1)
    out = run_tool("dead_pixel_test", ["resnet18", "--size", "32", "--images", os.path.join(root, "images"),
                                       "--num-images", "2", "--out-dir", str(tmp_path / "out")])
    nums = json.load(open(out["json"]))
    assert nums["init"] == "fresh" and nums["maxpool"] is True and nums["weights"].startswith("untrained")
    assert [c["name"] for c in nums["changes"]][:2] == ["conv1", "maxpool"]
    assert list(nums["before"]) == ["act1", "layer1", "layer2", "layer3", "layer4"]
    assert all(v["ratio"] >= 1.0 for v in nums["before"].values())
    printed = capsys.readouterr().out
    assert "| stage | lattice ratio before |" in printed and "| layer4 |" in printed
    assert os.path.getsize(out["png"]) > 5000 and open(out["md"]).read().count("\n| ") >= 6


def test_dead_pixel_tool_pad_without_maxpool_keeps_the_erf(tmp_path):
    from kim_plugins.dry_run.dataset_fixtures import make_dataset_fixture
    root = make_dataset_fixture("ade20k", str(tmp_path / "data"), num_train=2, num_val=1)
    out = run_tool("dead_pixel_test", ["resnet18", "--size", "32", "--images", os.path.join(root, "images"),
                                       "--num-images", "2", "--init", "pad", "--no-maxpool",
                                  "--out-dir", str(tmp_path / "out")])
    nums = out["numbers"]
    for stage in nums["before"]:  # zero-padded kernels compute the same function: the same ERF
        assert nums["after"][stage]["ratio"] == pytest.approx(nums["before"][stage]["ratio"], rel=1e-5)
