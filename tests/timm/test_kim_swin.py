"""GAB Swin Transformers as timm models: the published init, the window attention against an explicit
float64 computation (shifted and unshifted), equivalence with plain Swin, checkpoints, optimizer groups,
and timm's FX / TorchScript / export checks.

Per-model checks run on narrow models (embed_dim 8 x heads, two blocks per stage, 112 px: stages 0 and 1
have shifted windows); the full-size models are checked by construction on the meta device.
"""
import pytest
import timm
import torch
from timm.models import group_parameters
from timm.models._features_fx import create_feature_extractor, get_graph_node_names
from timm.optim import create_optimizer_v2

import kim_plugins  # noqa: F401  registers the names
from kim_plugins.layers.gaussian_attention_bias import GaussianAttentionBias, grid_distance_sq
from kim_plugins.timm.kim_swin import GabSwinTransformer, GabWindowAttention
from tests.swin_reference import explicit_window_attention, state_with_gab_in_tables

NAMES = ["swin_tiny_patch4_window7_gab_224", "swin_small_patch4_window7_gab_224", "swin_base_patch4_window7_gab_224"]
HOSTS = {name: name.replace("_gab", "") for name in NAMES}
FIRST_HEADS = {"swin_tiny_patch4_window7_gab_224": 3, "swin_small_patch4_window7_gab_224": 3,
               "swin_base_patch4_window7_gab_224": 4}
TINY = dict(embed_dim=24, depths=(2, 2), num_heads=(3, 6), img_size=32, window_size=4)  # 8x8 grid, shift 2


def _narrow(name, **kwargs):
    """The name's heads at 8 channels per head, two blocks per stage, 112 px."""
    return timm.create_model(name, **dict(dict(embed_dim=8 * FIRST_HEADS[name], depths=(2, 2, 2, 2), img_size=112),
                                          **kwargs))


def _x(batch=2, size=112, seed=0, dtype=torch.float32):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _gab_modules(model):
    return [m for m in model.modules() if isinstance(m, GaussianAttentionBias)]


def _randomise_gab(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in _gab_modules(model):
            m.gab_sigma.copy_(0.8 + 3 * torch.rand(m.gab_sigma.shape, generator=g, dtype=torch.float64))
            m.gab_amplitude.copy_(0.5 + 2 * torch.rand(m.gab_amplitude.shape, generator=g, dtype=torch.float64))


def test_list_models():
    assert set(timm.list_models("swin_*_gab_*")) == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_full_size_construction_adds_only_the_gab_parameters(name):
    model = timm.create_model(name, device="meta")
    host = timm.create_model(HOSTS[name], device="meta")
    assert type(model) is GabSwinTransformer
    extra = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in host.parameters())
    assert extra == 2 * sum(host.layers[i].depth for i in range(4))  # (σ, a) per block
    assert set(model.state_dict()) - set(host.state_dict()) == {
        k for k in model.state_dict() if k.endswith((".attn.gab.gab_sigma", ".attn.gab.gab_amplitude"))}


@pytest.mark.parametrize("name", NAMES)
def test_fresh_model_bias_is_published_init(name):
    """Supplement §C (A0 = 2, σ0 = 5): diagonal 4 and 4·exp(-d²/50) at in-window offset d, in every block."""
    model = timm.create_model(name, img_size=112, depths=(2, 2, 2, 2), embed_dim=8 * FIRST_HEADS[name])
    expected = 4.0 * torch.exp(-grid_distance_sq((7, 7)) / 50.0)
    attns = [m for m in model.modules() if isinstance(m, GabWindowAttention)]
    assert len(attns) == 8
    for attn in attns:
        bias = attn.gab(attn.window_size)[0, 0]
        assert torch.equal(bias.diagonal(), torch.full((attn.window_area,), 4.0))
        n = attn.window_area
        torch.testing.assert_close(bias, expected[:n, :n] if attn.window_size == (7, 7) else
                                   4.0 * torch.exp(-grid_distance_sq(attn.window_size) / 50.0), rtol=1e-6, atol=0)
        assert [n for n, _ in attn.gab.named_parameters()] == ["gab_sigma", "gab_amplitude"]


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("kwargs", [TINY, dict(TINY, img_size=40, window_size=3)])  # 10x10 grid: padded windows
def test_window_attention_equals_explicit_float64(kwargs, fused):
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_gab_224", **kwargs).double().eval()
    _randomise_gab(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, GabWindowAttention):
                m.relative_position_bias_table.normal_(0, 1)
                m.fused_attn = fused
    seen = {}
    blocks = model.layers[0].blocks
    for i, block in enumerate(blocks):
        block.attn.register_forward_hook(lambda m, args, kw, out, i=i: seen.update({i: (args, kw, out)}),
                                         with_kwargs=True)
    with torch.no_grad():
        model(_x(size=kwargs["img_size"], dtype=torch.float64))
    assert blocks[0].shift_size == (0, 0) and any(blocks[1].shift_size)
    for i in (0, 1):
        args, kw, out = seen[i]
        mask = kw.get("mask")
        if i == 0:
            assert mask is None
        else:  # the shifted-window mask is the plain block's and it masks something
            assert torch.equal(mask, blocks[1].get_attn_mask(device=mask.device, dtype=mask.dtype))
            assert (mask == -100).any()
        expected = explicit_window_attention(blocks[i].attn, args[0], mask)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


def _plain_with_gab_in_table(gab_model, host_name, **kwargs):
    """A plain timm Swin whose relative position bias tables include the GAB bias of each (dh, dw)."""
    plain = timm.create_model(host_name, **kwargs).eval().to(gab_model.layers[0].blocks[0].attn.qkv.weight.dtype)
    plain.load_state_dict(state_with_gab_in_tables(gab_model))
    return plain


@pytest.mark.parametrize("kwargs", [
    TINY,
    dict(TINY, img_size=40, window_size=3),  # padded windows
    dict(TINY, img_size=(32, 48), window_size=(4, 3)),  # non-square image and window
    dict(TINY, dynamic_img_size=True),  # masks built per call
])
def test_whole_model_equals_plain_swin_with_gab_in_its_relpos_table(kwargs):
    """The Gaussian depends only on the in-window offset, like Swin's relative position bias: adding it to
    the table of a plain Swin must give the same model, shifted windows, masks and padding included."""
    torch.manual_seed(0)
    gab = timm.create_model("swin_tiny_patch4_window7_gab_224", **kwargs).double().eval()
    _randomise_gab(gab)
    plain = _plain_with_gab_in_table(gab, "swin_tiny_patch4_window7_224", **kwargs)
    size = kwargs["img_size"] if isinstance(kwargs["img_size"], tuple) else (kwargs["img_size"],) * 2
    if kwargs.get("dynamic_img_size"):
        size = (44, 36)
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    bare = timm.create_model("swin_tiny_patch4_window7_224", **kwargs).double().eval()
    bare.load_state_dict({k: v for k, v in gab.state_dict().items() if ".gab." not in k})
    with torch.no_grad():
        torch.testing.assert_close(gab(x), plain(x), rtol=1e-10, atol=1e-10)
        assert not torch.allclose(gab(x), bare(x), atol=1e-3)  # the tables without the Gaussian differ


def test_set_input_size_follows_the_new_windows():
    torch.manual_seed(0)
    gab = timm.create_model("swin_tiny_patch4_window7_gab_224", **TINY).eval()
    _randomise_gab(gab)
    gab.set_input_size(img_size=(48, 48), window_size=6)
    assert all(m.window_size == (6, 6) for m in gab.modules() if isinstance(m, GabWindowAttention))
    plain = _plain_with_gab_in_table(gab, "swin_tiny_patch4_window7_224", **dict(TINY, img_size=48, window_size=6))
    with torch.no_grad():
        torch.testing.assert_close(gab(_x(size=48)), plain(_x(size=48)), rtol=1e-5, atol=1e-5)


def test_amplitude_zero_equals_plain_swin():
    torch.manual_seed(0)
    plain = timm.create_model("swin_tiny_patch4_window7_224", **TINY).eval()
    gab = timm.create_model("swin_tiny_patch4_window7_gab_224", gab_amplitude_init=0.0, **TINY).eval()
    # strict: every GAB module is absent from the plain checkpoint as a whole, so it keeps its values
    assert gab.load_state_dict(plain.state_dict()).missing_keys == []
    assert all(torch.all(m.gab_amplitude == 0.0) for m in _gab_modules(gab))
    x = _x(size=32)
    with torch.no_grad():
        torch.testing.assert_close(gab(x), plain(x), rtol=0, atol=1e-6)
        for m in _gab_modules(gab):
            m.gab_amplitude.fill_(2.0)
        assert not torch.allclose(gab(x), plain(x), atol=1e-3)  # and the bias matters once a != 0


@pytest.mark.parametrize("features_only", [False, True])
def test_plain_checkpoint_loads_with_only_gab_missing(features_only, tmp_path):
    host = timm.create_model("swin_tiny_patch4_window7_224", **TINY)
    path = tmp_path / "plain_swin.pth"
    torch.save(host.state_dict(), path)
    kwargs = dict(TINY, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    if features_only:
        kwargs.update(features_only=True, out_indices=(0, 1))
    model = timm.create_model("swin_tiny_patch4_window7_gab_224", **kwargs)
    state = {k.replace("layers_", "layers.", 1): v for k, v in model.state_dict().items()}  # features: layers_i
    for key, value in host.state_dict().items():
        if key in state:
            assert torch.equal(state[key], value), key
    new = {k: v for k, v in state.items() if k not in host.state_dict()}
    assert len(new) == 8 and all(k.endswith((".attn.gab.gab_sigma", ".attn.gab.gab_amplitude")) for k in new)
    for key, value in new.items():
        assert torch.all(value == (5.0 if key.endswith("gab_sigma") else 2.0)), key
    if features_only:
        feats = model(_x(size=32))
        assert [f.shape[-1] for f in feats] == [24, 48]  # NHWC, as timm's Swin features


@pytest.mark.parametrize("key", ["layers.1.blocks.0.attn.qkv.weight", "patch_embed.norm.weight"])
def test_wrong_checkpoint_still_fails(key, tmp_path):
    state = timm.create_model("swin_tiny_patch4_window7_224", **TINY).state_dict()
    del state[key]
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(RuntimeError, match=key):
        timm.create_model("swin_tiny_patch4_window7_gab_224", pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(path)), **TINY)


@pytest.mark.parametrize("granularity, per_block", [("block", 1), ("head", None)])
def test_no_weight_decay_optimizer_and_group_matcher(granularity, per_block):
    model = timm.create_model("swin_tiny_patch4_window7_gab_224", gab_granularity=granularity, **TINY)
    gab = {n: p for n, p in model.named_parameters() if ".gab.gab_" in n}
    assert len(gab) == 8
    if per_block is None:  # per head: as many (σ, a) as the block has heads
        assert gab["layers.1.blocks.0.attn.gab.gab_sigma"].numel() == 6
    assert set(gab) <= model.no_weight_decay()
    assert {n for n, _ in model.named_parameters() if "relative_position_bias_table" in n} <= model.no_weight_decay()
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert all(decay_of[id(p)] == 0.0 for p in gab.values())
    assert decay_of[id(model.layers[1].blocks[0].attn.qkv.weight)] == 0.05
    groups = group_parameters(model, model.group_matcher())
    block_of = {n: gid for gid, names in groups.items() for n in names}
    assert block_of["layers.1.blocks.1.attn.gab.gab_sigma"] == block_of["layers.1.blocks.1.attn.qkv.weight"]


@pytest.mark.parametrize("name", NAMES)
def test_model_contract(name):
    """timm's per-model checks: forward, backward reaching σ and a, grad checkpointing, features."""
    torch.manual_seed(0)
    model = _narrow(name, num_classes=7)
    out = model(_x())
    assert out.shape == (2, 7)
    out.mean().backward()
    gab = [p for n, p in model.named_parameters() if ".gab.gab_" in n]
    assert len(gab) == 16 and all(p.grad is not None and torch.count_nonzero(p.grad) == p.numel() for p in gab)
    model.eval()
    with torch.no_grad():
        ref = model(_x())
        model.set_grad_checkpointing()
        torch.testing.assert_close(model(_x()), ref, rtol=1e-5, atol=1e-5)
        model.set_grad_checkpointing(False)
        final, inter = model.forward_intermediates(_x())
    assert [t.shape[1] for t in inter] == [8 * FIRST_HEADS[name] * 2 ** i for i in range(4)]
    features = _narrow(name, features_only=True).eval()
    assert [tuple(f.shape[1:3]) for f in features(_x())] == [(28, 28), (14, 14), (7, 7), (4, 4)]  # NHWC


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fx_forward_and_backward(name):
    """As timm's test_model_forward_fx / backward_fx: the FX graph of the model equals the model."""
    torch.manual_seed(0)
    model = _narrow(name).eval()
    train_nodes, eval_nodes = get_graph_node_names(model)
    fx_model = create_feature_extractor(model, [eval_nodes[-1]])
    with torch.no_grad():
        torch.testing.assert_close(list(fx_model(_x()).values())[0], model(_x()))
    model.train()
    fx_model = create_feature_extractor(model, [train_nodes[-1]]).train()
    out = list(fx_model(_x()).values())[0]
    out.mean().backward()
    assert all(m.gab_sigma.grad is not None for m in _gab_modules(fx_model))
    assert sum(1 for _ in fx_model.parameters()) == sum(1 for _ in model.parameters())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_torchscript(name):
    torch.manual_seed(0)
    model = _narrow(name).eval()
    scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(_x()), model(_x()))


@pytest.mark.parametrize("name", NAMES)
def test_torch_export(name):
    torch.manual_seed(0)
    model = _narrow(name).eval()
    exported = torch.export.export(model, (_x(),))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(_x(seed=1)), model(_x(seed=1)))


class TestBadInput:
    def test_network_granularity_is_refused(self):
        with pytest.raises(ValueError, match="gab_granularity='network' is not supported by the Swin GAB models"):
            timm.create_model("swin_tiny_patch4_window7_gab_224", gab_granularity="network", **TINY)

    def test_bad_init_and_param(self):
        with pytest.raises(ValueError, match="sigma_init must be a finite number > 0"):
            timm.create_model("swin_tiny_patch4_window7_gab_224", gab_sigma_init=0.0, **TINY)
        with pytest.raises(ValueError, match="unknown GAB param 'exp'"):
            timm.create_model("swin_tiny_patch4_window7_gab_224", gab_param="exp", **TINY)

    def test_wrong_size_is_rejected_like_plain_swin(self):
        for name in ("swin_tiny_patch4_window7_224", "swin_tiny_patch4_window7_gab_224"):
            with pytest.raises(AssertionError, match=r"Input height \(48\) doesn't match model \(32\)"):
                timm.create_model(name, **TINY).eval()(torch.randn(1, 3, 48, 32))


def test_log_sigma_option_gives_the_same_model_at_init():
    torch.manual_seed(0)
    raw = timm.create_model("swin_tiny_patch4_window7_gab_224", **TINY).eval()
    log = timm.create_model("swin_tiny_patch4_window7_gab_224", gab_param="log", **TINY).eval()
    missing = log.load_state_dict(raw.state_dict(), strict=False).missing_keys
    assert len(missing) == 4 and all(k.endswith(".gab_sigma_log") for k in missing)
    with torch.no_grad():
        torch.testing.assert_close(log(_x(size=32)), raw(_x(size=32)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, kwargs, size", [
    ("swin_tiny_patch4_window7_gab_224", TINY, 32),
    ("vit_small_patch16_gab_224", dict(img_size=32, depth=2), 32),
    ("vit_relpos_small_patch16_gab_224", dict(img_size=32, depth=2), 32),
])
def test_bf16_autocast_stays_finite_and_close_to_float32(name, kwargs, size):
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    x = _x(size=size)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert float((out.float() - ref).abs().max() / ref.abs().max()) < 0.05
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x).float().square().mean()
    loss.backward()
    for m in _gab_modules(model):  # σ, a stay float32 and get finite gradients
        for p in m.parameters():
            assert p.dtype == torch.float32 and p.grad is not None and torch.isfinite(p.grad).all()
