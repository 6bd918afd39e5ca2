"""Tests of the five scale-equalized mmseg heads (arXiv 2402.01149, METHODS.md §1)."""
import copy

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("mmseg.models", reason="mmseg is part of the project's environment (tools/setup.sh)")

from mmcv.cnn import ConvModule  # noqa: E402
from mmseg.models.decode_heads import (ASPPHead, DepthwiseSeparableASPPHead, FCNHead, PSPHead,  # noqa: E402
                                       UPerHead)
from mmseg.registry import MODELS  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

import kim_plugins.mmseg  # noqa: E402,F401  registrations
from kim_plugins.layers.atrous import resolve_dilations  # noqa: E402
from kim_plugins.layers.scale_equalizer import (ScaleEqualizer, calibrate_scale_equalizers,  # noqa: E402
                                                fold_scale_equalizers)
from kim_plugins.mmseg.se_hook import mmseg_calibration_forward  # noqa: E402

EPS = 1e-5
BN = dict(type="BN", requires_grad=True)


def _inputs(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g) for s in shapes]


# name -> (SE type, parent class, head kwargs, input shapes (batch 2, odd sizes as in mmseg's head tests))
CASES = {
    "psp": ("SEPSPHead", PSPHead, dict(in_channels=8, channels=4, pool_scales=(1, 2, 3)), [(2, 8, 23, 23)]),
    "uper": ("SEUPerHead", UPerHead, dict(in_channels=[4, 6, 8, 10], in_index=[0, 1, 2, 3], channels=4,
                                          pool_scales=(1, 2, 3)),
             [(2, 4, 45, 45), (2, 6, 23, 23), (2, 8, 12, 12), (2, 10, 6, 6)]),
    "aspp": ("SEASPPHead", ASPPHead, dict(in_channels=8, channels=4, dilations=(1, 2, 3)), [(2, 8, 21, 21)]),
    "sepaspp": ("SEDepthwiseSeparableASPPHead", DepthwiseSeparableASPPHead,
                dict(in_channels=8, channels=4, dilations=(1, 2, 3), c1_in_channels=6, c1_channels=3, in_index=1),
                [(2, 6, 45, 45), (2, 8, 23, 23)]),
    "sepaspp_no_c1": ("SEDepthwiseSeparableASPPHead", DepthwiseSeparableASPPHead,
                      dict(in_channels=8, channels=4, dilations=(1, 2), c1_in_channels=0, c1_channels=0),
                      [(2, 8, 23, 23)]),
    "fcn": ("SEFCNHead", FCNHead, dict(in_channels=[4, 6, 8], in_index=[0, 1, 2], channels=6, num_convs=1,
                                       input_transform="resize_concat", kernel_size=3, concat_input=True),
            [(2, 4, 45, 45), (2, 6, 23, 23), (2, 8, 12, 12)]),
    "fcn_hrnet": ("SEFCNHead", FCNHead, dict(in_channels=[4, 6, 8], in_index=(0, 1, 2), channels=18, num_convs=1,
                                             input_transform="resize_concat", kernel_size=1, concat_input=False,
                                             dropout_ratio=-1, align_corners=True),
                  [(2, 4, 45, 45), (2, 6, 23, 23), (2, 8, 12, 12)]),
    "fcn_no_convs": ("SEFCNHead", FCNHead, dict(in_channels=[4, 6, 8], in_index=[0, 1, 2], channels=18,
                                                num_convs=0, input_transform="resize_concat", concat_input=True),
                     [(2, 4, 45, 45), (2, 6, 23, 23), (2, 8, 12, 12)]),
    "fcn_no_convs_no_cat": ("SEFCNHead", FCNHead, dict(in_channels=[4, 6, 8], in_index=[0, 1, 2], channels=18,
                                                       num_convs=0, input_transform="resize_concat",
                                                       concat_input=False),
                            [(2, 4, 45, 45), (2, 6, 23, 23), (2, 8, 12, 12)]),
}
FIVE = ["psp", "uper", "aspp", "sepaspp", "fcn"]

# The table of METHODS.md §1: the equalizers after the upsamplings that feed a fusion (equalize_all_branches=False,
# the literal placement) ...
TABLE = {
    "psp": ["ppm_0", "ppm_1", "ppm_2"],
    "uper": ["ppm_0", "ppm_1", "ppm_2", "top_down_3", "top_down_2", "top_down_1", "fpn_3", "fpn_2", "fpn_1"],
    "aspp": ["image_pool"],
    "sepaspp": ["image_pool", "aspp_to_c1"],
    "sepaspp_no_c1": ["image_pool"],
    "fcn": ["input_1", "input_2"],
}
# ... and with equalize_all_branches=True (the default: scale equilibrium) also the non-upsampled operands of the
# same fusions.
ALL_BRANCHES = {
    "psp": ["ppm_input"],
    "uper": ["ppm_input", "lateral_2", "lateral_1", "lateral_0", "fpn_0"],
    "aspp": ["aspp_0", "aspp_1", "aspp_2"],
    "sepaspp": ["aspp_0", "aspp_1", "aspp_2", "c1"],
    "sepaspp_no_c1": ["aspp_0", "aspp_1"],
    "fcn": ["input_0"],
}


def build(case, **se_kwargs):
    se_type, parent_cls, kwargs, shapes = CASES[case]
    kwargs = dict(kwargs, num_classes=19, norm_cfg=BN)
    torch.manual_seed(0)
    head = MODELS.build(dict(type=se_type, **kwargs, **se_kwargs))
    parent = parent_cls(**kwargs)
    missing, unexpected = parent.load_state_dict(head.state_dict(), strict=False)
    assert not missing and all(k.startswith("scale_equalizers.") for k in unexpected)
    return head, parent, _inputs(shapes)


def set_random_statistics(head, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in head.modules():
        if isinstance(m, ScaleEqualizer):
            m.mean.fill_(float(torch.randn(1, generator=g)))
            m.var.fill_(float(torch.rand(1, generator=g) * 3 + 0.2))
            m.calibrated.fill_(True)


def random_bn(*modules, seed=1):
    g = torch.Generator().manual_seed(seed)
    for mod in modules:
        for m in mod.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


# ---------------------------------------------------------------------------------------------------------
# mmseg's head-test conventions and the drop-in property
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(CASES))
def test_head_conventions(case):
    head, parent, inputs = build(case)
    calibrate_scale_equalizers(head, [inputs])
    for m in head.modules():
        if isinstance(m, ConvModule):
            assert m.with_norm, "every ConvModule keeps its norm"
    for mode in (True, False):
        out = head.train(mode)(inputs)
        idx = head.in_index if isinstance(head.in_index, int) else head.in_index[0]
        if getattr(head, "c1_bottleneck", None) is not None:
            idx = 0  # DeepLabV3+ outputs at the c1 (inputs[0]) resolution
        assert out.shape == (2, 19) + inputs[idx].shape[2:]
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("case", list(CASES))
def test_disabled_or_identity_equalizers_give_the_parent_output(case):
    head, parent, inputs = build(case, se_mode=None)
    assert len(head.scale_equalizers) == 0
    for mode in (True, False):
        torch.manual_seed(0)
        a = head.train(mode)(inputs)
        torch.manual_seed(0)
        b = parent.train(mode)(inputs)
        assert torch.equal(a, b)
    head, parent, inputs = build(case, equalize_all_branches=True)
    for m in head.scale_equalizers.values():  # mean 0, var + eps = 1: the identity up to rounding
        m.mean.zero_(), m.var.fill_(1 - EPS), m.calibrated.fill_(True)
    torch.manual_seed(0)
    a = head.train()(inputs)
    torch.manual_seed(0)
    b = parent.train()(inputs)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def _reference_se_inputs(case, head, inputs):
    """What each equalizer must see, recomputed from the parent's submodules (METHODS.md table)."""
    def se(name, t):
        return head.scale_equalizers[name](t) if name in head.scale_equalizers else t

    def rs(t, size):
        return F.interpolate(t, size=size, mode="bilinear", align_corners=head.align_corners)

    exp = {}
    if case in ("psp", "uper"):
        x = inputs[-1]
        exp["ppm_input"] = x
        for i, ppm in enumerate(head.psp_modules):
            exp[f"ppm_{i}"] = rs(ppm(x), x.shape[2:])
        if case == "uper":
            psp = head.bottleneck(torch.cat([se("ppm_input", x)] + [se(f"ppm_{i}", exp[f"ppm_{i}"])
                                                                     for i in range(len(head.psp_modules))], 1))
            lat = [conv(inputs[i]) for i, conv in enumerate(head.lateral_convs)] + [psp]
            top = len(lat) - 1
            for i in range(top, 0, -1):
                exp[f"top_down_{i}"] = rs(lat[i], lat[i - 1].shape[2:])
                exp[f"lateral_{i - 1}"] = lat[i - 1]
                lat[i - 1] = se(f"lateral_{i - 1}", lat[i - 1]) + se(f"top_down_{i}", exp[f"top_down_{i}"])
            fpn = [head.fpn_convs[i](lat[i]) for i in range(top)] + [lat[-1]]
            exp["fpn_0"] = fpn[0]
            for i in range(top, 0, -1):
                exp[f"fpn_{i}"] = rs(fpn[i], fpn[0].shape[2:])
    elif case.startswith("sepaspp") or case == "aspp":
        x = head._transform_inputs(inputs)
        exp["image_pool"] = rs(head.image_pool(x), x.shape[2:])
        for i, branch in enumerate(head.aspp_modules):
            exp[f"aspp_{i}"] = branch(x)
        if case == "sepaspp":
            out = head.bottleneck(torch.cat([se("image_pool", exp["image_pool"])]
                                            + [se(f"aspp_{i}", exp[f"aspp_{i}"])
                                               for i in range(len(head.aspp_modules))], 1))
            c1 = head.c1_bottleneck(inputs[0])
            exp["aspp_to_c1"] = rs(out, c1.shape[2:])
            exp["c1"] = c1
    elif case == "fcn":
        for i, t in enumerate(inputs):
            exp[f"input_{i}"] = rs(t, inputs[0].shape[2:])
    return exp


@pytest.mark.parametrize("equalize_all", [False, True])
@pytest.mark.parametrize("case", ["psp", "uper", "aspp", "sepaspp", "sepaspp_no_c1", "fcn"])
def test_equalizer_placement_matches_the_table(case, equalize_all):
    head, _, inputs = build(case, equalize_all_branches=equalize_all)
    set_random_statistics(head)
    head.eval()
    with torch.no_grad():
        fast = head(inputs)  # calibrated equalizers applied before the (commuting) resize ...
    head.se_apply_before_resize = False  # ... or after it, where hooks can see the upsampled tensors
    expected_sites = TABLE[case] + (ALL_BRANCHES[case] if equalize_all else [])
    assert list(head.scale_equalizers) == expected_sites
    with torch.no_grad():
        ref = _reference_se_inputs(case, head, inputs)
    seen = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: seen.setdefault(n, []).append(i[0]))
             for n, m in head.scale_equalizers.items()]
    with torch.no_grad():
        slow = head(inputs)
    for h in hooks:
        h.remove()
    assert torch.allclose(fast, slow, rtol=1e-5, atol=1e-5), (fast - slow).abs().max()
    assert sorted(seen) == sorted(expected_sites)
    for name, tensors in seen.items():
        assert len(tensors) == 1, f"{name} ran {len(tensors)} times"
        assert torch.allclose(tensors[0], ref[name], rtol=1e-5, atol=1e-6), name


@pytest.mark.parametrize("case", FIVE)
def test_calibrated_head_equalizers_output_mean_zero_variance_v_over_v_plus_eps(case):
    head, _, _ = build(case, equalize_all_branches=True)
    shapes = CASES[case][3]
    batches = [_inputs(shapes, seed=s) for s in range(3)]
    calibrate_scale_equalizers(head, batches)
    outs = {n: [] for n in head.scale_equalizers}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: outs[n].append(o.detach().double().flatten()))
             for n, m in head.scale_equalizers.items()]
    head.train()
    head.se_apply_before_resize = False  # hooks observe the equalized upsampled tensors themselves
    with torch.no_grad():
        for b in batches:
            head(b)
    for h in hooks:
        h.remove()
    for name, chunks in outs.items():
        o = torch.cat(chunks)
        v = head.scale_equalizers[name].var.item()
        assert abs(o.mean().item()) < 1e-4, name
        assert abs(o.var(unbiased=False).item() - v / (v + EPS)) < 1e-4, name


# Every concat / add of two feature maps that each parent's forward makes, in call order, read from mmseg 1.2.2's
# code: (kind, number of operands, whether a bilinear upsampling feeds it).
FUSIONS = {
    "psp": [("cat", 4, True)],                         # PPM: cat([x] + 3 resized pool branches)
    "uper": [("cat", 4, True)]                         # PPM
            + [("add", 2, True)] * 3                   # laterals[i-1] + resize(laterals[i]), i = 3, 2, 1
            + [("cat", 4, True)],                      # cat(fpn_outs[0], resized fpn_outs[1:])
    "aspp": [("cat", 4, True)],                        # cat(resized image pool, 3 ASPP branches)
    "sepaspp": [("cat", 4, True), ("cat", 2, True)],   # ASPP; cat(resize(aspp output), c1)
    "fcn": [("cat", 3, True), ("cat", 2, False)],      # resize_concat; conv_cat's cat([x, convs(x)])
}


class _FusionProbe(TorchFunctionMode):
    """Records the variance of every operand of every concat / 4-D tensor add (an independent observer)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        operands = None
        if func in (torch.cat, torch.concat, torch.concatenate):
            operands = list(args[0] if args else kwargs["tensors"])
            kind = "cat"
        elif func in (torch.add, torch.Tensor.add, torch.Tensor.__add__) and len(args) >= 2 and all(
                isinstance(a, torch.Tensor) and a.dim() == 4 for a in args[:2]):
            operands, kind = list(args[:2]), "add"
        if operands is not None:
            self.calls.append((kind, [(t.numel(), t.detach().double().sum().item(),
                                       t.detach().double().square().sum().item()) for t in operands]))
        return func(*args, **kwargs)


def _fusion_operand_variances(head, batches):
    """{fusion index: (kind, [population variance of each operand over all batches])}, head in train mode."""
    head.train()
    probes = []
    with torch.no_grad():
        for b in batches:
            with _FusionProbe() as probe:
                head(b)
            probes.append(probe.calls)
    assert all(len(p) == len(probes[0]) for p in probes)
    out = []
    for k, (kind, ops) in enumerate(probes[0]):
        variances = []
        for j in range(len(ops)):
            n, s1, s2 = (sum(p[k][1][j][i] for p in probes) for i in range(3))
            variances.append(s2 / n - (s1 / n) ** 2)
        out.append((kind, variances))
    return out


@pytest.mark.parametrize("se_mode", ["dataset", "batch"])
@pytest.mark.parametrize("case", FIVE)
def test_every_operand_of_every_upsampled_fusion_is_at_scale_equilibrium(case, se_mode):
    """The paper's guarantee, at its level: a fresh SE head (calibrated in train mode for 'dataset') feeds each
    fusion that a bilinear upsampling feeds with operands of variance 1 (each within 10 %), measured by a probe on
    the fusion ops themselves. The inputs are backbone-like (ReLU, variance ~3), so no operand is at 1 by chance."""
    head, _, _ = build(case, se_mode=se_mode)
    shapes = CASES[case][3]
    batches = [[F.relu(t) * 3 for t in _inputs(shapes, seed=s)] for s in range(3)]
    if se_mode == "dataset":
        calibrate_scale_equalizers(head, batches)
    fusions = _fusion_operand_variances(head, batches)
    assert [(kind, len(v)) for kind, v in fusions] == [(kind, n) for kind, n, _ in FUSIONS[case]]
    for (kind, variances), (_, _, upsampled) in zip(fusions, FUSIONS[case]):
        if upsampled:
            assert all(abs(v - 1) < 0.1 for v in variances), (kind, variances)
    # the same probe on the parent head sees operands off scale: the disequilibrium the equalizers remove
    _, parent, _ = build(case)
    parent_fusions = _fusion_operand_variances(parent, batches)
    assert any(abs(v - 1) >= 0.1 for (_, vs), (_, _, up) in zip(parent_fusions, FUSIONS[case]) if up for v in vs)


@pytest.mark.parametrize("equalize_all", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_folded_logits_match_unfolded(case, equalize_all):
    head, _, inputs = build(case, equalize_all_branches=equalize_all)
    set_random_statistics(head)
    random_bn(head)
    head.eval()
    with torch.no_grad():
        ref = head(inputs)
        folded = copy.deepcopy(head)
        report = fold_scale_equalizers(folded)
        out = folded(inputs)
        out_other_size = folded([F.interpolate(t, scale_factor=0.5) for t in inputs])
        ref_other_size = head([F.interpolate(t, scale_factor=0.5) for t in inputs])
    assert report["unfolded"] == [] and len(report["folded"]) == len(head.scale_equalizers)
    assert not any(isinstance(m, ScaleEqualizer) for m in folded.modules())
    assert not folded._se_active()  # the forward is the parent's own
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5)
    assert torch.allclose(out_other_size, ref_other_size, rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match="folded"):
        folded.train()(inputs)


def test_batch_mode_heads():
    head, _, inputs = build("uper", se_mode="batch")
    assert all(m.mode == "batch" for m in head.scale_equalizers.values())
    assert calibrate_scale_equalizers(head, [inputs]) == {}
    head.train()(inputs)
    assert all(m.var.item() != 1.0 for m in head.scale_equalizers.values())  # running estimates moved
    head.eval()(inputs)


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------

def test_bad_se_arguments():
    with pytest.raises(ValueError, match="se_mode='global'"):
        build("psp", se_mode="global")
    with pytest.raises(TypeError, match="equalize_all_branches"):
        build("psp", equalize_all_branches="yes")
    with pytest.raises(TypeError, match="se_sync_batch_stats"):
        build("psp", se_mode="batch", se_sync_batch_stats=1)


def test_head_without_upsampled_fusion_has_no_equalizer_and_says_so_once(monkeypatch, current_log_messages):
    """SEFCNHead with FCNHead's default input_transform=None upsamples nothing: it is FCNHead, and logs it once."""
    import kim_plugins.mmseg.se_heads as se_heads
    monkeypatch.setattr(se_heads, "_LOGGED", set())
    heads = [MODELS.build(dict(type="SEFCNHead", in_channels=8, channels=4, num_classes=19, norm_cfg=BN))
             for _ in range(2)]
    said = [m for m in current_log_messages if "SEFCNHead" in m and "no scale equalizer" in m]
    assert len(said) == 1 and "input_transform=None" in said[0] and "FCNHead" in said[0]
    head = heads[0]
    assert len(head.scale_equalizers) == 0 and head.input_transform is None
    parent = FCNHead(in_channels=8, channels=4, num_classes=19, norm_cfg=BN)
    parent.load_state_dict(head.state_dict())
    x = _inputs([(2, 8, 23, 23)])
    for mode in (True, False):
        torch.manual_seed(0)
        a = head.train(mode)(x)
        torch.manual_seed(0)
        assert torch.equal(a, parent.train(mode)(x))
    assert fold_scale_equalizers(head) == {"folded": [], "unfolded": []}
    assert calibrate_scale_equalizers(head, [x]) == {}


def test_uncalibrated_head_errors_name_the_hook():
    head, _, inputs = build("aspp")
    with pytest.raises(RuntimeError, match="ScaleEqualizerCalibrationHook"):
        head.train()(inputs)
    with pytest.raises(RuntimeError, match="allow_uncalibrated"):
        head.eval()(inputs)
    with pytest.raises(RuntimeError, match="uncalibrated"):
        fold_scale_equalizers(head)
    head, _, inputs = build("aspp", allow_uncalibrated=True)
    head.eval()(inputs)
    fold_scale_equalizers(head)


# ---------------------------------------------------------------------------------------------------------
# dilations='auto' through the resolution-aware-rates resolver (arXiv 2307.14179)
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("se_type, extra", [("SEASPPHead", {}),
                                            ("SEDepthwiseSeparableASPPHead", dict(c1_in_channels=4,
                                                                                  c1_channels=2))])
def test_aspp_heads_accept_auto_dilations(se_type, extra):
    head = MODELS.build(dict(type=se_type, in_channels=8, channels=4, num_classes=19, norm_cfg=BN,
                             dilations="auto", crop_size=(512, 1024), output_stride=8, **extra))
    expected = resolve_dilations("auto", crop_size=(512, 1024), output_stride=8)
    assert head.dilations == expected == (1, 10, 21, 31)
    assert head.auto_dilations
    got = [m.conv.dilation[0] if hasattr(m, "conv") else m.depthwise_conv.conv.dilation[0]
           for m in head.aspp_modules]
    assert tuple(got) == expected
    branches = [f"aspp_{i}" for i in range(4)]
    assert list(head.scale_equalizers) == (["image_pool", "aspp_to_c1"] + branches + ["c1"] if extra
                                           else ["image_pool"] + branches)
    with pytest.raises(ValueError, match="crop_size"):
        MODELS.build(dict(type=se_type, in_channels=8, channels=4, num_classes=19, dilations="auto",
                          output_stride=8, **extra))


# ---------------------------------------------------------------------------------------------------------
# Acceptance: every registry name trains one iteration inside a real EncoderDecoder on CPU
# ---------------------------------------------------------------------------------------------------------

def _segmentor_cfg(case):
    se_type, _, kwargs, _ = CASES[case]
    chans = [8, 16, 32, 64]
    head = dict(type=se_type, channels=8, num_classes=5, norm_cfg=BN, dropout_ratio=0.1)
    if case == "psp":
        head.update(in_channels=64, in_index=3, pool_scales=(1, 2, 3))
    elif case == "uper":
        head.update(in_channels=chans, in_index=[0, 1, 2, 3], pool_scales=(1, 2, 3))
    elif case == "aspp":
        head.update(in_channels=64, in_index=3, dilations=(1, 2, 3))
    elif case == "sepaspp":
        head.update(in_channels=64, in_index=3, dilations=(1, 2, 3), c1_in_channels=8, c1_channels=4)
    elif case == "fcn":
        head.update(in_channels=chans, in_index=(0, 1, 2, 3), channels=sum(chans), input_transform="resize_concat",
                    kernel_size=1, num_convs=1, concat_input=False, dropout_ratio=-1)
    return dict(
        type="EncoderDecoder",
        data_preprocessor=dict(type="SegDataPreProcessor", mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
                               bgr_to_rgb=True, pad_val=0, seg_pad_val=255, size=(64, 64)),
        backbone=dict(type="ResNetV1c", depth=18, stem_channels=8, base_channels=8, norm_cfg=BN),
        decode_head=head,
        auxiliary_head=dict(type="FCNHead", in_channels=32, in_index=2, channels=4, num_convs=1, concat_input=False,
                            num_classes=5, norm_cfg=BN, loss_decode=dict(type="CrossEntropyLoss", loss_weight=0.4)),
        train_cfg=dict(), test_cfg=dict(mode="whole"))


@pytest.mark.parametrize("case", FIVE)
def test_trains_one_iteration_in_encoder_decoder(case):
    from mmengine.optim import OptimWrapper
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    from mmseg.utils import register_all_modules
    register_all_modules(init_default_scope=True)
    torch.manual_seed(0)
    model = MODELS.build(_segmentor_cfg(case))
    g = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(2):
        s = SegDataSample(metainfo=dict(img_shape=(64, 64), ori_shape=(64, 64), pad_shape=(64, 64)))
        s.gt_sem_seg = PixelData(data=torch.randint(0, 5, (1, 64, 64), generator=g))
        samples.append(s)
    data = dict(inputs=[torch.randint(0, 256, (3, 64, 64), generator=g, dtype=torch.uint8) for _ in range(2)],
                data_samples=samples)
    with pytest.raises(RuntimeError, match="ScaleEqualizerCalibrationHook"):
        model.train()(**model.data_preprocessor(data, True), mode="loss")
    calibrate_scale_equalizers(model, [data], forward_fn=mmseg_calibration_forward)
    before = {k: v.clone() for k, v in model.decode_head.state_dict().items()}
    optim = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    model.train()
    losses = model.train_step(data, optim)
    assert torch.isfinite(losses["decode.loss_ce"]) and torch.isfinite(losses["aux.loss_ce"])
    after = model.decode_head.state_dict()
    assert not torch.equal(after["conv_seg.weight"], before["conv_seg.weight"])
    for k in after:  # the equalizer statistics are frozen during training
        if k.startswith("scale_equalizers."):
            assert torch.equal(after[k], before[k]), k


@pytest.mark.parametrize("case", FIVE)
def test_equalizing_before_the_resize_gives_the_same_values_and_gradients(case):
    head, _, inputs = build(case, equalize_all_branches=True)
    calibrate_scale_equalizers(head, [inputs])
    head.train()
    results = []
    for before in (True, False):
        head.se_apply_before_resize = before
        xs = [t.clone().requires_grad_(True) for t in inputs]
        torch.manual_seed(0)  # cls_seg's dropout
        out = head(xs)
        out.square().mean().backward()
        results.append((out.detach(), [x.grad for x in xs], head.conv_seg.weight.grad.clone()))
        head.zero_grad()
    (a, ga, wa), (b, gb, wb) = results
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert all(torch.allclose(x, y, rtol=1e-4, atol=1e-7) for x, y in zip(ga, gb))
    assert torch.allclose(wa, wb, rtol=1e-4, atol=1e-7)
