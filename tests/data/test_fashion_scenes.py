"""The Fashion-MNIST reader and the Fashion-scenes generator."""
import gzip
import os

import numpy as np
import pytest
from PIL import Image

from kim_plugins.data.fashion_mnist import load_fashion_mnist
from kim_plugins.data.fashion_scenes import compose_scene, generate_fashion_scenes

THRESHOLD = 50


def _write_idx(path, array):
    header = (0x0800 | array.ndim).to_bytes(4, "big") + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def fake_fmnist(tmp_path_factory):
    """Idx files whose training garments are all 250 and test garments all 100 inside a disc."""
    d = tmp_path_factory.mktemp("fmnist")
    yy, xx = np.mgrid[:28, :28]
    disc = ((yy - 13.5) ** 2 + (xx - 13.5) ** 2) < 100
    for split, stem, n, value in (("train", "train", 60, 250), ("test", "t10k", 10, 100)):
        imgs = np.where(disc, value, 0)[None].repeat(n, 0)
        _write_idx(os.path.join(d, f"{stem}-images-idx3-ubyte.gz"), imgs)
        _write_idx(os.path.join(d, f"{stem}-labels-idx1-ubyte.gz"), np.arange(n) % 10)
    return str(d)


def test_idx_reader_round_trip(fake_fmnist):
    x, y = load_fashion_mnist("train", fake_fmnist)
    assert x.shape == (60, 28, 28) and x.dtype == np.uint8
    assert np.array_equal(y, np.arange(60) % 10)


def test_missing_data_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", str(tmp_path))


def test_label_is_zero_exactly_where_no_garment_pixel_exceeds_threshold():
    rng_items = np.random.default_rng(1)
    garments = rng_items.integers(0, 256, size=(20, 28, 28)).astype(np.uint8)
    labels = np.arange(20) % 10
    img, lab, placed = compose_scene(garments, labels, np.random.default_rng(5), threshold=THRESHOLD)
    assert 2 <= len(placed) <= 6
    # Rebuild the foreground mask independently from the placements.
    fg = np.zeros(lab.shape, bool)
    top_label = np.zeros(lab.shape, np.uint8)
    for idx, cls, scale, top, left in placed:
        side = max(4, int(round(28 * scale)))
        g = np.asarray(Image.fromarray(garments[idx]).resize((side, side), Image.BILINEAR))
        canvas = np.zeros((128 + 2 * side, 128 + 2 * side), np.uint8)
        canvas[top + side:top + 2 * side, left + side:left + 2 * side] = g
        m = canvas[side:side + 128, side:side + 128] > THRESHOLD
        fg |= m
        top_label[m] = cls + 1
    assert np.array_equal(lab == 0, ~fg)
    assert np.array_equal(lab, top_label)  # later garments on top
    assert lab.max() <= 10


def test_generator_is_deterministic_and_splits_do_not_share_items(fake_fmnist, tmp_path):
    a = generate_fashion_scenes(str(tmp_path / "a"), num_train=6, num_val=3, seed=7, size=(64, 64),
                                fashion_mnist_dir=fake_fmnist)
    b = generate_fashion_scenes(str(tmp_path / "b"), num_train=6, num_val=3, seed=7, size=(64, 64),
                                fashion_mnist_dir=fake_fmnist)
    for split, n, value in (("train", 6, 250), ("val", 3, 100)):
        for i in range(n):
            ia = np.asarray(Image.open(os.path.join(a, "img_dir", split, f"{i:05d}.png")))
            ib = np.asarray(Image.open(os.path.join(b, "img_dir", split, f"{i:05d}.png")))
            la = np.asarray(Image.open(os.path.join(a, "ann_dir", split, f"{i:05d}.png")))
            assert np.array_equal(ia, ib)
            # Only this split's items: train garments peak at 250, test garments at 100.
            garment_pixels = ia[..., 0][la > 0]
            assert garment_pixels.size > 0 and garment_pixels.max() == value
            assert la.max() <= 10
    # A different seed gives different scenes.
    c = generate_fashion_scenes(str(tmp_path / "c"), num_train=1, num_val=0, seed=8, size=(64, 64),
                                fashion_mnist_dir=fake_fmnist)
    assert not np.array_equal(np.asarray(Image.open(os.path.join(a, "ann_dir", "train", "00000.png"))),
                              np.asarray(Image.open(os.path.join(c, "ann_dir", "train", "00000.png"))))
