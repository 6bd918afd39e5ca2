"""tools/robustness.py: end-to-end runs on tiny data (the contrast math is tested in tests/test_robustness.py)."""
import gzip
import json

import numpy as np
import pytest
import torch

from kim_plugins.cli import robustness
from tests.tools import run_tool

TINY = '{"img_size": 32, "depth": 1, "num_classes": 3}'


def _write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_brief_training_is_labelled(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "fmnist"
    data.mkdir()
    for prefix, n in (("train", 16), ("t10k", 6)):
        _write_idx(data / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(data / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 3, (n,)))
    images, labels = robustness.load_fashion_mnist("test", str(data))
    assert images.shape == (6, 28, 28) and images.dtype == torch.uint8 and labels.shape == (6,)
    out = tmp_path / "out"
    results = run_tool("robustness", [
        "--model", "vit_tiny_patch16_224", "vit_tiny_patch16_pln_224", "--model-kwargs", TINY, "--data", "fashion-mnist",
        "--fashion-mnist-dir", str(data), "--train-steps", "2", "--batch-size", "4", "--out-dir", str(out),
        "--no-progress", "--reduce", "0.4", "--enhance", "2"])
    assert set(results) == {"vit_tiny_patch16_224", "vit_tiny_patch16_pln_224"}
    for acc in results.values():
        assert set(acc) == {1.0, 0.4, 2.0}
        assert all(100 * round(a * 6 / 100) == pytest.approx(a * 6) for a in acc.values())  # k / 6 images
    meta = json.loads((out / "robustness.json").read_text())
    assert all(p.startswith("BRIEFLY TRAINED (2 steps") for p in meta["provenance"].values())
    assert "BRIEFLY TRAINED" in (out / "robustness.md").read_text()
    assert (out / "robustness.png").stat().st_size > 0


def test_imagefolder_untrained_is_labelled(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for cls in ("a", "b", "c"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "data" / cls / f"{i}.png")
    out = tmp_path / "out"
    results = run_tool("robustness", ["--model", "vit_small_patch16_gab_224", "--model-kwargs", TINY, "--data",
                                      str(tmp_path / "data"), "--workers", "0", "--out-dir", str(out),
                                      "--no-progress"])
    acc = results["vit_small_patch16_gab_224"]
    assert len(acc) == 11  # clean + 5 reductions + 5 enhancements
    assert "UNTRAINED (random init)" in (out / "robustness.md").read_text()
    with pytest.raises(SystemExit, match="--train-steps is a demo for --data fashion-mnist"):
        run_tool("robustness", ["--model", "vit_tiny_patch16_224", "--data", str(tmp_path / "data"),
                                "--train-steps", "1", "--out-dir", str(out)])
