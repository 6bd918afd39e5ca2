"""tools/train.py -> tools/test.py -> tools/summarize.py end to end on a dataset fixture."""
import csv
import json
import os
import pickle
import statistics

import pytest

from kim_plugins.cli import summarize, train
from tests.tools import run_tool

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SMOKE = os.path.join(REPO, "configs", "smoke", "fcn_r18-tiny-d8_1xb2-4i_stare-32x32.py")
BASE_NAME = "fcn_r18-tiny-d8_1xb2-4i_stare-32x32"
PLUGIN_NAME = "fcn-sap_r18-tiny-d8_1xb2-4i_stare-32x32"


@pytest.fixture(scope="module")
def runs(fixture_root, tmp_path_factory):
    """Two seeds of a baseline and of a plugin config, trained by tools/train.py --tiny; one tested."""
    root = tmp_path_factory.mktemp("runs")
    plugin_cfg = root / f"{PLUGIN_NAME}.py"
    # the plugin: SAP in the backbone's shortcut pooling (stochastic_pooling), otherwise the smoke config
    plugin_cfg.write_text(f"_base_ = [{SMOKE!r}]\nmodel = dict(backbone=dict(type='ResNetV1dSAP', "
                          "sap_keep_prob=0.5))\n")
    stare = os.path.join(fixture_root, "stare")
    work = {}
    for cfg, name in ((SMOKE, BASE_NAME), (str(plugin_cfg), PLUGIN_NAME)):
        for seed in (0, 1):
            wd = str(root / "work_dirs" / f"{name}_seed{seed}")
            run_tool("train", [cfg, "--work-dir", wd, "--tiny", stare, "--tiny-iters", "1", "--tiny-crop", "32", "32",
                               "--cfg-options", f"randomness.seed={seed}"])
            work[name, seed] = wd
    return root, work


def _val_metrics(wd):
    (session,) = [d for d in os.listdir(wd) if d[:8].isdigit()]
    lines = [json.loads(x) for x in open(os.path.join(wd, session, "vis_data", "scalars.json"))]
    return [x for x in lines if "loss" not in x][-1]


def test_test_tool_refuses_an_old_style_runner_checkpoint_without_trust_flag(runs, fixture_root, tmp_path):
    import torch

    from kim_plugins.mmseg.weights_only import from_weights_only

    _, work = runs
    wd = work[BASE_NAME, 0]
    old_style = str(tmp_path / "iter_1_old_style.pth")  # as mmengine writes it without kim_plugins
    torch.save(from_weights_only(torch.load(os.path.join(wd, "iter_1.pth"), weights_only=True)), old_style)
    with pytest.raises(pickle.UnpicklingError, match="--trust-checkpoint"):
        run_tool("test", [SMOKE, old_style, "--work-dir", str(tmp_path / "untrusted"),
                          "--tiny", os.path.join(fixture_root, "stare"), "--tiny-crop", "32", "32"])
    # the checkpoint tools/train.py wrote needs no flag
    metrics = run_tool("test", [SMOKE, os.path.join(wd, "iter_1.pth"), "--work-dir", str(tmp_path / "own"),
                                "--tiny", os.path.join(fixture_root, "stare"), "--tiny-crop", "32", "32"])
    assert set(metrics) >= {"aAcc", "mDice"}


def test_train_test_summarize_table_from_real_outputs(runs, fixture_root, tmp_path):
    root, work = runs
    # tools/test.py on one checkpoint, written into the run's own work dir
    wd = work[PLUGIN_NAME, 1]
    metrics = run_tool("test", [str(root / f"{PLUGIN_NAME}.py"), os.path.join(wd, "iter_1.pth"), "--work-dir", wd,
                                "--trust-checkpoint", "--tiny", os.path.join(fixture_root, "stare"),
                                "--tiny-crop", "32", "32"])
    assert set(metrics) >= {"aAcc", "mDice", "mAcc"}

    out = str(tmp_path / "summary")
    rows = run_tool("summarize", [str(root / "work_dirs"), "--out", out, "--metrics", "mDice", "aAcc"])

    # expected rows: one pair (sap), two metrics, two seeds a side
    assert [(r.metric, r.method, r.baseline_config, r.plugin_config) for r in rows] == [
        ("mDice", "stochastic average pooling", BASE_NAME, PLUGIN_NAME),
        ("aAcc", "stochastic average pooling", BASE_NAME, PLUGIN_NAME)]
    for r in rows:
        assert (r.dataset, r.model) == ("stare-32x32", "fcn_r18-tiny-d8")
        assert r.baseline_seeds == [0, 1] and r.plugin_seeds == [0, 1]
        # the numbers are the runs' own: validation for three runs, the test result for the tested one
        expect_base = [_val_metrics(work[BASE_NAME, s])[r.metric] for s in (0, 1)]
        expect_plugin = [_val_metrics(work[PLUGIN_NAME, 0])[r.metric], float(metrics[r.metric])]
        assert r.baseline_values == pytest.approx(expect_base, abs=1e-6)
        assert r.plugin_values == pytest.approx(expect_plugin, abs=1e-4)
        assert r.delta == pytest.approx(statistics.fmean(expect_plugin) - statistics.fmean(expect_base), abs=1e-4)

    md = open(out + ".md").read()
    table = [line for line in md.splitlines() if line.startswith("| stare-32x32")]
    assert len(table) == 2
    b = rows[0].baseline_values
    assert f"{statistics.fmean(b):.2f} ± {statistics.stdev(b):.2f}" in table[0]
    with open(out + ".csv") as f:
        got = list(csv.DictReader(f))
    assert [g["metric"] for g in got] == ["mDice", "aAcc"]
    assert float(got[0]["delta"]) == pytest.approx(rows[0].delta)
    assert got[0]["baseline_seeds"] == "0,1" and got[0]["plugin_n"] == "2"
    png = open(out + ".png", "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_summarize_reports_unpaired_and_missing_metric(runs, tmp_path):
    root, work = runs
    only_base = summarize.collect_runs([work[BASE_NAME, 0]])
    rows, unpaired = summarize.summarize(only_base)
    assert rows == [] and unpaired == [BASE_NAME]
    with pytest.raises(KeyError, match="'mIoU' missing"):
        summarize.summarize(summarize.collect_runs([str(root / "work_dirs")]), metrics=["mIoU"])


def test_train_cli_flags_build_the_config_mmseg_would_run(fixture_root, tmp_path):
    """--tiny, then --cfg-options (user overrides win), --amp, --no-pretrained, --resume, default work_dir."""
    convnext = os.path.join(REPO, "configs", "scale_equalizer",
                            "convnext-tiny-timm_upernet_8xb2-amp-160k_ade20k-512x512.py")
    args = train.parse_args([convnext, "--no-pretrained", "--resume"])
    cfg = train.build_config(args)
    assert cfg.model.backbone.type == "LazyPretrainedTIMMBackbone"
    assert cfg.model.backbone.pretrained is False and "checkpoint_path" not in cfg.model.backbone
    assert cfg.resume is True and cfg.launcher == "none"
    assert cfg.work_dir == os.path.join("./work_dirs", os.path.basename(convnext)[:-3])

    args = train.parse_args([SMOKE, "--tiny", os.path.join(fixture_root, "stare"), "--tiny-iters", "3", "--amp",
                             "--work-dir", str(tmp_path), "--cfg-options", "train_cfg.max_iters=5"])
    cfg = train.build_config(args)
    assert cfg.train_cfg.max_iters == 5  # --cfg-options after --tiny
    assert cfg.optim_wrapper.type == "AmpOptimWrapper" and cfg.work_dir == str(tmp_path)
    assert cfg.train_dataloader.dataset.dataset.data_root == os.path.join(fixture_root, "stare")
