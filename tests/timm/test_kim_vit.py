"""GAB and PLN ViTs as timm models: registry, timm's per-model contract, equivalences, checkpoint loading, errors.

Every per-model check runs on small inputs (img_size 32, depth 2) to stay fast;
the full-size models are checked by construction on the meta device.
"""
import math
import os
import re
import subprocess
import sys

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
        expected += 2 * model.embed_dim - model.embed_dim  # LayerNorm weight and bias; no projection bias
    assert extra == expected
    dropped = {"patch_embed.proj.bias"} if "pln" in name else set()
    assert set(host.state_dict()) - set(model.state_dict()) == dropped


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
    with pytest.warns(UserWarning, match="gab_amplitude_init=0"):  # a = 0 never trains: said at build time
        gab = timm.create_model("vit_small_patch16_gab_224", gab_amplitude_init=0.0, gab_granularity=granularity,
                                **SMALL).eval()
    result = gab.load_state_dict(plain.state_dict())  # strict: σ and a keep their init (a = 0)
    assert not result.missing_keys and not result.unexpected_keys
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
    with pytest.warns(UserWarning, match="gab_amplitude_init=0"):
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


def _normalised_images(model, batch=4, size=32):
    """Images in [0, 1] normalised with the model's own mean/std (as timm's transforms do)."""
    img = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    mean = torch.tensor(model.pretrained_cfg["mean"])[:, None, None]
    std = torch.tensor(model.pretrained_cfg["std"])[:, None, None]
    return (img - mean) / std


@pytest.mark.parametrize("name, kwargs, invariant", [(n, {}, True) for n in PLN_NAMES] + [
    ("vit_small_patch16_pln_224", dict(pln_patch_bias=True), False),  # LN(αWx + b) != LN(Wx + b)
    ("vit_small_patch16_224", {}, False),
])
def test_pln_model_is_invariant_to_the_image_scale(name, kwargs, invariant):
    """The paper's property at its level: model(α·x) == model(x) for a normalised image x, α > 0, eval mode.

    Bias-free PLN models: max |Δ logit| <= 2e-5 measured (the norm's eps at α = 0.25), logits of size ~1;
    with the projection bias kept or without PLN the logits move by 0.07 – 0.7.
    """
    torch.manual_seed(0)
    model = _small(name, **kwargs).eval()
    x = _normalised_images(model)
    with torch.no_grad():
        ref = model(x)
        for alpha in (0.25, 0.5, 2.0, 4.0):
            change = float((model(alpha * x) - ref).abs().max())
            assert (change < 1e-4) == invariant, (alpha, change)


def test_pln_projection_is_bias_free_by_default():
    assert _small("vit_small_patch16_pln_224").patch_embed.proj.bias is None
    assert _small("vit_small_patch16_gab_pln_224").patch_embed.proj.bias is None
    assert _small("vit_small_patch16_pln_224", pln_patch_bias=True).patch_embed.proj.bias is not None


@pytest.mark.parametrize("name", ["vit_small_patch16_pln_224", "vit_small_patch16_gab_pln_224"])
def test_pln_shares_the_hosts_initial_values(name):
    """Same seed: every parameter the PLN model shares with its plain host starts at the host's value."""
    torch.manual_seed(0)
    host = _small("vit_small_patch16_224").state_dict()
    torch.manual_seed(0)
    model = _small(name).state_dict()
    shared = [k for k in model if k in host]
    assert len(shared) == len(host) - 1  # all but patch_embed.proj.bias
    for key in shared:
        assert torch.equal(model[key], host[key]), key


def test_pln_drops_a_checkpoint_projection_bias_by_every_route(tmp_path, caplog):
    """A checkpoint with ``patch_embed.proj.bias`` loads strictly into a bias-free PLN model (bias dropped, logged)."""
    with_bias = _small("vit_small_patch16_pln_224", pln_patch_bias=True)
    state = with_bias.state_dict()
    model = _small("vit_small_patch16_pln_224")
    with caplog.at_level("INFO", logger="kim_plugins.timm.kim_vit"):
        model.load_state_dict(state)  # strict
    assert "patch_embed.proj.bias: dropped" in caplog.text
    assert "patch_embed.proj.bias" in state  # the caller's dict is not modified
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    path = tmp_path / "with_bias.pth"
    torch.save(state, path)
    loaded = _small("vit_small_patch16_pln_224", checkpoint_path=str(path))
    assert torch.equal(loaded.patch_embed.proj.weight, state["patch_embed.proj.weight"])


@pytest.mark.parametrize("kwargs, match", [
    (dict(embed_norm_layer=""), "embed_norm_layer='' removes the PreLayerNorm"),
    (dict(embed_norm_layer=False), "embed_norm_layer=False removes the PreLayerNorm"),
    (dict(embed_layer=timm.layers.PatchEmbed), "the PLN models use PreLayerNormPatchEmbed"),
])
@pytest.mark.parametrize("name", ["vit_small_patch16_pln_224", "vit_small_patch16_gab_pln_224"])
def test_pln_refuses_to_be_silently_plain(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _small(name, **kwargs)


@pytest.mark.parametrize("name", ["vit_small_patch16_pln_224", "vit_small_patch16_gab_pln_224"])
def test_pln_embed_norm_layer_none(name):
    """A direct call with None is an error; timm.create_model prunes None kwargs (all models), so PLN stays."""
    with pytest.raises(ValueError, match="embed_norm_layer=None removes the PreLayerNorm"):
        timm.models.model_entrypoint(name)(embed_norm_layer=None, **SMALL)
    assert isinstance(_small(name, embed_norm_layer=None).patch_embed.norm, torch.nn.LayerNorm)


def test_pln_other_norm_is_used():
    model = _small("vit_small_patch16_pln_224", embed_norm_layer="rmsnorm")
    assert type(model.patch_embed.norm).__name__ == "RmsNorm"


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


def _plain_checkpoint(name, tmp_path):
    torch.manual_seed(1)
    host = timm.create_model(HOSTS[name], **SMALL)
    path = tmp_path / "plain.pth"
    torch.save(host.state_dict(), path)
    return host.state_dict(), path


def _assert_plain_weights_and_plugin_init(model, plain_sd, name):
    state = model.state_dict()
    for key, value in plain_sd.items():
        if key not in state:  # the bias-free PLN projection drops the host's projection bias
            assert key == "patch_embed.proj.bias" and "pln" in name, key
            continue
        assert torch.equal(state[key], value), key
    fresh = timm.create_model(name, **SMALL).state_dict()
    new = {k for k in state if k not in plain_sd}
    assert new == set(fresh) - set(plain_sd) and new
    for key in new:  # σ, a, the PLN norm: their initial values
        assert torch.equal(state[key], fresh[key]), key


PLAIN_LOAD_NAMES = ["vit_small_patch16_gab_224", "vit_small_patch16_pln_224", "vit_small_patch16_gab_pln_224",
                    "vit_relpos_small_patch16_gab_224"]


@pytest.mark.parametrize("name", PLAIN_LOAD_NAMES)
def test_plain_checkpoint_loads_strictly_with_load_state_dict(name, tmp_path, caplog):
    plain_sd, _ = _plain_checkpoint(name, tmp_path)
    torch.manual_seed(2)
    model = _small(name)
    with caplog.at_level("INFO", logger="kim_plugins"):
        result = model.load_state_dict(plain_sd)  # strict
    assert not result.missing_keys and not result.unexpected_keys
    _assert_plain_weights_and_plugin_init(model, plain_sd, name)
    said = [r.getMessage() for r in caplog.records if "keep their current values" in r.getMessage()]
    assert len(said) == 1  # one line per load, not one per block


@pytest.mark.parametrize("name", PLAIN_LOAD_NAMES)
def test_plain_checkpoint_loads_through_create_model_checkpoint_path(name, tmp_path):
    plain_sd, path = _plain_checkpoint(name, tmp_path)
    model = timm.create_model(name, checkpoint_path=str(path), **SMALL)  # timm train's --initial-checkpoint
    _assert_plain_weights_and_plugin_init(model, plain_sd, name)


@pytest.mark.parametrize("granularity", ["head", "network"])
def test_plain_checkpoint_loads_for_every_granularity(granularity, tmp_path):
    plain_sd, _ = _plain_checkpoint("vit_small_patch16_gab_224", tmp_path)
    model = _small("vit_small_patch16_gab_224", gab_granularity=granularity)
    model.load_state_dict(plain_sd)
    assert all(torch.all(m.gab_amplitude == 2.0) for m in model.modules() if isinstance(m, GaussianAttentionBias))


def test_wrong_checkpoints_still_fail_by_load_state_dict(tmp_path):
    plain_sd, _ = _plain_checkpoint("vit_small_patch16_gab_pln_224", tmp_path)
    model = _small("vit_small_patch16_gab_pln_224")
    broken = dict(plain_sd)
    del broken["blocks.0.attn.qkv.weight"]  # a host key: still missing
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*blocks\.0\.attn\.qkv\.weight"):
        model.load_state_dict(broken)
    # a module present in part is a broken checkpoint, not a plain one: its absent key stays missing
    own = {k: v for k, v in model.state_dict().items() if k.startswith("blocks.1.gab.")}
    half = dict(plain_sd, **dict(list(own.items())[:1]))
    with pytest.raises(RuntimeError, match=list(own)[1].replace(".", r"\.")):
        model.load_state_dict(half)
    half_norm = dict(plain_sd, **{"patch_embed.norm.weight": torch.ones(model.embed_dim)})
    with pytest.raises(RuntimeError, match=r"patch_embed\.norm\.bias"):
        model.load_state_dict(half_norm)
    # a checkpoint of the other granularity: its keys are unexpected
    other = _small("vit_small_patch16_gab_224", gab_granularity="network").state_dict()
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*gab\."):
        model.load_state_dict(dict(plain_sd, **{k: v for k, v in other.items() if k.startswith("gab.")}))


def test_plugin_checkpoint_round_trips(tmp_path):
    model = _small("vit_small_patch16_gab_pln_224")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, GaussianAttentionBias):
                m.gab_amplitude.fill_(0.25)
        model.patch_embed.norm.bias.fill_(0.5)
    other = _small("vit_small_patch16_gab_pln_224")
    other.load_state_dict(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(other.state_dict()[key], value), key


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


def test_docs_timm_script_snippet_runs_in_a_fresh_interpreter():
    """The 'From a timm script' block of docs/vit_plugins.md, verbatim, in a new process (nothing pre-imported)."""
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
    doc = open(os.path.join(root, "docs", "vit_plugins.md")).read()
    block = re.search(r"## From a timm script\n\n```python\n(.*?)```", doc, re.S).group(1)
    assert "create_optimizer_v2" in block
    # the models on the meta device: the snippet's imports and calls are what is checked, not the init
    code = "import torch\ntorch.set_default_device('meta')\n" + block
    code += "\nassert len(optimizer.param_groups) == 2\n"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root] + sys.path))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
