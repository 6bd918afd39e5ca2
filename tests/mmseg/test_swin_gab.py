"""SwinTransformerGAB (mmseg's Swin with Gaussian attention bias) and its ADE20K config pair: the window attention
against an explicit float64 computation, equivalence with plain mmseg Swin, checkpoints, optimizer groups, and
two iterations of the config pair on the ADE20K fixture."""
import os

import pytest
import torch

pytest.importorskip("mmseg.models", reason="mmseg is part of the project's environment (tools/setup.sh)")

from mmengine.config import Config  # noqa: E402
from mmengine.optim import build_optim_wrapper  # noqa: E402
from mmseg.models.backbones import SwinTransformer  # noqa: E402
from mmseg.registry import MODELS  # noqa: E402
from mmseg.utils import register_all_modules  # noqa: E402

import kim_plugins.mmseg  # noqa: E402,F401
from kim_plugins.layers.gaussian_attention_bias import GaussianAttentionBias, grid_distance_sq  # noqa: E402
from kim_plugins.mmseg.swin_gab import GabWindowMSA, SwinTransformerGAB  # noqa: E402
from kim_plugins.dry_run.tiny import run_tiny, tiny_config  # noqa: E402
from tests.swin_reference import explicit_window_attention, state_with_gab_in_tables  # noqa: E402

register_all_modules(init_default_scope=True)

GAB = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "gaussian_attention_bias")
BASELINE = "swin-small-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py"
PLUGIN = "swin-small-patch4-window7-in1k-pre-gab_upernet_8xb2-160k_ade20k-512x512.py"
TINY = dict(embed_dims=24, depths=(2, 2), num_heads=(3, 6), window_size=4, out_indices=(0, 1), drop_path_rate=0.0)


def _cfg(name):
    return Config.fromfile(os.path.join(GAB, name))


def _randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, GaussianAttentionBias):
                m.gab_sigma.copy_(0.8 + 3 * torch.rand(m.gab_sigma.shape, generator=g, dtype=torch.float64))
                m.gab_amplitude.copy_(0.5 + 2 * torch.rand(m.gab_amplitude.shape, generator=g, dtype=torch.float64))
            if isinstance(m, GabWindowMSA):
                m.relative_position_bias_table.normal_(0, 1, generator=g)


def test_config_pair_differs_in_the_backbone_type_and_decay_rule_only():
    base, plugin = _cfg(BASELINE), _cfg(PLUGIN)
    assert "mmseg::swin/swin-small-patch4-window7-in1k-pre_upernet" in open(os.path.join(GAB, BASELINE)).read()
    b, p = base.model.backbone.to_dict(), plugin.model.backbone.to_dict()
    assert (b.pop("type"), p.pop("type")) == ("SwinTransformer", "SwinTransformerGAB")
    assert (p.pop("gab_granularity"), p.pop("gab_sigma_init"), p.pop("gab_amplitude_init")) == ("block", 5.0, 2.0)
    assert p == b and b["depths"] == [2, 2, 18, 2] and b["init_cfg"]["type"] == "Pretrained"  # Swin-S, ImageNet
    assert plugin.model.decode_head == base.model.decode_head and plugin.train_dataloader == base.train_dataloader
    assert plugin.param_scheduler == base.param_scheduler and plugin.train_cfg == base.train_cfg
    keys = dict(plugin.optim_wrapper.paramwise_cfg.custom_keys)
    assert keys.pop("gab_sigma") == dict(decay_mult=0.0) and keys.pop("gab_amplitude") == dict(decay_mult=0.0)
    assert keys == base.optim_wrapper.paramwise_cfg.custom_keys
    assert plugin.optim_wrapper.optimizer == base.optim_wrapper.optimizer


def test_backbone_builds_from_the_config_and_gives_the_four_maps():
    cfgs = {}
    for name in (BASELINE, PLUGIN):
        bb = _cfg(name).model.backbone
        bb.init_cfg = None  # offline
        cfgs[name] = bb
    torch.manual_seed(0)
    plain, gab = MODELS.build(cfgs[BASELINE]), MODELS.build(cfgs[PLUGIN])
    plain.eval()  # (mmseg's SwinTransformer.train() returns None: no chaining)
    gab.eval()
    assert type(gab) is SwinTransformerGAB
    msas = [m for m in gab.modules() if isinstance(m, GabWindowMSA)]
    assert len(msas) == 24  # every block of Swin-S
    extra = set(gab.state_dict()) - set(plain.state_dict())
    assert len(extra) == 48 and all(k.endswith((".w_msa.gab.gab_sigma", ".w_msa.gab.gab_amplitude")) for k in extra)
    # fresh: diagonal 4 and 4·exp(-d²/50) over the 7 x 7 window (supplement §C)
    bias = msas[5].gab(msas[5].window_size)[0, 0]
    torch.testing.assert_close(bias, 4.0 * torch.exp(-grid_distance_sq((7, 7)) / 50.0), rtol=1e-6, atol=0)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        outs, ref = gab(x), plain(x)
    assert [tuple(o.shape) for o in outs] == [tuple(r.shape) for r in ref] == [
        (1, 96, 16, 24), (1, 192, 8, 12), (1, 384, 4, 6), (1, 768, 2, 3)]


def test_window_attention_equals_explicit_float64_shifted_and_unshifted():
    torch.manual_seed(0)
    model = SwinTransformerGAB(**TINY).double()
    model.eval()
    _randomise(model)
    seen = {}
    blocks = model.stages[0].blocks
    for i, block in enumerate(blocks):
        block.attn.w_msa.register_forward_hook(lambda m, args, kw, out, i=i: seen.update({i: (args, kw, out)}),
                                               with_kwargs=True)
    with torch.no_grad():
        model(torch.randn(2, 3, 40, 40, dtype=torch.float64))  # 10 x 10 patches: padded windows of 4
    assert blocks[0].attn.shift_size == 0 and blocks[1].attn.shift_size == 2
    for i in (0, 1):
        args, kw, out = seen[i]
        mask = kw.get("mask")  # what mmseg's ShiftWindowMSA passes: None, or its shifted-window mask
        if i == 0:
            assert mask is None
        else:
            assert (mask == -100).any() and set(mask.unique().tolist()) == {0.0, -100.0}
        expected = explicit_window_attention(blocks[i].attn.w_msa, args[0], mask)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("size", [(32, 32), (40, 56)])
def test_equals_plain_swin_with_gab_in_its_relpos_tables(size):
    torch.manual_seed(0)
    gab, plain, bare = (SwinTransformerGAB(**TINY).double(), SwinTransformer(**TINY).double(),
                        SwinTransformer(**TINY).double())
    for m in (gab, plain, bare):
        m.eval()
    _randomise(gab)
    plain.load_state_dict(state_with_gab_in_tables(gab))
    bare.load_state_dict({k: v for k, v in gab.state_dict().items() if ".gab." not in k})
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        for o, r, b in zip(gab(x), plain(x), bare(x)):
            torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-10)
            assert not torch.allclose(o, b, atol=1e-3)


def test_amplitude_zero_equals_plain_swin():
    torch.manual_seed(0)
    plain, gab = SwinTransformer(**TINY), SwinTransformerGAB(gab_amplitude_init=0.0, **TINY)
    plain.eval()
    gab.eval()
    # strict: every GAB module is absent from the plain checkpoint as a whole, so it keeps its values
    assert gab.load_state_dict(plain.state_dict()).missing_keys == []
    assert sum(1 for n, _ in gab.named_parameters() if ".w_msa.gab.gab_" in n) == 8
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for o, r in zip(gab(x), plain(x)):
            torch.testing.assert_close(o, r, rtol=0, atol=1e-6)


def test_plain_pretrained_checkpoint_loads_and_gab_keeps_its_init(tmp_path):
    torch.manual_seed(0)
    plain = SwinTransformer(**TINY)
    path = str(tmp_path / "swin.pth")
    torch.save(dict(state_dict={"backbone." + k: v for k, v in plain.state_dict().items()}), path)
    gab = SwinTransformerGAB(init_cfg=dict(type="Pretrained", checkpoint=path), **TINY)
    gab.init_weights()
    state = gab.state_dict()
    for k, v in plain.state_dict().items():
        assert torch.equal(state[k], v), k
    for k, v in state.items():
        if ".gab." in k:
            assert torch.all(v == (5.0 if k.endswith("gab_sigma") else 2.0)), k


def test_optim_wrapper_of_the_config_puts_gab_in_zero_decay_groups():
    cfg = _cfg(PLUGIN)
    bb = cfg.model.backbone
    bb.update(init_cfg=None, **{k: v for k, v in TINY.items() if k != "out_indices"})
    cfg.model.decode_head.update(in_channels=[24, 48, 96, 192], channels=16)
    cfg.model.auxiliary_head.update(in_channels=96, channels=16)
    cfg.model.backbone.depths = (2, 2, 2, 2)
    cfg.model.backbone.num_heads = (3, 6, 12, 24)
    cfg.model.backbone.out_indices = (0, 1, 2, 3)
    model = MODELS.build(tiny_config(cfg, "unused", "unused", crop_size=(64, 64), device="cpu").model)
    optim = build_optim_wrapper(model, cfg.optim_wrapper).optimizer
    decay_of = {id(p): g["weight_decay"] for g in optim.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    gab = [n for n in named if ".gab.gab_" in n]
    assert len(gab) == 16
    assert all(decay_of[id(named[n])] == 0.0 for n in gab)
    assert decay_of[id(named["backbone.stages.1.blocks.0.attn.w_msa.qkv.weight"])] == 0.01


def test_bad_arguments():
    with pytest.raises(ValueError, match="supports gab_granularity='block' only, got 'head'"):
        SwinTransformerGAB(gab_granularity="head", **TINY)
    with pytest.raises(ValueError, match="unknown GAB param 'exp'"):
        SwinTransformerGAB(gab_param="exp", **TINY)
    with pytest.raises(ValueError, match="sigma_init must be a finite number > 0"):
        SwinTransformerGAB(gab_sigma_init=-1.0, **TINY)


@pytest.mark.slow
@pytest.mark.parametrize("name", [BASELINE, PLUGIN])
def test_config_pair_trains_two_iterations_on_ade20k_fixture(name, fixture_root, tmp_path):
    cfg = tiny_config(os.path.join(GAB, name), os.path.join(fixture_root, "ade20k"), str(tmp_path),
                      crop_size=(64, 64), device="cpu")
    # narrow (8 channels per head, two blocks per stage) and narrow heads keep the run within the test budget;
    # the backbone type, its remaining options, the decoder types and the optimizer rules are the config's
    cfg.model.backbone.update(embed_dims=24, depths=(2, 2, 2, 2))
    cfg.model.decode_head.update(in_channels=[24, 48, 96, 192], channels=16)
    cfg.model.auxiliary_head.update(in_channels=96, channels=16)
    metrics = run_tiny(cfg)
    assert {"aAcc", "mIoU"} <= set(metrics) and all(0.0 <= metrics[k] <= 100.0 for k in ("aAcc", "mIoU"))
    keys = torch.load(os.path.join(str(tmp_path), "iter_2.pth"), map_location="cpu", weights_only=False)["state_dict"]
    sigmas = {k: v for k, v in keys.items() if k.endswith(".gab.gab_sigma")}
    if name == PLUGIN:
        assert len(sigmas) == 8
        assert any(not torch.equal(v, torch.tensor([5.0])) for v in sigmas.values())  # σ was trained
    else:
        assert not sigmas


def test_bf16_autocast_stays_finite_and_close_to_float32():
    torch.manual_seed(0)
    model = SwinTransformerGAB(**TINY)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    for o, r in zip(out, ref):
        assert torch.isfinite(o).all() and float((o.float() - r).abs().max() / r.abs().max()) < 0.05
