"""GAB and PLN ViTs as timm models: registry, timm's per-model contract, equivalences, checkpoint loading, errors.

Every per-model check runs on small inputs (img_size 32, depth 2) to stay fast;
the full-size models are checked by construction on the meta device.
"""
import pytest
import timm
import torch
from timm.models import group_parameters

import kim_plugins  # noqa: F401  registers the names
from kim_plugins.layers.gaussian_attention_bias import GaussianAttentionBias, gaussian_attention_bias, grid_distance_sq
from kim_plugins.timm.kim_vit import GabVisionTransformer, GabVisionTransformerRelPos

GAB_NAMES = [
    "vit_tiny_patch16_gab_224", "vit_small_patch16_gab_224", "vit_base_patch16_gab_224",
    "vit_relpos_small_patch16_gab_224", "vit_relpos_medium_patch16_gab_224", "vit_relpos_base_patch16_gab_224",
    "vit_small_patch16_gab_pln_224",
]
PLN_NAMES = ["vit_tiny_patch16_pln_224", "vit_small_patch16_pln_224", "vit_base_patch16_pln_224",
             "vit_small_patch16_gab_pln_224"]
ALL_NAMES = sorted(set(GAB_NAMES + PLN_NAMES))
HOSTS = {  # plugin name -> plain timm model with the same weights layout
    "vit_tiny_patch16_gab_224": "vit_tiny_patch16_224",
    "vit_small_patch16_gab_224": "vit_small_patch16_224",
    "vit_base_patch16_gab_224": "vit_base_patch16_224",
    "vit_relpos_small_patch16_gab_224": "vit_relpos_small_patch16_224",
    "vit_relpos_medium_patch16_gab_224": "vit_relpos_medium_patch16_224",
    "vit_relpos_base_patch16_gab_224": "vit_relpos_base_patch16_224",
    "vit_tiny_patch16_pln_224": "vit_tiny_patch16_224",
    "vit_small_patch16_pln_224": "vit_small_patch16_224",
    "vit_base_patch16_pln_224": "vit_base_patch16_224",
    "vit_small_patch16_gab_pln_224": "vit_small_patch16_224",
}
SMALL = dict(img_size=32, depth=2)


def _small(name, **kwargs):
    return timm.create_model(name, **dict(SMALL, **kwargs))


def _x(batch=2, size=32, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_list_models():
    assert set(timm.list_models("vit_*_gab_*")) == set(GAB_NAMES)
    assert set(timm.list_models("*_pln_*")) == set(PLN_NAMES)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_full_size_construction_adds_only_the_plugin_parameters(name):
    model = timm.create_model(name, device="meta")
    host = timm.create_model(HOSTS[name], device="meta")
    extra = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in host.parameters())
    expected = 0
    if "gab" in name:
        expected += 2 * 12  # (σ, a) per block, default granularity 'block'
    if "pln" in name:
        expected += 2 * model.embed_dim  # LayerNorm weight and bias
    assert extra == expected
    assert set(host.state_dict()) <= set(model.state_dict())


@pytest.mark.parametrize("name", ALL_NAMES)
def test_model_contract(name):
    """timm's per-model checks (forward, grad checkpointing, backward, default cfg, features)."""
    torch.manual_seed(0)
    model = _small(name, num_classes=42).eval()
    x = _x()
    out = model(x)
    assert out.shape == (2, 42) and not torch.isnan(out).any()

    model.set_grad_checkpointing()
    torch.testing.assert_close(model(x), out, rtol=1e-5, atol=1e-5)
    model.set_grad_checkpointing(False)

    # backward: every parameter gets a gradient
    model.train()
    model(x).mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad
    if "gab" in name:
        # σ and a of every block get a non-zero gradient from a loss on all tokens (with class-token
        # pooling the last block's bias cannot reach the logits: the class token's row has zero bias)
        model.zero_grad()
        model.forward_features(x).square().mean().backward()
        gab_grads = [p.grad for n, p in model.named_parameters() if ".gab_" in n]
        assert len(gab_grads) == 4 and all(torch.count_nonzero(g) > 0 for g in gab_grads)

    # default cfg
    cfg = model.pretrained_cfg
    state = model.state_dict()
    assert cfg["classifier"] + ".weight" in state and cfg["first_conv"] + ".weight" in state
    for key in ("input_size", "mean", "std", "num_classes"):
        assert key in cfg

    # reset_classifier(0) gives the pre-logits
    model.eval()
    feats = model.forward_features(x)
    pre_logits = model.forward_head(feats, pre_logits=True)
    model.reset_classifier(0)
    torch.testing.assert_close(model(x), pre_logits)

    # forward_intermediates: final features equal forward_features, maps on the patch grid
    final, inter = model.forward_intermediates(x)
    torch.testing.assert_close(final, feats)
    assert [t.shape for t in inter] == [(2, model.embed_dim, 2, 2)] * 2


@pytest.mark.parametrize("name", ALL_NAMES)
def test_features_only(name):
    model = _small(name, features_only=True, out_indices=(0, 1))
    feats = model(_x())
    assert len(feats) == 2
    for f, ch, red in zip(feats, model.feature_info.channels(), model.feature_info.reduction()):
        assert f.shape == (2, ch, 32 // red, 32 // red)


@pytest.mark.parametrize("name, kwargs", [
    ("vit_tiny_patch16_gab_224", {}),
    ("vit_tiny_patch16_gab_224", dict(gab_granularity="network")),
    ("vit_relpos_small_patch16_gab_224", {}),
    ("vit_relpos_small_patch16_gab_224", dict(gab_granularity="network")),
    ("vit_tiny_patch16_pln_224", {}),
    ("vit_small_patch16_gab_pln_224", dict(gab_granularity="head")),
])
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_torchscript(name, kwargs):
    model = _small(name, **kwargs).eval()
    scripted = torch.jit.script(model)
    torch.testing.assert_close(scripted(_x()), model(_x()))


@pytest.mark.parametrize("name", GAB_NAMES)
def test_no_weight_decay_and_group_matcher(name):
    for granularity, n_gab in [("block", 4), ("head", 4), ("network", 2)]:
        model = _small(name, gab_granularity=granularity)
        gab_names = {n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] in ("gab_sigma",
                                                                                       "gab_amplitude")}
        assert len(gab_names) == n_gab
        assert gab_names <= model.no_weight_decay()
        # every parameter is assigned to a group, σ and a of block i with block i
        groups = group_parameters(model, model.group_matcher())
        grouped = {n for names in groups.values() for n in names}
        assert grouped == {n for n, _ in model.named_parameters()}
        if granularity != "network":
            block_of = {n: gid for gid, names in groups.items() for n in names}
            assert block_of["blocks.1.gab.gab_sigma"] == block_of["blocks.1.attn.qkv.weight"]


@pytest.mark.parametrize("name, prefix", [("vit_small_patch16_gab_224", 1), ("vit_relpos_small_patch16_gab_224", 0)])
def test_fresh_model_bias_is_published_init(name, prefix):
    """Supplement §C (A0 = 2, σ0 = 5): every block's bias is 4 on the diagonal and 4·exp(-d²/50) at offset d."""
    model = timm.create_model(name, img_size=96, depth=2)
    expected = 4.0 * torch.exp(-grid_distance_sq((6, 6)) / 50.0)
    for block in model.blocks:
        bias = block.gab((6, 6))[0, 0]
        assert torch.count_nonzero(bias[:prefix]) == 0 and torch.count_nonzero(bias[:, :prefix]) == 0
        assert torch.equal(bias[prefix:, prefix:].diagonal(), torch.full((36,), 4.0))
        torch.testing.assert_close(bias[prefix:, prefix:], expected, rtol=1e-6, atol=0)
        assert [n for n, _ in block.gab.named_parameters()] == ["gab_sigma", "gab_amplitude"]  # raw σ, as published


@pytest.mark.parametrize("name", ["vit_small_patch16_gab_224", "vit_relpos_small_patch16_gab_224"])
def test_log_sigma_option_gives_the_same_model_at_init(name):
    torch.manual_seed(0)
    raw = _small(name).eval()
    log = _small(name, gab_param="log").eval()
    missing = log.load_state_dict(raw.state_dict(), strict=False).missing_keys
    assert missing and all(k.endswith(".gab_sigma_log") for k in missing)
    assert not any(k.endswith(".gab_sigma") for k, _ in log.named_parameters())
    assert {n for n, _ in log.named_parameters() if n.endswith("gab_sigma_log")} <= log.no_weight_decay()
    with torch.no_grad():
        torch.testing.assert_close(log(_x()), raw(_x()), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown GAB param 'exp'"):
        _small(name, gab_param="exp")


@pytest.mark.parametrize("granularity", ["block", "head", "network"])
def test_amplitude_zero_equals_plain_vit_with_zero_mask(granularity):
    """a = 0: the bias is still added (a zero float mask) and the output equals the plain ViT's."""
    torch.manual_seed(0)
    plain = timm.create_model("vit_small_patch16_224", **SMALL).eval()
    gab = timm.create_model("vit_small_patch16_gab_224", gab_amplitude_init=0.0, gab_granularity=granularity,
                            **SMALL).eval()
    missing = gab.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(".gab_" in k or k.startswith("gab.") for k in missing)
    calls = []
    for m in gab.modules():
        if isinstance(m, GaussianAttentionBias):
            m.register_forward_hook(lambda mod, args, out: calls.append(out))
    x = _x()
    with torch.no_grad():
        ref = plain.forward_features(x, attn_mask=torch.zeros(1, 1, 5, 5))
        got = gab.forward_features(x)
    assert calls and all(torch.count_nonzero(b) == 0 for b in calls)  # the a = 0 bias was computed and used
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    # and it matters once a != 0
    with torch.no_grad():
        for n, p in gab.named_parameters():
            if n.endswith("gab_amplitude"):
                p.fill_(1.0)
        assert not torch.allclose(gab.forward_features(x), ref, atol=1e-3)


def test_relpos_amplitude_zero_equals_host():
    torch.manual_seed(0)
    host = timm.create_model("vit_relpos_small_patch16_224", **SMALL).eval()
    gab = timm.create_model("vit_relpos_small_patch16_gab_224", gab_amplitude_init=0.0, **SMALL).eval()
    gab.load_state_dict(host.state_dict(), strict=False)
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(gab(x), host(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("granularity", ["block", "network"])
def test_dynamic_img_size_uses_the_patch_grid(granularity):
    """Non-square, non-multiple input with dynamic padding: the model equals the plain ViT run with the
    formula's bias for the padded grid (4 x 5 patches from 50 x 78 pixels, patch 16)."""
    torch.manual_seed(0)
    kwargs = dict(img_size=32, depth=2, dynamic_img_size=True, dynamic_img_pad=True)
    plain = timm.create_model("vit_small_patch16_224", **kwargs).eval()
    gab = timm.create_model("vit_small_patch16_gab_224", gab_sigma_init=1.3, gab_amplitude_init=1.7,
                            gab_granularity=granularity, **kwargs).eval()
    gab.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(1, 3, 50, 78)
    bias = gaussian_attention_bias(torch.tensor([1.3]), torch.tensor([1.7]), (4, 5), 1)
    with torch.no_grad():
        torch.testing.assert_close(gab.forward_features(x), plain.forward_features(x, attn_mask=bias),
                                   rtol=1e-5, atol=1e-5)
        inter = gab.forward_intermediates(x, intermediates_only=True)
    assert inter[-1].shape[-2:] == (4, 5)


def test_other_img_size_and_set_input_size():
    model = timm.create_model("vit_tiny_patch16_gab_224", img_size=(48, 32), depth=1).eval()
    assert model(torch.randn(1, 3, 48, 32)).shape == (1, 1000)
    relpos = timm.create_model("vit_relpos_small_patch16_gab_224", img_size=32, depth=1).eval()
    relpos.set_input_size(img_size=(48, 64))
    final, inter = relpos.forward_intermediates(torch.randn(1, 3, 48, 64))
    assert inter[0].shape[-2:] == (3, 4)


def test_pln_norm_sits_between_projection_and_position_embedding():
    model = _small("vit_small_patch16_pln_224").eval()
    assert isinstance(model.patch_embed.norm, torch.nn.LayerNorm)
    seen = {}
    model.patch_embed.norm.register_forward_hook(lambda m, args, out: seen.update(inp=args[0], out=out))
    pos_hook = {}
    orig_pos_embed = model._pos_embed
    model._pos_embed = lambda x: (pos_hook.update(inp=x), orig_pos_embed(x))[1]
    with torch.no_grad():
        model(_x())
    assert seen["inp"].shape == (2, 4, model.embed_dim)  # patch tokens only: the class token is not normalised
    assert pos_hook["inp"] is seen["out"]  # the positional embedding is added to LN(x_p E)


@pytest.mark.parametrize("name, invariant", [("vit_small_patch16_pln_224", True),
                                             ("vit_small_patch16_gab_pln_224", True),
                                             ("vit_small_patch16_224", False)])
def test_pln_scale_invariance(name, invariant):
    """LN(α y) = LN(y): scaling the projected patch tokens by α > 0 leaves the logits unchanged (PLN only)."""
    torch.manual_seed(0)
    model = _small(name).eval()
    x = _x()
    with torch.no_grad():
        ref = model(x)
        for alpha in (0.2, 3.0):
            handle = model.patch_embed.proj.register_forward_hook(lambda m, args, out, a=alpha: out * a)
            out = model(x)
            handle.remove()
            assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4) == invariant


@pytest.mark.parametrize("name", ["vit_small_patch16_gab_224", "vit_small_patch16_pln_224",
                                  "vit_small_patch16_gab_pln_224", "vit_relpos_small_patch16_gab_224"])
@pytest.mark.parametrize("features_only", [False, True])
def test_plain_checkpoint_loads_with_new_parameters_at_init(name, features_only, tmp_path):
    host = timm.create_model(HOSTS[name], **SMALL)
    path = tmp_path / "plain.pth"
    torch.save(host.state_dict(), path)
    kwargs = dict(SMALL, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    if features_only:
        kwargs.update(features_only=True, out_indices=(1,))
    model = timm.create_model(name, **kwargs)
    state = model.state_dict()
    prefix = "model." if features_only else ""
    for key, value in host.state_dict().items():
        if prefix + key in state:
            assert torch.equal(state[prefix + key], value), key
    new = {k: v for k, v in state.items() if k[len(prefix):] not in host.state_dict()}
    assert new
    for key, value in new.items():
        if key.endswith("gab_sigma"):
            assert torch.all(value == 5.0), key
        elif key.endswith("gab_amplitude"):
            assert torch.all(value == 2.0), key
        elif key.endswith("norm.weight"):
            assert torch.all(value == 1.0), key
        else:
            assert key.endswith("patch_embed.norm.bias") and torch.all(value == 0.0), key


def test_wrong_checkpoint_still_fails(tmp_path):
    host = timm.create_model("vit_small_patch16_224", **SMALL)
    state = host.state_dict()
    del state["blocks.0.attn.qkv.weight"]
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(RuntimeError, match="blocks.0.attn.qkv.weight"):
        timm.create_model("vit_small_patch16_gab_224", pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(path)), **SMALL)


class TestBadInput:
    def test_image_not_divisible_by_patch(self):
        model = _small("vit_small_patch16_gab_224", dynamic_img_size=True).eval()
        with pytest.raises(AssertionError, match=r"Input height \(40\) should be divisible by patch size \(16\)"):
            model(torch.randn(1, 3, 40, 32))

    def test_wrong_fixed_size(self):
        model = _small("vit_relpos_small_patch16_gab_224").eval()
        with pytest.raises(AssertionError, match=r"Input height \(48\) doesn't match model \(32\)"):
            model(torch.randn(1, 3, 48, 32))

    @pytest.mark.parametrize("name", ["vit_small_patch16_gab_224", "vit_relpos_small_patch16_gab_224"])
    def test_unknown_granularity(self, name):
        with pytest.raises(ValueError, match="unknown gab_granularity 'layer'"):
            _small(name, gab_granularity="layer")

    @pytest.mark.parametrize("sigma", [-5.0, 0.0])
    def test_non_positive_sigma(self, sigma):
        with pytest.raises(ValueError, match="sigma_init must be a finite number > 0"):
            _small("vit_small_patch16_gab_224", gab_sigma_init=sigma)

    def test_patch_dropout_is_refused(self):
        with pytest.raises(ValueError, match="patch_drop_rate=0.5 drops patch tokens"):
            _small("vit_small_patch16_gab_224", patch_drop_rate=0.5)

    def test_foreign_block_is_refused(self):
        from timm.models.vision_transformer import ResPostBlock
        with pytest.raises(ValueError, match="block_fn=.*ResPostBlock.* is not supported"):
            _small("vit_small_patch16_gab_224", block_fn=ResPostBlock)


def test_model_classes():
    assert type(_small("vit_small_patch16_gab_224")) is GabVisionTransformer
    assert type(_small("vit_relpos_base_patch16_gab_224")) is GabVisionTransformerRelPos
    assert type(_small("vit_base_patch16_pln_224")) is timm.models.vision_transformer.VisionTransformer


@pytest.mark.parametrize("name, kwargs", [
    ("vit_tiny_patch16_gab_224", {}),
    ("vit_tiny_patch16_gab_224", dict(gab_granularity="head", qk_norm=True)),  # q/k norm: the split path
    ("vit_relpos_small_patch16_gab_224", {}),
])
def test_training_attention_paths_agree(name, kwargs):
    """Train mode on CPU (hand-written attention, learnt bias) == timm's explicit softmax path, values and gradients."""
    torch.manual_seed(0)
    fast = _small(name, **kwargs).double()
    slow = _small(name, **kwargs).double()
    slow.load_state_dict(fast.state_dict())
    for m in slow.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    x = _x().double()
    grads = []
    for model in (fast, slow):
        torch.manual_seed(1)  # same dropout draws (the relpos MLP has dropout)
        out = model(x)
        out.square().sum().backward()
        grads.append((out, {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-10, atol=1e-12)
    assert grads[0][1].keys() == grads[1][1].keys()
    for n in grads[0][1]:
        torch.testing.assert_close(grads[0][1][n], grads[1][1][n], rtol=1e-9, atol=1e-11, msg=n)
    # the last block only feeds the class token, whose bias row is zero: its σ, a get no gradient by design
    gab_grads = [g for n, g in grads[0][1].items() if n.startswith("blocks.0.") and "gab_" in n]
    assert len(gab_grads) == 2 and all(g.abs().sum() > 0 for g in gab_grads)
