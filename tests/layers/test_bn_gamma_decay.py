"""BN gamma categories and per-category weight decay (METHODS.md §7, regularisation of gammas)."""
import pytest
import timm
import torch
import torch.nn as nn

from kim_plugins.layers.bn_gamma_decay import (DEFAULT_GAMMA_DECAY_MULT, classify_bn_gammas,
                                               count_gamma_categories, gamma_weight_decay)
from kim_plugins.timm.gamma_param_groups import bn_gamma_param_groups


@pytest.mark.parametrize("name, counts", [
    ("resnet18", dict(branch_last=8, branch_inner=8, shortcut=3, outside=1)),
    ("resnet50", dict(branch_last=16, branch_inner=32, shortcut=4, outside=1)),
    ("resnet50d", dict(branch_last=16, branch_inner=32, shortcut=4, outside=3)),
    ("resnetv2_50", dict(branch_last=16, branch_inner=32, shortcut=0, outside=1)),
])
def test_exact_category_counts_for_timm_resnets(name, counts):
    model = timm.create_model(name, pretrained=False)
    assert count_gamma_categories(model) == counts
    cats = classify_bn_gammas(model)
    if name.startswith("resnetv2"):
        assert cats["stages.1.blocks.0.norm3"] == "branch_last" and cats["stages.1.blocks.0.norm1"] == "branch_inner"
        assert cats["norm"] == "outside"
    else:
        block = "layer2.0"
        last = f"{block}.bn3" if name != "resnet18" else f"{block}.bn2"
        assert cats[last] == "branch_last" and cats[f"{block}.bn1"] == "branch_inner"
        assert cats[f"{block}.downsample.{2 if name.endswith('d') else 1}"] == "shortcut"


def test_structural_fallback_finds_blocks_that_are_not_named_like_timm():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.n1, self.c2, self.n2 = nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)
            self.downsample = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))

    net = nn.Sequential(nn.BatchNorm2d(4), Block(), Block())
    assert classify_bn_gammas(net) == {"0": "outside", "1.n1": "branch_inner", "1.n2": "branch_last",
                                       "1.downsample.1": "shortcut", "2.n1": "branch_inner",
                                       "2.n2": "branch_last", "2.downsample.1": "shortcut"}
    with pytest.raises(ValueError, match="no residual block"):
        classify_bn_gammas(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)))


def test_param_groups_give_each_category_its_decay_and_keep_betas_undecayed():
    model = timm.create_model("resnet18")
    wd = 5e-4
    groups = bn_gamma_param_groups(model, wd, gamma_decay_mult=dict(shortcut=0.5))
    by_id = {id(p): g for g in groups for p in g["params"]}
    assert len(by_id) == sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    cats = classify_bn_gammas(model)
    mult = dict(DEFAULT_GAMMA_DECAY_MULT, shortcut=0.5)
    modules = dict(model.named_modules())
    for bn, cat in cats.items():
        assert by_id[id(modules[bn].weight)]["weight_decay"] == wd * mult[cat]
        assert by_id[id(modules[bn].weight)]["gamma_category"] == cat
        assert by_id[id(modules[bn].bias)]["weight_decay"] == 0.0
    assert by_id[id(model.layer1[0].conv1.weight)]["weight_decay"] == wd
    assert by_id[id(model.fc.bias)]["weight_decay"] == 0.0


def test_one_sgd_step_with_zero_gradient_scales_exactly_the_selected_gammas():
    torch.manual_seed(0)
    model = timm.create_model("resnet18").double()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
    lr, wd = 0.1, 0.01
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(bn_gamma_param_groups(model, wd), lr=lr)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    decays = {n: d for n, (_, _, d) in gamma_weight_decay(model, wd).items()}
    scaled = 0
    for n, p in model.named_parameters():
        if n in decays and decays[n] > 0:
            assert torch.allclose(p, before[n] * (1 - lr * wd), rtol=1e-15, atol=0), n
            assert not torch.equal(p, before[n])
            scaled += 1
        elif n in decays:
            assert torch.equal(p, before[n]), n     # shortcut / outside gammas untouched
        elif p.ndim > 1:
            assert torch.allclose(p, before[n] * (1 - lr * wd), rtol=1e-15, atol=0)
        else:
            assert torch.equal(p, before[n]), n
    assert scaled == 16                              # branch_last 8 + branch_inner 8 of resnet18


def test_bad_multipliers_are_clear_errors():
    with pytest.raises(ValueError, match="unknown gamma category 'last'"):
        gamma_weight_decay(timm.create_model("resnet18"), 1e-4, dict(last=1.0))
    with pytest.raises(ValueError, match=">= 0"):
        gamma_weight_decay(timm.create_model("resnet18"), 1e-4, dict(outside=-1.0))
