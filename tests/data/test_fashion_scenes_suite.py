"""Generator properties the benchmark suite relies on: prefix-stable sets, label range, clear size errors."""
import numpy as np
import pytest

from kim_plugins.data.fashion_scenes import compose_scene


def _garments(n=30, seed=3):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 28, 28)).astype(np.uint8), np.arange(n) % 10


def test_scene_depends_only_on_its_rng_and_labels_stay_in_range():
    g, y = _garments()
    a = compose_scene(g, y, np.random.default_rng([0, 0, 7]))
    b = compose_scene(g, y, np.random.default_rng([0, 0, 7]))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    for i in range(20):
        img, lab, placed = compose_scene(g, y, np.random.default_rng([0, 0, i]))
        assert lab.dtype == np.uint8 and lab.max() <= 10 and img.shape == (128, 128, 3)
        assert set(np.unique(lab)) <= {0} | {int(c) + 1 for _, c, *_ in placed}
        assert all(0.5 <= s <= 3.0 for _, _, s, _, _ in placed)


def test_too_small_canvas_is_a_clear_error():
    g, y = _garments()
    with pytest.raises(ValueError, match=r"canvas size \(32, 32\) is too small for garments up to 84 px"):
        compose_scene(g, y, np.random.default_rng(0), size=(32, 32))
    img, lab, _ = compose_scene(g, y, np.random.default_rng(0), size=(32, 32), scale_range=(0.5, 1.0))
    assert lab.shape == (32, 32)
