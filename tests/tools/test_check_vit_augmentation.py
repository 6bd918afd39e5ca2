"""tools/check_vit_augmentation.py on real Fashion-MNIST (small)."""
import json
import os

import pytest

from tests.tools import run_tool


def test_deit_recipe_is_flagged_measured_and_strict_fails(tmp_path, capsys):
    from kim_plugins.cli import check_vit_augmentation as tool

    args = tmp_path / "args.yaml"
    args.write_text("mixup: 0.8\ncutmix: 1.0\nreprob: 0.25\nremode: const\nmodel: vit_small_patch16_224\n")
    out = run_tool("check_vit_augmentation", [str(args), "--num-images", "1000", "--out-dir", str(tmp_path / "out")])
    assert [f.setting for f in out["findings"]] == ["mixup", "remode"]
    ours, guide = out["measured"]["your settings"], out["measured"]["guideline"]
    assert ours["total"] < 0.93 and abs(guide["total"] - 1) < 0.02
    printed = capsys.readouterr().out
    assert "| warning | `mixup` | `0.8` |" in printed and "| guideline |" in printed
    assert os.path.getsize(out["png"]) > 5000 and json.load(open(out["json"]))["findings"][0]["setting"] == "mixup"
    with pytest.raises(SystemExit) as e:
        tool.main(["mixup=0.8", "--num-images", "0", "--strict", "--out-dir", str(tmp_path / "o2")])
    assert e.value.code == 1


def test_mixup_alone_matches_the_closed_form(tmp_path):
    out = run_tool("check_vit_augmentation", ["mixup=0.8", "--num-images", "4000", "--out-dir", str(tmp_path)])
    r = out["measured"]["your settings"]
    assert r["within"] == pytest.approx(r["expected_within"], rel=0.03)  # 1.8 / 2.6 = 0.692


def test_guideline_settings_pass(tmp_path):
    out = run_tool("check_vit_augmentation", ["mixup=0.0", "cutmix=1.0", "reprob=0.25", "remode='pixel'",
                                              "--num-images", "0", "--strict", "--out-dir", str(tmp_path)])
    assert out["findings"] == [] and out["png"] is None
