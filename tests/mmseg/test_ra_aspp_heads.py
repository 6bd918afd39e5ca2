"""Resolution-aware ASPP heads (dilations='auto'), the 'infer' resolvers and the atrous_rates configs."""
import glob
import logging
import os

import pytest
import torch

import kim_plugins.mmseg  # noqa: F401  registrations
from kim_plugins.layers.atrous import resolution_aware_rates
from kim_plugins.mmseg.ra_aspp_heads import (RAASPPHead, RADepthwiseSeparableASPPHead,
                                             ResolutionAwareDilationsMixin, resolve_auto_dilations,
                                             set_aspp_dilations)
from kim_plugins.dry_run.tiny import run_tiny, tiny_config

from mmengine.config import Config
from mmengine.logging import MMLogger
from mmseg.models.decode_heads import ASPPHead, DepthwiseSeparableASPPHead
from mmseg.registry import MODELS
from mmseg.utils import register_all_modules

register_all_modules(init_default_scope=True)

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "atrous_rates")
HEAD = dict(in_channels=8, channels=4, num_classes=3, norm_cfg=dict(type="BN"), dropout_ratio=0.0)


def _aspp_dilations(head):
    out = []
    for branch in head.aspp_modules:
        convs = [m for m in branch.modules() if isinstance(m, torch.nn.Conv2d)]
        out.append(convs[0].dilation[0] if convs[0].kernel_size == (3, 3) else 1)
    return tuple(out)


def _same_output(a, b, inputs):
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    with torch.no_grad():
        torch.testing.assert_close(a(inputs), b(inputs), rtol=0, atol=0)


@pytest.mark.parametrize("crop, stride", [((512, 1024), 8), (128, 1), ((64, 96), 4)])
def test_auto_head_matches_rule_and_stock_head(crop, stride):
    torch.manual_seed(0)
    head = MODELS.build(dict(type="RAASPPHead", dilations="auto", crop_size=crop, output_stride=stride, **HEAD))
    rates = resolution_aware_rates(crop, stride)
    assert isinstance(head, ASPPHead) and head.dilations == rates and head.auto_dilations
    assert _aspp_dilations(head) == rates
    stock = ASPPHead(dilations=rates, **HEAD)
    _same_output(head, stock, [torch.randn(2, 8, 13, 11)])


def test_auto_separable_head_matches_stock_head():
    torch.manual_seed(0)
    cfg = dict(c1_in_channels=4, c1_channels=2, in_index=1, **HEAD)
    head = MODELS.build(dict(type="RADepthwiseSeparableASPPHead", dilations="auto", crop_size=(256, 512),
                             output_stride=8, **cfg))
    rates = resolution_aware_rates((256, 512), 8)
    assert isinstance(head, DepthwiseSeparableASPPHead) and head.dilations == rates == (1, 5, 10, 15)
    assert _aspp_dilations(head) == rates
    stock = DepthwiseSeparableASPPHead(dilations=rates, **cfg)
    _same_output(head, stock, [torch.randn(2, 4, 20, 24), torch.randn(2, 8, 10, 12)])


def test_explicit_dilations_pass_through_unchanged():
    assert RAASPPHead(**HEAD).dilations == (1, 6, 12, 18)  # ASPPHead's default
    head = RAASPPHead(dilations=(1, 12, 24, 36), crop_size=128, output_stride=1, **HEAD)
    assert head.dilations == (1, 12, 24, 36) and not head.auto_dilations
    assert _aspp_dilations(head) == (1, 12, 24, 36)


def test_chosen_rates_are_logged():
    logger = MMLogger.get_instance("test_ra_aspp_log")
    records = []

    class Catch(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Catch()
    logger.addHandler(handler)
    try:
        RAASPPHead(dilations="auto", crop_size=(512, 1024), output_stride=8, **HEAD)
    finally:
        logger.removeHandler(handler)
    assert any("RAASPPHead" in m and "(1, 10, 21, 31)" in m and "output_stride=8" in m for m in records)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="RAASPPHead: dilations='auto' needs crop_size"):
        RAASPPHead(dilations="auto", output_stride=8, **HEAD)
    with pytest.raises(ValueError, match="RAEncoderDecoder"):
        RAASPPHead(dilations="auto", crop_size=128, output_stride="infer", **HEAD)
    with pytest.raises(ValueError, match=r"crop_size=32 with output_stride=8 .* too small"):
        RAASPPHead(dilations="auto", crop_size=32, output_stride=8, **HEAD)
    with pytest.raises(ValueError, match="dilations must be 'auto'"):
        RAASPPHead(dilations="big", crop_size=128, output_stride=1, **HEAD)


def test_mixin_is_reusable_by_other_heads():
    from mmseg.models.decode_heads import ASPPHead as Base

    class MyHead(ResolutionAwareDilationsMixin, Base):  # what the SE ASPP heads do
        def __init__(self, extra=1, **kwargs):
            super().__init__(**kwargs)
            self.extra = extra

    head = MyHead(extra=3, dilations="auto", crop_size=128, output_stride=1, **HEAD)
    assert head.extra == 3 and head.dilations == (1, 21, 42, 63) and _aspp_dilations(head) == (1, 21, 42, 63)


def test_set_aspp_dilations_in_place_equals_fresh_head():
    torch.manual_seed(0)
    head = RAASPPHead(dilations="auto", crop_size=128, output_stride=1, **HEAD)
    assert set_aspp_dilations(head, (1, 2, 4, 7)) == (1, 2, 4, 7)
    _same_output(head, ASPPHead(dilations=(1, 2, 4, 7), **HEAD), [torch.randn(1, 8, 15, 15)])
    sep = DepthwiseSeparableASPPHead(dilations=(1, 6, 12, 18), c1_in_channels=0, c1_channels=0, **HEAD)
    set_aspp_dilations(sep, (1, 3, 5, 9))
    _same_output(sep, DepthwiseSeparableASPPHead(dilations=(1, 3, 5, 9), c1_in_channels=0, c1_channels=0, **HEAD),
                 [torch.randn(1, 8, 15, 15)])
    with pytest.raises(ValueError, match="cannot take rate 1"):
        set_aspp_dilations(head, (1, 1, 4, 7))
    with pytest.raises(ValueError, match="4 ASPP branches"):
        set_aspp_dilations(head, (1, 2, 4))


def _tiny_model_cfg(backbone, in_channels, in_index, output_stride="infer", crop=(64, 64)):
    return dict(
        type="RAEncoderDecoder",
        data_preprocessor=dict(type="SegDataPreProcessor", size=crop, mean=[0.0] * 3, std=[1.0] * 3),
        backbone=backbone,
        decode_head=dict(type="RAASPPHead", dilations="auto", output_stride=output_stride,
                         in_index=in_index, **dict(HEAD, in_channels=in_channels)),
        train_cfg=dict(), test_cfg=dict(mode="whole"))


RESNET_D8 = dict(type="ResNetV1c", depth=18, stem_channels=8, base_channels=4, num_stages=4,
                 out_indices=(0, 1, 2, 3), dilations=(1, 1, 2, 4), strides=(1, 2, 1, 1),
                 norm_cfg=dict(type="BN"), contract_dilation=True)
UNET = dict(type="UNet", in_channels=3, base_channels=4, num_stages=5, strides=(1, 1, 1, 1, 1),
            enc_num_convs=(2, 2, 2, 2, 2), dec_num_convs=(2, 2, 2, 2), downsamples=(True, True, True, True),
            enc_dilations=(1, 1, 1, 1, 1), dec_dilations=(1, 1, 1, 1), norm_cfg=dict(type="BN"),
            upsample_cfg=dict(type="InterpConv"))


@pytest.mark.parametrize("backbone, in_channels, in_index, crop, stride", [
    (RESNET_D8, 32, 3, (96, 88), 8),   # ResNet-D8: stride 8 (F = 11: the smallest map for 4 rates)
    (UNET, 4, 4, (64, 64), 1),         # UNet-S5-D16 + ASPP reads the full-resolution decoder output: stride 1
    (UNET, 64, 0, (192, 176), 16),     # the deepest UNet feature: stride 16
])
def test_segmentor_infers_output_stride(backbone, in_channels, in_index, crop, stride):
    model = MODELS.build(_tiny_model_cfg(backbone, in_channels, in_index, crop=crop))
    head = model.decode_head
    assert head.output_stride == stride and head.crop_size == crop  # crop from the data preprocessor
    assert head.dilations == resolution_aware_rates(crop, stride)
    # the dummy forward left BatchNorm statistics and modes alone
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert int(m.num_batches_tracked) == 0 and m.training
    # the config-level resolver gives the same stride
    cfg = Config(dict(model=_tiny_model_cfg(backbone, in_channels, in_index, crop=crop)))
    assert resolve_auto_dilations(cfg).model.decode_head.output_stride == stride


def test_segmentor_keeps_explicit_values_and_plain_model():
    model = MODELS.build(_tiny_model_cfg(UNET, 4, 4, output_stride=1, crop=(32, 32)))
    assert model.decode_head.output_stride == 1 and model.decode_head.dilations == resolution_aware_rates(32, 1)
    cfg = Config(dict(model=dict(type="EncoderDecoder", backbone=UNET, decode_head=dict(type="ASPPHead",
                                                                                       **HEAD))))
    assert resolve_auto_dilations(cfg).model == cfg.model


RA_CONFIGS = sorted(glob.glob(os.path.join(CONFIGS, "*deeplabv3-ra*.py")))


def test_every_pair_exists_and_differs_only_in_rates():
    base = {os.path.basename(p).replace("deeplabv3-ra", "deeplabv3") for p in RA_CONFIGS}
    assert len(RA_CONFIGS) == 5 and all(os.path.isfile(os.path.join(CONFIGS, b)) for b in base)
    for ra_path in RA_CONFIGS:
        ra = Config.fromfile(ra_path)
        stock = Config.fromfile(ra_path.replace("deeplabv3-ra", "deeplabv3"))
        assert stock.model.decode_head.dilations == (1, 12, 24, 36) and stock.model.decode_head.type == "ASPPHead"
        rh = dict(ra.model.decode_head)
        assert rh.pop("type") == "RAASPPHead" and rh.pop("dilations") == "auto"
        assert tuple(rh.pop("crop_size")) == tuple(ra.crop_size) == tuple(ra.model.data_preprocessor.size)
        rh.pop("output_stride")
        sh = dict(stock.model.decode_head)
        sh.pop("type"), sh.pop("dilations")
        assert rh == sh
        assert ra.model.backbone == stock.model.backbone and ra.train_dataloader == stock.train_dataloader


@pytest.mark.parametrize("path", RA_CONFIGS, ids=os.path.basename)
def test_config_output_stride_equals_measured(path):
    cfg = Config.fromfile(path)
    given = cfg.model.decode_head.output_stride
    cfg.model.decode_head.output_stride = "infer"
    cfg.model.decode_head.crop_size = (64, 64)  # the stride does not depend on the crop
    from kim_plugins.config.rewrite import sync_bn_to_bn
    sync_bn_to_bn(cfg.model)
    assert resolve_auto_dilations(cfg).model.decode_head.output_stride == given


FIXTURE_OF = {"stare": "stare", "chase-db1": "chase_db1", "hrf": "hrf", "cityscapes": "cityscapes",
              "isaid": "isaid"}


def _narrow(cfg):
    """Same structure (backbone depth, heads, 'auto' rates, datasets), 8x fewer channels: CPU-sized."""
    m = cfg.model
    m.backbone.base_channels = 8
    if m.backbone.type == "UNet":  # head reads the decoder output (base), aux the stage below (2 x base)
        m.decode_head.update(in_channels=8, channels=8)
        m.auxiliary_head.update(in_channels=16, channels=8)
    else:  # ResNetV1c bottlenecks: stage i has base * 2**i * 4 channels
        m.backbone.stem_channels = 8
        m.decode_head.update(in_channels=256, channels=8)
        m.auxiliary_head.update(in_channels=128, channels=8)
    return cfg


def test_tiny_config_keeps_the_rates_of_the_documented_infer_snippet():
    """--tiny shrinks the data, not the model: RAEncoderDecoder's crop stays the config's, not the tiny crop.

    The docs' snippet (``type='RAEncoderDecoder'``, ``output_stride='infer'``, no ``crop_size``) on the
    Cityscapes config: the crop comes from the data preprocessor, which a tiny run shrinks to 64x64; the
    rule on an 8-pixel map cannot make four rates, so the model must be built from the real crop.
    """
    path = os.path.join(CONFIGS, "deeplabv3-ra_r101-d8_4xb2-80k_cityscapes-512x1024.py")
    cfg = _narrow(Config.fromfile(path))
    cfg.model.type = "RAEncoderDecoder"
    cfg.model.decode_head.update(dilations="auto", output_stride="infer", crop_size=None)
    from kim_plugins.config.rewrite import sync_bn_to_bn
    sync_bn_to_bn(cfg.model)
    full = MODELS.build(cfg.model).decode_head.dilations
    assert full == resolution_aware_rates((512, 1024), 8) == (1, 10, 21, 31)
    tiny = tiny_config(cfg, "unused", "unused", crop_size=(64, 64), device="cpu")
    assert tuple(tiny.model.data_preprocessor.size) == (64, 64)  # the data shrank
    assert MODELS.build(tiny.model).decode_head.dilations == full  # the model did not


@pytest.mark.slow
@pytest.mark.parametrize("path", RA_CONFIGS, ids=os.path.basename)
def test_tiny_train_and_eval(path, fixture_root, tmp_path):
    name = next(v for k, v in FIXTURE_OF.items() if f"_{k}-" in os.path.basename(path))
    cfg = tiny_config(_narrow(Config.fromfile(path)), os.path.join(fixture_root, name), str(tmp_path),
                      crop_size=(32, 32), max_iters=1, device="cpu")
    assert cfg.model.decode_head.type == "RAASPPHead" and cfg.model.decode_head.dilations == "auto"
    metrics = run_tiny(cfg)
    assert metrics and all(torch.isfinite(torch.tensor(float(v))) for v in metrics.values())
    expected = {"cityscapes": "mIoU", "isaid": "mIoU"}.get(name, "mDice")
    assert expected in metrics


@pytest.mark.parametrize("head_type, extra", [("SEASPPHead", {}),
                                              ("SEDepthwiseSeparableASPPHead", dict(c1_in_channels=0,
                                                                                    c1_channels=0))])
def test_scale_equalized_aspp_heads_resolve_auto_through_the_same_mixin(head_type, extra):
    head = MODELS.build(dict(type=head_type, dilations="auto", crop_size=(512, 1024), output_stride=8,
                             **extra, **HEAD))
    assert isinstance(head, ResolutionAwareDilationsMixin)
    assert head.dilations == resolution_aware_rates((512, 1024), 8) and _aspp_dilations(head) == head.dilations


def test_degenerate_explicit_rates_warn_and_kappa_out_of_range_fails():
    """issue: (1, 12, 24, 36) on a 64-px crop at OS 8 (an 8-px map) and kappa=5 used to build without a word."""
    from kim_plugins.layers.atrous import DegenerateRateWarning

    with pytest.warns(DegenerateRateWarning, match=r"rates 12, 24, 36 > floor\(\(F - 1\) / 2\) = 3 for the "
                                                   r"F=8-pixel feature map .*suggests dilations=\(1, 2, 3\)"):
        head = RAASPPHead(dilations=(1, 12, 24, 36), crop_size=64, output_stride=8, **HEAD)
    assert head.dilations == (1, 12, 24, 36)  # explicit rates are kept: a warning, not a silent change
    with pytest.raises(ValueError, match=r"RAASPPHead: kappa must be a number in \(0, 0.5\], got 5"):
        RAASPPHead(dilations="auto", crop_size=64, output_stride=1, kappa=5, **HEAD)
