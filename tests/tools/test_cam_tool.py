"""tools/cam.py end to end (tiny: a few training steps at 32 px)."""
import json
import os

from tests.tools import run_tool


def test_cam_tool_writes_side_by_side_plot_and_scores(tmp_path, capsys):
    out = run_tool("cam", ["resnet18", "--size", "32", "--output-stride", "8", "--train-steps", "3",
                           "--num-images", "2", "--eval-images", "8", "--steps", "4", "--sigma", "3",
                           "--out-dir", str(tmp_path)])
    nums = json.load(open(out["json"]))
    assert nums["sigma"] == [3.0, 3.0] and nums["weights"] == "trained 3 steps on Fashion-MNIST"
    assert set(nums["scores"]) == {"Grad-CAM", "Extended-CAM", "random order (control)"}
    assert all(0 <= v <= 1 for s in nums["scores"].values() for v in s.values())
    assert "| Extended-CAM |" in capsys.readouterr().out and os.path.getsize(out["png"]) > 5000
