"""tools/benchmark_suite.py (kim_plugins.cli.benchmark_suite): a smoke run writes the report, the CSV files and every plot; its parts are right."""
import csv
import gzip
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tool():
    from kim_plugins.cli import benchmark_suite

    return vars(benchmark_suite)


def _write_idx(path, array):
    header = (0x0800 | array.ndim).to_bytes(4, "big") + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def small_fmnist(tmp_path_factory):
    """Fashion-MNIST-format idx files: 512 training and 128 test garments (class-dependent blobs + noise)."""
    d = tmp_path_factory.mktemp("fmnist_small")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:28, :28]
    for stem, n in (("train", 512), ("t10k", 128)):
        labels = np.arange(n) % 10
        imgs = np.zeros((n, 28, 28))
        for i, c in enumerate(labels):
            r = 4 + c
            imgs[i] = 200 * (((yy - 14) ** 2 + (xx - 14) ** 2) < r * r) + rng.integers(0, 40, (28, 28))
        _write_idx(os.path.join(d, f"{stem}-images-idx3-ubyte.gz"), np.clip(imgs, 0, 255))
        _write_idx(os.path.join(d, f"{stem}-labels-idx1-ubyte.gz"), labels)
    return str(d)


def test_smoke_run_writes_report_csv_and_every_plot(small_fmnist, tmp_path):
    from kim_plugins.suite.report import PLOTS

    out = tmp_path / "out"
    rc = _tool()["main"](["--budget-minutes", "0.05", "--seeds", "1", "--threads", "1", "--device", "cpu",
                          "--fashion-mnist", small_fmnist, "--data-root", str(tmp_path / "data"), "--out", str(out)])
    assert rc == 0
    report = (out / "report.md").read_text()
    assert "sanity check, not a reproduction" in report
    assert report.index("## 1. Mechanisms") < report.index("## 2. Accuracy")
    for section in ("variance of each branch entering a fusion", "ERF lattice", "contrast change",
                    "Gaussian attention bias on Swin", "train/eval consistency"):
        assert section in report
    assert "**NO**" not in report  # same data order, same init, SAP eval bit-identical
    assert report.count("same data order and augmentation in every variant (per seed): yes") == 13
    assert "not significant (1 seed: no spread)" in report
    assert "(without SE " in report and "upsampled operands only (`equalize_all_branches=False`), start" in report
    assert "same run as in se-aspp" in report
    for name in PLOTS:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
        assert f"]({name})" in report
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["pair"], r["variant"]) for r in rows if r["baseline"] == "True"] == [
        ("se-uper", "UPerHead"), ("se-aspp", "ASPPHead"), ("rates-small", "rates (1, 12, 24, 36)"),
        ("rates-large", "rates (1, 12, 24, 36)"), ("vit", "ViT"), ("swin", "Swin"), ("sap", "ResNet-18-D"), ("dropout", "no dropout"),
        ("gamma", "no gamma decay"), ("infonce", "InfoNCE tau 0.5"), ("depth", "mmseg SiLogLoss"),
        ("deadpixel", "ResNet-18"), ("vitaug", "Mixup 0.8 + CutMix 1.0 + const erasing")]
    assert len(rows) == 32
    assert "### Dead pixel test" in report and "### Variance-safe ViT augmentation" in report
    for r in rows:
        assert 0.0 <= float(r["mean"]) <= 100.0 and int(r["iters"]) == 2 and float(r["gflops"]) > 0
    with open(out / "runs.csv") as f:
        runs = list(csv.DictReader(f))
    assert len(runs) == 32
    # the resolution-aware heads used the rule's rates at the two sizes: (1, 2, 3, 5) at 96 and (1, 2, 5, 7) at 128
    dil = {r["pair"]: r["extra"] for r in runs if r["variant"] == "resolution-aware rates"}
    assert "dilations=(1, 2, 3, 5)" in dil["rates-small"] and "dilations=(1, 2, 5, 7)" in dil["rates-large"]
    assert all("output_stride=8" in r["extra"] for r in runs if r["pair"].startswith(("rates", "se-aspp")))
    # the ASPP baseline at 128 px is one run, reported in both pairs with identical numbers
    base = {r["pair"]: r for r in runs if r["variant"] in ("ASPPHead", "rates (1, 12, 24, 36)")}
    assert "shared_with=se-aspp" in base["rates-large"]["extra"]
    assert base["rates-large"]["value"] == base["se-aspp"]["value"]
    assert base["rates-large"]["data_order_sha1"] == base["se-aspp"]["data_order_sha1"]


def test_bad_arguments_say_what_is_wrong(tmp_path, capsys):
    main = _tool()["main"]
    assert main(["--only", "se,bogus", "--out", str(tmp_path / "a")]) == 2
    assert "--only: unknown ['bogus']" in capsys.readouterr().err
    assert main(["--fashion-mnist", str(tmp_path), "--out", str(tmp_path / "b")]) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


def test_significance_verdicts():
    from kim_plugins.suite.report import significance

    assert significance([50.0], [51.0])["verdict"] == "not significant (1 seed: no spread)"
    s = significance([50.0, 52.0], [51.0, 53.0])  # delta 1, std err sqrt(2 + 2) / ... = 1.414
    assert s["delta"] == pytest.approx(1.0) and s["delta_se"] == pytest.approx(2 ** 0.5)
    assert s["verdict"].startswith("not significant")
    s = significance([50.0, 50.2], [53.0, 53.2])
    assert s["delta"] == pytest.approx(3.0) and s["verdict"].startswith("beyond 2 std. errors")


def test_budget_plan_scales_work_and_keeps_models():
    from kim_plugins.suite.core import estimate_cost, plan_settings
    from kim_plugins.suite.settings import preset

    pairs = ["se-uper", "vit"]
    costs = {"se-uper": dict(step_s=0.1, image_s=0.01), "vit": dict(step_s=0.2, image_s=0.001)}
    base = preset("quick")
    full_cost = estimate_cost(pairs, base, costs, scenes_cached=True)
    s, f, est, fits = plan_settings(pairs, base, costs, None, True)
    assert (f, est, fits) == (1.0, full_cost, True) and s.seg_iters == base.seg_iters
    s, f, est, fits = plan_settings(pairs, base, costs, full_cost / 2, True)
    assert fits and 0 < f < 1 and est <= full_cost / 2
    assert s.seg_iters < base.seg_iters and s.cls_iters < base.cls_iters
    assert (s.vit, s.resnet, s.seg_batch, s.cls_batch, s.seeds) == (base.vit, base.resnet, base.seg_batch,
                                                                    base.cls_batch, base.seeds)
    s, f, est, fits = plan_settings(pairs, base, costs, 1e-3, True)
    assert not fits and s.seg_iters == base.min_iters == s.cls_iters


def test_fusion_recorder_measures_what_enters_each_fusion():
    """Variances of an upsampled and a direct operand of a concat and an add, checked against torch."""
    from kim_plugins.suite.seg import FusionVarianceRecorder

    torch.manual_seed(0)
    low, high = torch.randn(2, 3, 4, 4), 3 * torch.randn(2, 3, 8, 8)
    rec = FusionVarianceRecorder()
    with rec:
        up = F.interpolate(low, scale_factor=2, mode="bilinear", align_corners=False)
        torch.cat([high, up], dim=1)
        torch.cat([high, high], dim=1)  # no upsampled operand: not a fusion of levels
        _ = high + up
    assert [f["kind"] for f in rec.fusions] == ["concat", "add"]
    ops = rec.fusions[0]["operands"]
    assert [o["label"] for o in ops] == ["direct #1", "upsampled x2"]
    assert ops[0]["var"] == pytest.approx(float(high.double().var(unbiased=False)))
    assert ops[1]["var"] == pytest.approx(float(up.double().var(unbiased=False)))
    assert ops[1]["var"] < float(low.double().var(unbiased=False))  # bilinear upsampling lowers the variance


def test_cached_scene_set_is_reused_as_a_prefix(small_fmnist, tmp_path):
    from kim_plugins.suite.data import cached_scenes, prepare_data

    root = str(tmp_path)
    d = prepare_data(small_fmnist, root, num_train_scenes=6, num_val_scenes=3, scene_size=64, progress=False)
    assert cached_scenes(root, 64) == (6, 3)
    first = open(os.path.join(d.scenes_root, "img_dir", "train", "00002.png"), "rb").read()
    d = prepare_data(small_fmnist, root, num_train_scenes=4, num_val_scenes=2, scene_size=64, progress=False)
    assert cached_scenes(root, 64) == (6, 3) and d.num_train_scenes == 4  # read the first 4 of the 6
    assert open(os.path.join(d.scenes_root, "img_dir", "train", "00002.png"), "rb").read() == first
