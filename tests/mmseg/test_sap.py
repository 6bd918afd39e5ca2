"""mmseg stochastic average pooling (arXiv 2409.16630): backbone, head switch, weight converter, configs."""
import copy
import os

import pytest
import timm
import torch

from kim_plugins.layers.stochastic_pool import (STOCHASTIC_POOL_TYPES, StochasticAdaptiveAvgPool2d,
                                                StochasticAvgPool2d)

import kim_plugins.mmseg  # noqa: F401
from mmengine.config import Config
from mmseg.models.backbones import ResNet, ResNetV1d
from mmseg.registry import MODELS

from kim_plugins.mmseg.sap import ResNetV1dSAP, SAPEncoderDecoder, timm_resnet_to_mmseg
from kim_plugins.config.rewrite import sync_bn_to_bn
from kim_plugins.dry_run.tiny import run_tiny, tiny_config

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
CFG = os.path.join(ROOT, "configs", "stochastic_pooling")
D8 = dict(depth=50, dilations=(1, 1, 2, 4), strides=(1, 2, 1, 1), contract_dilation=True)


def _stochastic(model):
    return {n: type(m) for n, m in model.named_modules() if isinstance(m, STOCHASTIC_POOL_TYPES)}


def _model_cfg(name: str):
    cfg = Config.fromfile(os.path.join(CFG, name)).model
    cfg.pretrained = None
    sync_bn_to_bn(cfg)
    return cfg


# --------------------------------------------------------------------------- backbone


def test_resnetv1d_sap_d8_converts_every_shortcut_pool_and_loads_v1d_weights():
    torch.manual_seed(0)
    sap = MODELS.build(dict(type="ResNetV1dSAP", sap_keep_prob=0.5, **D8))
    plain = ResNetV1d(**D8)
    assert isinstance(sap, ResNetV1dSAP)
    assert _stochastic(sap) == {f"layer{i}.0.downsample.0": StochasticAvgPool2d for i in (1, 2, 3, 4)}
    # D8: only stage 2's shortcut pool pools; the others are kernel-1 pools
    assert [sap.get_submodule(f"layer{i}.0.downsample.0").kernel_size for i in (1, 2, 3, 4)] == [1, 2, 1, 1]
    assert list(sap.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(sap.state_dict(), strict=True)
    x = torch.randn(2, 3, 48, 48)
    sap.eval(), plain.eval()
    with torch.no_grad():
        for a, b in zip(sap(x), plain(x)):
            assert torch.equal(a, b)
        sap.train(), plain.train()
        torch.manual_seed(1)
        out_sap = sap(x)
        out_plain = plain(x)
    assert torch.equal(out_sap[0], out_plain[0])          # stage 1: kernel-1 pool, untouched by SAP
    assert not torch.equal(out_sap[1], out_plain[1])      # stage 2: the stochastic shortcut pool


def test_resnetv1d_sap_bad_keep_prob():
    with pytest.raises(ValueError, match="keep_prob"):
        MODELS.build(dict(type="ResNetV1dSAP", sap_keep_prob=1.5, depth=18))


# --------------------------------------------------------------------------- the head switch


@pytest.mark.parametrize("name, head_pools", [
    ("pspnet-sap_r50d-d8_4xb2-80k_cityscapes-512x1024.py", [f"decode_head.psp_modules.{i}.0" for i in range(4)]),
    ("deeplabv3-sap_r50d-d8_4xb4-80k_ade20k-512x512.py", ["decode_head.image_pool.0"]),
])
def test_sap_segmentor_converts_head_pools_and_eval_is_bit_identical(name, head_pools):
    cfg = _model_cfg(name)
    assert cfg.type == "SAPEncoderDecoder" and cfg.backbone.type == "ResNetV1dSAP"
    torch.manual_seed(0)
    sap = MODELS.build(cfg)
    plain_cfg = copy.deepcopy(cfg)
    plain_cfg.type, plain_cfg.backbone.type = "EncoderDecoder", "ResNetV1d"
    for k in ("sap_keep_prob",):
        plain_cfg.pop(k)
        plain_cfg.backbone.pop(k)
    plain = MODELS.build(plain_cfg)
    assert isinstance(sap, SAPEncoderDecoder)
    pools = _stochastic(sap)
    assert [n for n in pools if n.startswith("decode_head")] == head_pools
    assert all(pools[n] is StochasticAdaptiveAvgPool2d for n in head_pools)
    assert [n for n in pools if n.startswith("backbone")] == [f"backbone.layer{i}.0.downsample.0" for i in range(1, 5)]
    plain.load_state_dict(sap.state_dict(), strict=True)              # same checkpoints
    x = torch.randn(2, 3, 64, 64)
    sap.eval(), plain.eval()
    with torch.no_grad():
        assert torch.equal(sap._forward(x), plain._forward(x))
        sap.train(), plain.train()
        feats = plain.extract_feat(x)
        torch.manual_seed(2)
        a = sap.decode_head(feats)
        b = sap.decode_head(feats)
    assert not torch.equal(a, b)                                      # the head pools are stochastic


def test_sap_segmentor_options_and_errors():
    cfg = _model_cfg("pspnet-sap_r50d-d8_4xb2-80k_cityscapes-512x1024.py")
    cfg.backbone.update(type="ResNetV1d", depth=18)
    cfg.backbone.pop("sap_keep_prob")
    cfg.decode_head.in_channels, cfg.auxiliary_head.in_channels = 512, 256
    cfg.decode_head.channels, cfg.auxiliary_head.channels = 16, 8
    model = MODELS.build(dict(cfg, sap_keep_prob=0.25, sap_modules=("backbone", "decode_head")))
    pools = _stochastic(model)
    assert "backbone.layer2.0.downsample.0" in pools and "decode_head.psp_modules.3.0" in pools
    assert {m.keep_prob for m in model.modules() if isinstance(m, STOCHASTIC_POOL_TYPES)} == {0.25}
    with pytest.raises(ValueError, match=r"sap_modules \['head'\] are not segmentor parts"):
        MODELS.build(dict(cfg, sap_modules=("head",)))
    fcn = dict(cfg, decode_head=dict(type="FCNHead", in_channels=512, channels=8, num_classes=19))
    with pytest.raises(ValueError, match="found no average pooling in"):
        MODELS.build(fcn)
    with pytest.raises(ValueError, match="keep_prob"):
        MODELS.build(dict(cfg, sap_keep_prob=0))


# --------------------------------------------------------------------------- weights converter


def _features_equal(timm_name: str, mm_cls, depth: int) -> None:
    torch.manual_seed(0)
    src = timm.create_model(timm_name).eval()
    for m in src.modules():  # non-trivial BN statistics, so a swapped BN key would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.5, 0.5)
    dst = mm_cls(depth=depth)
    dst.eval()  # (mmseg's ResNet.train returns None, so no chaining)
    dst.load_state_dict(timm_resnet_to_mmseg(src.state_dict()), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = src.forward_intermediates(x, indices=[1, 2, 3, 4], intermediates_only=True)
        out = dst(x)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_timm_resnet50d_to_mmseg_resnetv1d_same_features():
    _features_equal("resnet50d", ResNetV1d, 50)


def test_timm_resnet18_to_mmseg_resnet_same_features():
    _features_equal("resnet18", ResNet, 18)


def test_converter_errors_and_cli(tmp_path):
    sd = timm.create_model("resnet18d").state_dict()
    with pytest.raises(KeyError, match="unexpected key 'head.weight'"):
        timm_resnet_to_mmseg(dict(sd, **{"head.weight": torch.zeros(1)}))
    with pytest.raises(ValueError, match="tiered deep stem"):
        timm_resnet_to_mmseg(timm.create_model("resnet14t").state_dict())
    from kim_plugins.cli import convert_timm_resnet

    src, dst = tmp_path / "r18d.pth", tmp_path / "out" / "r18d-mmseg.pth"
    torch.save(sd, src)
    convert_timm_resnet.main([str(src), str(dst), "--depth", "18"])
    ckpt = torch.load(dst, map_location="cpu", weights_only=True)
    ResNetV1dSAP(depth=18).load_state_dict(ckpt["state_dict"], strict=True)
    assert torch.equal(ckpt["state_dict"]["stem.7.weight"], sd["bn1.weight"])


# --------------------------------------------------------------------------- configs: tiny train + eval


@pytest.mark.slow
@pytest.mark.parametrize("name, dataset", [
    ("pspnet-sap_r50d-d8_4xb2-80k_cityscapes-512x1024.py", "cityscapes"),
    ("deeplabv3-sap_r50d-d8_4xb4-80k_ade20k-512x512.py", "ade20k"),
])
def test_config_trains_and_evaluates_on_fixture(name, dataset, fixture_root, tmp_path):
    cfg = tiny_config(os.path.join(CFG, name), os.path.join(fixture_root, dataset), str(tmp_path),
                      max_iters=2, device="cpu")
    metrics = run_tiny(cfg)
    assert "mIoU" in metrics and 0.0 <= metrics["mIoU"] <= 100.0
