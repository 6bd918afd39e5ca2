"""``BNGammaDecayOptimWrapperConstructor``: mmseg ResNet categories, per-gamma decay, one exact SGD step."""
import pytest
import torch
import torch.nn as nn

from kim_plugins.layers.bn_gamma_decay import classify_bn_gammas, count_gamma_categories


def _build_backbone():
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    import kim_plugins.mmseg  # noqa: F401

    init_default_scope("mmseg")
    return MODELS.build(dict(type="ResNetV1c", depth=50, base_channels=8, stem_channels=8))


def test_exact_category_counts_for_mmseg_resnetv1c_50():
    model = _build_backbone()
    assert count_gamma_categories(model) == dict(branch_last=16, branch_inner=32, shortcut=4, outside=3)
    cats = classify_bn_gammas(model)
    assert cats["layer3.2.bn3"] == "branch_last" and cats["layer3.2.bn2"] == "branch_inner"
    assert cats["layer1.0.downsample.1"] == "shortcut" and cats["stem.7"] == "outside"


def _wrapper(model, **paramwise):
    from mmengine.optim import build_optim_wrapper

    cfg = dict(type="OptimWrapper", optimizer=dict(type="SGD", lr=0.1, weight_decay=0.01),
               constructor="BNGammaDecayOptimWrapperConstructor", paramwise_cfg=paramwise)
    return build_optim_wrapper(model, cfg)


def test_each_gamma_group_gets_its_decay_and_one_zero_gradient_step_scales_exactly_those_gammas():
    model = _build_backbone().double()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.uniform_(m.weight, 0.5, 1.5)
    wrapper = _wrapper(model, norm_decay_mult=0.0, gamma_decay_mult=dict(branch_inner=0.0, outside=2.0))
    decay_of = {id(g["params"][0]): g.get("weight_decay", 0.01) for g in wrapper.optimizer.param_groups}
    cats = classify_bn_gammas(model)
    modules = dict(model.named_modules())
    mult = dict(branch_last=1.0, branch_inner=0.0, shortcut=0.0, outside=2.0)
    for bn, cat in cats.items():
        assert decay_of[id(modules[bn].weight)] == pytest.approx(0.01 * mult[cat], abs=0)
        assert decay_of[id(modules[bn].bias)] == 0.0                   # norm_decay_mult still rules betas
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    wrapper.step()
    for bn, cat in cats.items():
        p, b = modules[bn].weight, before[f"{bn}.weight"]
        assert torch.allclose(p, b * (1 - 0.1 * 0.01 * mult[cat]), rtol=1e-15, atol=0), bn
        assert torch.equal(p, b) == (mult[cat] == 0.0)


def test_missing_weight_decay_is_a_clear_error():
    from mmengine.optim import build_optim_wrapper

    with pytest.raises(ValueError, match="weight_decay"):
        build_optim_wrapper(_build_backbone(), dict(type="OptimWrapper", optimizer=dict(type="SGD", lr=0.1),
                                                    constructor="BNGammaDecayOptimWrapperConstructor"))
