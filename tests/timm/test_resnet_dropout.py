"""Dropout placement on residual networks with BN (METHODS.md §7): order, eval identity, unbiasedness, head variance."""
import pytest
import timm
import torch
import torch.nn as nn

import kim_plugins  # noqa: F401
from kim_plugins.layers.dropout_placement import head_dropout_logit_variance
from kim_plugins.timm.resnet_dropout import DropoutResNetV2, apply_dropout_placement, branch_dropout_slots


def _execution_order(model, names, x):
    order = []
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: order.append(n)) for n in names]
    model(x)
    for h in hooks:
        h.remove()
    return order


def test_block_and_head_dropouts_run_in_the_guideline_order():
    model = timm.create_model("resnetv2_50_dropout", num_classes=7).train()
    b = "stages.2.blocks.1"
    names = [f"{b}.conv2", f"{b}.norm3.drop", f"{b}.norm3.act", f"{b}.conv3",
             "norm", "head.global_pool.pool.0", "head.global_pool.pool.1", "head.fc"]
    assert isinstance(model.get_submodule(f"{b}.norm3.drop"), nn.Dropout)
    assert isinstance(model.get_submodule("head.global_pool.pool.0"), nn.Dropout)
    assert _execution_order(model, names, torch.randn(2, 3, 32, 32)) == names
    slots = branch_dropout_slots(model)
    assert len(slots) == 16 and set(slots.values()) == {"norm3.drop"}
    assert model.get_submodule(f"{b}.norm3.drop").p == 0.1 and model.get_submodule("head.global_pool.pool.0").p == 0.2


def test_plain_state_dict_loads_and_eval_output_is_the_plain_models():
    torch.manual_seed(0)
    plain = timm.create_model("resnetv2_50", num_classes=5).eval()
    ours = timm.create_model("resnetv2_50_dropout", num_classes=5).eval()
    ours.load_state_dict(plain.state_dict(), strict=True)
    assert ours.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(ours(x), plain(x))
    ours.train()
    assert not torch.equal(ours(x), ours(x))        # stochastic in training


def test_train_mode_branch_output_is_unbiased_over_masks():
    torch.manual_seed(0)
    model = DropoutResNetV2(layers=[1, 1, 1, 1], channels=(32, 32, 32, 32), stem_chs=16, num_classes=3,
                            block_drop_rate=0.3, conv_layer=nn.Conv2d,
                            norm_layer=timm.layers.BatchNormAct2d).train()
    block = model.stages[1].blocks[0]
    x = torch.randn(2, 32, 4, 4)
    reps = 4000
    xr = x.repeat(reps, 1, 1, 1)                    # replicas share the BN batch statistics, masks differ
    with torch.no_grad():
        out = block(xr).view(reps, *block(x).shape)
        block.norm3.drop.p = 0.0
        ref = block(x)
    mean, se = out.mean(0), out.std(0) / reps ** 0.5
    assert ((mean - ref).abs() <= 5 * se + 1e-5).all()
    assert se.max() > 1e-3                           # the dropout really acts


@pytest.mark.parametrize("placement", ["before_pool", "after_pool"])
def test_head_logit_variance_over_masks_matches_the_closed_form(placement):
    torch.manual_seed(0)
    model = DropoutResNetV2(layers=[1, 1, 1, 1], channels=(16, 16, 16, 24), stem_chs=16, num_classes=4,
                            block_drop_rate=0.0, head_drop_rate=0.4, head_dropout_placement=placement,
                            conv_layer=nn.Conv2d, norm_layer=timm.layers.BatchNormAct2d).train()
    feats = torch.rand(1, 24, 3, 3) + 0.5
    reps = 40000
    with torch.no_grad():
        logits = model.forward_head(feats.repeat(reps, 1, 1, 1))
    empirical = logits.double().var(0, unbiased=True)
    closed = head_dropout_logit_variance(feats, model.head.fc.weight, 0.4, placement)[0]
    assert torch.allclose(empirical, closed, rtol=0.05), (empirical, closed)
    ratio = head_dropout_logit_variance(feats, model.head.fc.weight, 0.4, "before_pool") / \
        head_dropout_logit_variance(feats, model.head.fc.weight, 0.4, "after_pool")
    assert (ratio < 0.2).all()                       # 3x3 map: about 1/9 of the after-pooling variance


def test_helper_on_a_post_activation_resnet_and_on_a_plain_resnetv2():
    torch.manual_seed(0)
    plain = timm.create_model("resnet18", num_classes=3).eval()
    model = timm.create_model("resnet18", num_classes=3)
    model.load_state_dict(plain.state_dict())
    apply_dropout_placement(model, block_drop_rate=0.2, head_drop_rate=0.3, head_placement="after_pool").eval()
    assert set(branch_dropout_slots(model).values()) == {"drop_block"}
    assert isinstance(model.layer3[1].drop_block, nn.Dropout) and model.drop_rate == 0.3
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), plain(x))
    names = ["layer3.1.bn1", "layer3.1.drop_block", "layer3.1.act1", "layer3.1.conv2"]
    assert _execution_order(model.train(), names, x) == names

    v2 = timm.create_model("resnetv2_50", num_classes=3)
    apply_dropout_placement(v2, head_placement="after_pool")
    assert isinstance(v2.head.drop, nn.Dropout) and v2.head.drop.p == 0.2
    assert isinstance(v2.stages[0].blocks[0].norm3.drop, nn.Dropout)


def test_reset_classifier_keeps_the_head_dropout_and_bad_arguments_fail():
    model = timm.create_model("resnetv2_50_dropout", num_classes=3)
    model.reset_classifier(10, global_pool="avg")
    assert isinstance(model.head.global_pool.pool[0], nn.Dropout) and model.head.fc.out_channels == 10
    with pytest.raises(ValueError, match="block_drop_rate"):
        timm.create_model("resnetv2_50_dropout", block_drop_rate=1.0)
    with pytest.raises(ValueError, match="head_placement"):
        apply_dropout_placement(timm.create_model("resnet18"), head_placement="middle")
    with pytest.raises(TypeError, match="ResNet or ResNetV2"):
        apply_dropout_placement(nn.Sequential(nn.Conv2d(3, 3, 1)))


def test_features_only_and_timm_factory_options_work():
    ours = timm.create_model("resnetv2_50_dropout", features_only=True, out_indices=(1, 3)).eval()
    plain = timm.create_model("resnetv2_50", features_only=True, out_indices=(1, 3)).eval()
    plain.load_state_dict(ours.state_dict())
    x = torch.randn(1, 3, 64, 64)
    assert all(torch.equal(a, b) for a, b in zip(ours(x), plain(x)))
    assert ours.feature_info.channels() == plain.feature_info.channels() == [256, 1024]


def test_timm_model_conventions_backward_pre_logits_and_cfg():
    model = timm.create_model("resnetv2_50_dropout", num_classes=42)
    out = model(torch.randn(2, 3, 64, 64))
    out.sum().backward()
    assert out.shape == (2, 42)
    assert all(p.grad is not None for p in model.parameters())
    cfg = model.pretrained_cfg
    assert cfg["first_conv"] == "stem.conv" and cfg["classifier"] == "head.fc"
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    pre = model.forward_head(model.forward_features(x), pre_logits=True)
    model.reset_classifier(0)
    assert torch.equal(model(x), pre)
