"""timm SAP ResNets (arXiv 2409.16630): per-model contract checks at tiny input sizes."""
import pytest
import timm
import torch
from timm.layers import AvgPool2dSame

import kim_plugins  # noqa: F401  registers the models
from kim_plugins.layers.stochastic_pool import (STOCHASTIC_POOL_TYPES, StochasticAdaptiveAvgPool2d,
                                                StochasticAvgPool2d, StochasticAvgPool2dSame)
from kim_plugins.timm.kim_resnet import SAPResNet

NAMES = {"resnet18_sap": "resnet18", "resnet50_sap": "resnet50",
         "resnet18d_sap": "resnet18d", "resnet50d_sap": "resnet50d"}
SIZE = 64  # 2x2 final map: global pool K = 4, k = 2


def _stochastic(model):
    return {n: type(m) for n, m in model.named_modules() if isinstance(m, STOCHASTIC_POOL_TYPES)}


def _pair(name, **kw):
    """A SAP model and its plain timm counterpart holding the same weights."""
    torch.manual_seed(0)
    sap = timm.create_model(name, **kw)
    plain = timm.create_model(NAMES[name], **{k: v for k, v in kw.items() if not k.startswith("sap_")})
    plain.load_state_dict(sap.state_dict())
    return sap, plain


@pytest.mark.parametrize("name", list(NAMES))
def test_registered_with_cfg_and_the_right_pools_replaced(name):
    assert name in timm.list_models("*_sap")
    model = timm.create_model(name)
    assert isinstance(model, SAPResNet)
    cfg = model.pretrained_cfg
    assert model.get_submodule(cfg["first_conv"]) is not None and model.get_submodule(cfg["classifier"]) is model.fc
    expected = {"global_pool.pool": StochasticAdaptiveAvgPool2d}
    if name.endswith("d_sap"):  # avg_down shortcut pools of stages 2-4 (stage 1's shortcut does not pool)
        expected.update({f"layer{i}.0.downsample.0": StochasticAvgPool2d for i in (2, 3, 4)})
    assert _stochastic(model) == expected
    assert all(m.keep_prob == 0.5 for m in model.modules() if isinstance(m, STOCHASTIC_POOL_TYPES))


@pytest.mark.parametrize("name", list(NAMES))
def test_plain_state_dict_loads_and_eval_is_bit_identical(name):
    sap, plain = _pair(name)
    assert list(sap.state_dict()) == list(plain.state_dict())          # no new parameters or buffers
    x = torch.randn(2, 3, SIZE, SIZE)
    sap.eval(), plain.eval()
    with torch.no_grad():
        assert torch.equal(sap(x), plain(x))
    sap.train(), plain.train()
    with torch.no_grad():
        torch.manual_seed(1)
        a = sap(x)
        torch.manual_seed(1)
        b = sap(x)
        assert torch.equal(a, b) and not torch.equal(a, plain(x))        # stochastic, seeded


@pytest.mark.parametrize("name", list(NAMES))
def test_forward_backward_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=42).train()
    out = model(torch.randn(2, 3, SIZE, SIZE))
    assert out.shape == (2, 42) and torch.isfinite(out).all()
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


@pytest.mark.parametrize("name", list(NAMES))
def test_reset_classifier_keeps_sap(name):
    model = timm.create_model(name, num_classes=7)
    assert isinstance(model.global_pool.pool, StochasticAdaptiveAvgPool2d) and model.fc.out_features == 7
    model.reset_classifier(10)
    assert isinstance(model.global_pool.pool, StochasticAdaptiveAvgPool2d) and model.fc.out_features == 10
    model.train()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.manual_seed(3)
        a = model.forward_head(model.forward_features(x), pre_logits=True)
        b = model.forward_head(model.forward_features(x), pre_logits=True)
    assert not torch.equal(a, b)                                        # still stochastic in training
    # timm contract: reset_classifier(0) gives the pre-logits; in eval it is deterministic
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        model.reset_classifier(0)
        assert torch.equal(model(x), pre) and pre.shape == (2, model.num_features)
    assert isinstance(model.global_pool.pool, StochasticAdaptiveAvgPool2d)


@pytest.mark.parametrize("name", list(NAMES))
def test_features_only_matches_plain(name):
    torch.manual_seed(0)
    sap = timm.create_model(name, features_only=True)
    plain = timm.create_model(NAMES[name], features_only=True)
    plain.load_state_dict(sap.state_dict())
    assert sap.feature_info.channels() == plain.feature_info.channels()
    assert sap.feature_info.reduction() == plain.feature_info.reduction()
    x = torch.randn(1, 3, SIZE, SIZE)
    sap.eval(), plain.eval()
    with torch.no_grad():
        for a, b in zip(sap(x), plain(x)):
            assert torch.equal(a, b)
    has_shortcut_pools = name.endswith("d_sap")
    assert bool(_stochastic(sap)) == has_shortcut_pools


def test_dilated_resnetd_uses_sap_version_of_avgpool2dsame():
    sap, plain = _pair("resnet18d_sap", output_stride=8)
    assert isinstance(plain.layer3[0].downsample[0], AvgPool2dSame)
    assert type(sap.layer3[0].downsample[0]) is StochasticAvgPool2dSame
    x = torch.randn(1, 3, 40, 40)
    sap.eval(), plain.eval()
    with torch.no_grad():
        assert torch.equal(sap(x), plain(x))


def test_keep_prob_options_and_bad_pool_types():
    model = timm.create_model("resnet50d_sap", sap_keep_prob=0.25)
    assert {m.keep_prob for m in model.modules() if isinstance(m, STOCHASTIC_POOL_TYPES)} == {0.25}
    assert list(_stochastic(timm.create_model("resnet18d_sap", sap_global_pool=False))) == [
        f"layer{i}.0.downsample.0" for i in (2, 3, 4)]
    assert list(_stochastic(timm.create_model("resnet18d_sap", sap_downsample=False))) == ["global_pool.pool"]
    assert type(timm.create_model("resnet18_sap", global_pool="fast").global_pool.pool) \
        is StochasticAdaptiveAvgPool2d
    with pytest.raises(ValueError, match="global_pool='max'"):
        timm.create_model("resnet18_sap", global_pool="max")
    model = timm.create_model("resnet18_sap", num_classes=5)
    with pytest.raises(ValueError, match="global_pool='catavgmax'"):
        model.reset_classifier(3, "catavgmax")
    assert model.fc.out_features == 5 and isinstance(model.global_pool.pool, StochasticAdaptiveAvgPool2d)
    plain_head = timm.create_model("resnet18_sap", global_pool="max", sap_global_pool=False)
    assert not _stochastic(plain_head)
    with pytest.raises(ValueError, match=r"keep_prob must be in \(0, 1\]"):
        timm.create_model("resnet18_sap", sap_keep_prob=0.0)
    # keep_prob = 1 in training is the plain network exactly
    sap, plain = _pair("resnet18d_sap", sap_keep_prob=1.0)
    x = torch.randn(2, 3, SIZE, SIZE)
    assert torch.equal(sap.train()(x), plain.train()(x))


def test_grad_checkpointing_recomputes_the_same_draw():
    torch.manual_seed(0)
    model = timm.create_model("resnet18d_sap").train()
    x = torch.randn(2, 3, SIZE, SIZE)
    grads = []
    for ckpt in (False, True):
        model.set_grad_checkpointing(ckpt)
        model.zero_grad()
        torch.manual_seed(5)
        out = model(x)
        out.sum().backward()
        grads.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=0)
    for g0, g1 in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(g0, g1)


def test_prune_intermediate_layers_and_forward_intermediates():
    model = timm.create_model("resnet18d_sap").eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    final, inter = model.forward_intermediates(x)
    assert len(inter) == 5 and torch.equal(final, model.forward_features(x))
    model.prune_intermediate_layers(indices=2)
    assert model.global_pool.is_identity() and isinstance(model.fc, torch.nn.Identity)


def test_pretrained_plain_weights_load_through_cfg_overlay(tmp_path):
    torch.manual_seed(0)
    plain = timm.create_model("resnet18d")
    path = tmp_path / "resnet18d.pth"
    torch.save(plain.state_dict(), path)
    sap = timm.create_model("resnet18d_sap", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    for (k, a), b in zip(sap.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("name", ["resnet18_sap", "resnet18d_sap"])
def test_plain_checkpoint_loads_strictly_by_every_route(name, tmp_path):
    torch.manual_seed(0)
    plain_sd = timm.create_model(NAMES[name]).state_dict()
    path = tmp_path / "plain.pth"
    torch.save(plain_sd, path)
    via_path = timm.create_model(name, checkpoint_path=str(path))  # timm train's --initial-checkpoint
    via_load = timm.create_model(name)
    result = via_load.load_state_dict(plain_sd)  # strict
    assert not result.missing_keys and not result.unexpected_keys
    for model in (via_path, via_load):
        assert list(model.state_dict()) == list(plain_sd)
        for key, value in model.state_dict().items():
            assert torch.equal(value, plain_sd[key]), key


def test_fx_feature_extraction_keeps_sap_pools_as_leaves():
    model = timm.create_model("resnet18d_sap", features_only=True, feature_cls="fx")
    assert len(_stochastic(model)) == 3
    x = torch.randn(2, 3, SIZE, SIZE)
    model.train()
    torch.manual_seed(2)
    a = model(x)[-1]
    b = model(x)[-1]
    assert not torch.equal(a, b)


def test_torch_export_in_eval_is_the_plain_graph():
    model = timm.create_model("resnet18d_sap").eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    exported = torch.export.export(model, (x,))
    assert torch.equal(exported.module()(x), model(x))
