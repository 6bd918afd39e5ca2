"""The suite's stability pairs (dropout, gamma, infonce) run end to end on tiny data and are planned in the budget."""
import dataclasses
import types

import numpy as np
import pytest
import torch

from kim_plugins.suite.settings import preset
from kim_plugins.suite.stability import STABILITY_PAIRS, _augment, knn_top1


def _data(n_train=96, n_test=40):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:28, :28]

    def images(n):
        labels = np.arange(n) % 10
        imgs = np.stack([200 * (((yy - 14) ** 2 + (xx - 14) ** 2) < (4 + c) ** 2) for c in labels])
        return np.clip(imgs + rng.integers(0, 40, imgs.shape), 0, 255).astype(np.uint8), labels.astype(np.int64)

    tx, ty = images(n_train)
    vx, vy = images(n_test)
    return types.SimpleNamespace(train_images=tx, train_labels=ty, test_images=vx, test_labels=vy)


def _tiny():
    return dataclasses.replace(preset("quick"), seeds=1, stab_iters=2, cls_batch=8, stab_test_images=40,
                               knn_train_images=64)


@pytest.mark.parametrize("pair", ["dropout", "gamma", "infonce"])
def test_pair_runs_every_variant_on_the_same_batches_and_measures_its_mechanism(pair, tmp_path):
    torch.manual_seed(0)
    result = STABILITY_PAIRS[pair].run(_tiny(), _data(), str(tmp_path), "cpu", {})
    names = [v.name for v in STABILITY_PAIRS[pair].variants]
    assert [r.variant for r in result.runs] == names
    assert all(0.0 <= r.value <= 100.0 and r.iters == 2 for r in result.runs)
    assert len({r.data_order for r in result.runs}) == 1               # same batches for every variant
    inits = [r.init_params for r in result.runs]
    shared = set(inits[0]) & set(inits[1])
    assert shared and all(inits[0][k] == inits[1][k] for k in shared)  # same initialisation
    rows = result.mechanism["table"]
    if pair == "dropout":
        var = {r["variant"]: r["logit_var_over_masks"] for r in rows}
        assert var[names[0]] == 0.0 and var[names[1]] > 0 and var[names[2]] > 0
        g = rows[2]
        assert g["head_only_closed_form_before_pool"] < g["head_only_closed_form_after_pool"]
    elif pair == "gamma":
        assert {k for k in rows[0] if k.startswith("mean_abs_gamma_")} == {
            f"mean_abs_gamma_{c}" for c in ("branch_last", "branch_inner", "shortcut", "outside")}
    else:
        assert all(np.isfinite(r.extra["loss_last"]) for r in result.runs)


def test_gamma_pair_optimizer_decays_only_the_selected_gammas():
    from kim_plugins.layers.bn_gamma_decay import classify_bn_gammas
    from kim_plugins.suite.stability import _sgd_with_gamma_groups

    model = _tiny_resnet()
    opt = _sgd_with_gamma_groups(None)(model)
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    modules = dict(model.named_modules())
    for bn, cat in classify_bn_gammas(model).items():
        assert decay[id(modules[bn].weight)] == (5e-4 if cat.startswith("branch") else 0.0)


def _tiny_resnet():
    from kim_plugins.suite.cls import make_classifier

    return make_classifier("resnet18d", preset("quick").resnet, 0)


def test_views_are_augmented_per_image_and_knn_finds_identical_images():
    x = torch.rand(6, 3, 32, 32)
    g = torch.Generator().manual_seed(0)
    a, b = _augment(x, g), _augment(x, g)
    assert a.shape == x.shape and not torch.equal(a, b) and 0 <= float(a.min()) and float(a.max()) <= 1
    data = _data(40, 20)
    enc = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 16))
    enc.pretrained_cfg = dict(mean=(0.5,) * 3, std=(0.5,) * 3)
    acc = knn_top1(enc, data.test_images, data.test_labels, data.test_images, data.test_labels, "cpu", k=1)
    assert acc == 100.0


def test_budget_planner_includes_the_stability_pairs():
    from kim_plugins.suite.core import estimate_cost, plan_settings

    base = preset("quick")
    costs = {p: dict(step_s=0.05, image_s=0.001) for p in STABILITY_PAIRS}
    full = estimate_cost(list(STABILITY_PAIRS), base, costs, scenes_cached=True)
    none = estimate_cost([], base, costs, scenes_cached=True)
    assert full - none > 3 * 2 * base.stab_iters * 0.05 * len(STABILITY_PAIRS)   # variants x seeds x iterations
    assert set(STABILITY_PAIRS) == {"dropout", "gamma", "infonce", "depth"}
    s, f, est, fits = plan_settings(list(STABILITY_PAIRS), base, costs, (full + none) / 2, True)
    assert fits and f < 1 and s.stab_iters < base.stab_iters and s.cls_batch == base.cls_batch


def test_depth_scenes_are_sparse_and_mmseg_silog_gives_nan_gradients_at_a_perfect_prediction_where_stable_does_not():
    from kim_plugins.suite.depth_pair import DEPTH_VARIANTS, _loss_fn, make_depth_scenes

    data = _data(200, 20)
    x, d = make_depth_scenes(data.train_images, data.train_labels, 64, 0, sparse=True)
    counts = (d > 0).flatten(1).sum(1)
    assert x.shape == (64, 3, 64, 64) and d.shape == (64, 1, 64, 64)
    assert counts.min() < 2 and counts.max() > 100                   # empty crops and well-measured ones
    _, dv = make_depth_scenes(data.test_images, data.test_labels, 4, 1, sparse=False)
    allowed = torch.tensor([1.0 + 0.8 * c for c in range(10)] + [9.5])
    assert (dv > 0).all() and torch.isclose(torch.unique(dv)[:, None], allowed[None]).any(dim=1).all()
    gt = torch.zeros(3, 1, 8, 8)
    gt[0, 0, :2, :2] = 3.0                  # an ordinary sample
    gt[1, 0, :3, :3] = 5.0                  # = sigmoid(0) * 10: the prediction is exact, D = 0
    #   gt[2] has no valid pixel: mmseg's in-place masking gives it loss 0 and gradient 0 (no nan)
    for name, spec, baseline in ((v.name, v.spec, v.baseline) for v in DEPTH_VARIANTS):
        logits = torch.zeros(3, 1, 8, 8, requires_grad=True)
        _loss_fn(spec)(logits, gt).backward()
        assert torch.isfinite(logits.grad[[0, 2]]).all(), name
        assert torch.isfinite(logits.grad[1]).all() != baseline, name


def test_depth_pair_runs_and_the_stable_variants_never_skip_a_step(tmp_path):
    s = dataclasses.replace(_tiny(), stab_iters=4, depth_train_scenes=32, depth_val_scenes=8)
    result = STABILITY_PAIRS["depth"].run(s, _data(200, 40), str(tmp_path), "cpu", {})
    runs = {r.variant: r for r in result.runs}
    assert len(runs) == 3 and len({r.data_order for r in result.runs}) == 1
    for name, r in runs.items():
        assert 0.0 <= r.value <= 100.0 and np.isfinite(r.extra["rmse"])
        if not r.baseline:
            assert r.extra["non_finite_steps"] == 0, name
