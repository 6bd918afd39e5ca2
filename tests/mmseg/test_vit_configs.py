"""GAB / PLN ViT configs: pairing with their baselines, optimizer param groups, fine-tuning from a local
plain timm ViT file, and one tiny train + eval per config family on the ADE20K fixture."""
import glob
import os

import pytest
import torch

pytest.importorskip("mmseg.models", reason="mmseg is part of the project's environment (tools/setup.sh)")

import timm  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.optim import build_optim_wrapper  # noqa: E402
from mmseg.registry import MODELS  # noqa: E402
from mmseg.utils import register_all_modules  # noqa: E402

import kim_plugins.mmseg  # noqa: E402,F401
from kim_plugins.dry_run.tiny import run_tiny, tiny_config  # noqa: E402

register_all_modules(init_default_scope=True)

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "configs"))
GAB = os.path.join(ROOT, "gaussian_attention_bias")
PLN = os.path.join(ROOT, "prelayernorm")
CROP = (64, 64)


def _cfg(folder, name):
    return Config.fromfile(os.path.join(folder, name))


@pytest.mark.parametrize("folder, tag, n_pairs", [(GAB, "-gab_", 4), (PLN, "-pln_", 2)])
def test_every_plugin_config_has_its_baseline(folder, tag, n_pairs):
    files = sorted(os.path.basename(f) for f in glob.glob(os.path.join(folder, "vit*.py")))  # Swin: test_swin_gab
    plugin = [f for f in files if tag in f]
    assert len(plugin) == n_pairs and len(files) == 2 * n_pairs
    for f in plugin:
        cfg, base = _cfg(folder, f), _cfg(folder, f.replace(tag, "_"))
        assert "kim_plugins.mmseg" in cfg.custom_imports.imports
        b, bb = cfg.model.backbone.to_dict(), base.model.backbone.to_dict()
        host = timm.create_model(bb["model_name"], pretrained=False, device="meta")
        # the plugin name's host is the baseline's model; everything else is identical
        assert b.pop("model_name") != bb.pop("model_name")
        b.pop("gab_granularity", None)
        if tag == "-gab_":  # the published init, spelled out (supplement §C)
            assert (b.pop("gab_sigma_init"), b.pop("gab_amplitude_init")) == (5.0, 2.0)
        assert b == bb
        assert b["type"] == "LazyPretrainedTIMMBackbone" and b["pretrained"] is True
        assert "file" in b["pretrained_cfg_overlay"]
        if "relpos" in f:
            assert cfg.model.test_cfg.mode == "slide" and "dynamic_img_size" not in b
        else:
            assert cfg.model.test_cfg.mode == "whole" and b["dynamic_img_size"] and b["dynamic_img_pad"]
        assert cfg.model.decode_head == base.model.decode_head and cfg.model.neck == base.model.neck
        assert cfg.model.neck.in_channels == [host.embed_dim] * 4
        assert cfg.train_dataloader == base.train_dataloader and cfg.param_scheduler == base.param_scheduler
        keys = dict(cfg.optim_wrapper.paramwise_cfg.custom_keys)
        if tag == "-gab_":
            assert keys.pop("gab_sigma") == dict(decay_mult=0.0) and keys.pop("gab_amplitude") == dict(decay_mult=0.0)
        assert keys == base.optim_wrapper.paramwise_cfg.custom_keys


def _build(cfg):
    cfg = tiny_config(cfg, "unused", "unused", crop_size=CROP, device="cpu")
    model = MODELS.build(cfg.model)
    model.init_weights()
    return cfg, model


@pytest.mark.parametrize("name", ["vit-gab_vit-s16_mln_upernet_8xb2-160k_ade20k-512x512.py",
                                  "vit-gab_vit-relpos-s16_mln_upernet_8xb2-160k_ade20k-512x512.py"])
def test_optimizer_param_groups_exempt_sigma_and_amplitude_from_decay(name):
    cfg, model = _build(_cfg(GAB, name))
    optim = build_optim_wrapper(model, cfg.optim_wrapper).optimizer
    decay_of = {}
    for group in optim.param_groups:
        for p in group["params"]:
            decay_of[id(p)] = group["weight_decay"]
    named = dict(model.named_parameters())
    gab = [n for n in named if n.endswith((".gab_sigma", ".gab_amplitude"))]
    assert len(gab) == 24  # (σ, a) in each of the 12 blocks
    assert all(decay_of[id(named[n])] == 0.0 for n in gab)
    assert decay_of[id(named["backbone.timm_model.model.blocks.0.attn.qkv.weight"])] == 0.01
    # the model's own list agrees with the config's rule
    assert {n.split("backbone.timm_model.model.", 1)[1] for n in gab} <= \
        model.backbone.timm_model.model.no_weight_decay()


def _plain_vit_file(tmp_path_factory, **kwargs):
    torch.manual_seed(0)
    state = timm.create_model("vit_small_patch16_224", **kwargs).state_dict()
    path = tmp_path_factory.mktemp("pretrain") / "vit_small_patch16_224.pth"
    torch.save(state, path)
    return str(path), state


@pytest.fixture(scope="module")
def plain_vit_file(tmp_path_factory):
    """A plain timm vit_small_patch16_224 checkpoint (random weights, 224 px: its 14x14 position embedding is
    resampled to the config's grid on load)."""
    return _plain_vit_file(tmp_path_factory)


@pytest.fixture(scope="module")
def plain_vit_file_depth4(tmp_path_factory):
    return _plain_vit_file(tmp_path_factory, depth=4)


def _with_file(cfg, path):
    cfg.model.backbone.pretrained = True
    cfg.model.backbone.pretrained_cfg_overlay = dict(file=path)
    return cfg


@pytest.mark.parametrize("folder, name", [
    (GAB, "vit-gab_vit-s16_mln_upernet_8xb2-160k_ade20k-512x512.py"),
    (PLN, "vit-pln_vit-s16_mln_upernet_8xb2-160k_ade20k-512x512.py"),
])
def test_finetune_from_local_plain_vit_file(folder, name, plain_vit_file):
    path, state = plain_vit_file
    cfg = tiny_config(_cfg(folder, name), "unused", "unused", crop_size=CROP, device="cpu")
    model = MODELS.build(_with_file(cfg, path).model)
    model.init_weights()  # mmengine's init must not overwrite the loaded weights
    vit = model.backbone.timm_model.model
    loaded = vit.state_dict()
    for key in ("blocks.3.attn.qkv.weight", "blocks.11.mlp.fc2.bias", "patch_embed.proj.weight", "cls_token"):
        assert torch.equal(loaded[key], state[key]), key
    assert loaded["pos_embed"].shape[1] == 1 + 32 * 32  # resampled to the 512 x 512 grid
    new = sorted(set(loaded) - set(state))
    if "gab" in name:
        assert len(new) == 24
        for key in new:
            expected = torch.tensor(5.0) if key.endswith("gab_sigma") else torch.tensor(2.0)  # supplement §C
            torch.testing.assert_close(loaded[key], expected.reshape(1))
    else:
        assert new == ["patch_embed.norm.bias", "patch_embed.norm.weight"]
        assert torch.all(loaded["patch_embed.norm.weight"] == 1) and torch.all(loaded["patch_embed.norm.bias"] == 0)


@pytest.mark.slow
@pytest.mark.parametrize("folder, name", [
    (GAB, "vit-gab_vit-s16_mln_upernet_8xb2-160k_ade20k-512x512.py"),
    (GAB, "vit-gab_vit-relpos-s16_mln_upernet_8xb2-160k_ade20k-512x512.py"),
    (PLN, "vit-pln_vit-s16_mln_upernet_8xb2-160k_ade20k-512x512.py"),
])
def test_tiny_train_and_eval_on_ade20k_fixture(folder, name, fixture_root, plain_vit_file_depth4, tmp_path):
    cfg = tiny_config(_cfg(folder, name), os.path.join(fixture_root, "ade20k"), str(tmp_path), crop_size=CROP,
                      device="cpu")
    # 4 of the 12 blocks (one per UPerNet level) and narrow heads keep the run within the test budget;
    # the backbone type, its options, the neck and the head types are the config's
    cfg.model.backbone.update(depth=4, out_indices=(0, 1, 2, 3))
    cfg.model.decode_head.channels = 32
    cfg.model.auxiliary_head.channels = 16
    if "relpos" in name:
        cfg.model.backbone.img_size = CROP  # timm's relpos ViT has a fixed input size
    else:
        _with_file(cfg, plain_vit_file_depth4[0])  # the whole path: fine-tune from a local plain ViT file
    metrics = run_tiny(cfg)
    assert {"aAcc", "mIoU"} <= set(metrics)
    assert all(0.0 <= metrics[k] <= 100.0 for k in ("aAcc", "mIoU"))
    ckpt = torch.load(os.path.join(str(tmp_path), "iter_2.pth"), map_location="cpu", weights_only=False)
    keys = ckpt["state_dict"]
    if "gab" in name:
        sigmas = [v for k, v in keys.items() if k.endswith("gab_sigma")]
        assert len(sigmas) == 4
        if "relpos" not in name:  # (relpos: layer scale 1e-6 at init makes the first updates invisibly small)
            assert any(not torch.allclose(s, torch.tensor(5.0)) for s in sigmas)
    else:
        assert "backbone.timm_model.model.patch_embed.norm.weight" in keys


# The config's backbone type and arguments (pretrained=True from pretrain/<host>.pth), a ViT-Ti host and
# narrow heads to keep the checkpoint small.
def _tiny_host(cfg, name):
    host = "vit_tiny_patch16_gab_224" if "gab" in name else "vit_tiny_patch16_pln_224"
    cfg.merge_from_dict({"model.backbone.model_name": host, "model.neck.in_channels": [192] * 4,
                         "model.neck.out_channels": 192, "model.decode_head.in_channels": [192] * 4,
                         "model.decode_head.channels": 16, "model.auxiliary_head.in_channels": 192,
                         "model.auxiliary_head.channels": 16})
    return cfg


S16_PLUGINS = [(GAB, "vit-gab_vit-s16_mln_upernet_8xb2-160k_ade20k-512x512.py"),
               (PLN, "vit-pln_vit-s16_mln_upernet_8xb2-160k_ade20k-512x512.py")]


@pytest.mark.parametrize("folder, name", S16_PLUGINS)
def test_config_builds_for_inference_without_its_pretraining_file(folder, name, tmp_path, monkeypatch):
    """init_model(<vit-gab cfg>, ckpt) where pretrain/*.pth does not exist: the checkpoint has every weight."""
    from mmseg.apis import init_model

    monkeypatch.chdir(tmp_path)  # no pretrain/ folder here
    cfg = _tiny_host(_cfg(folder, name), name)
    assert cfg.model.backbone.pretrained is True and not os.path.exists(cfg.model.backbone.pretrained_cfg_overlay.file)
    trained = MODELS.build(cfg.model)
    ckpt = str(tmp_path / "trained.pth")
    torch.save({"state_dict": trained.state_dict(), "meta": {}}, ckpt)
    model = init_model(cfg.copy(), ckpt, device="cpu")
    for k, v in trained.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


@pytest.mark.parametrize("folder, name", S16_PLUGINS)
def test_training_without_the_pretraining_file_names_it_where_it_comes_from_and_the_way_out(folder, name, tmp_path,
                                                                                           monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = MODELS.build(_tiny_host(_cfg(folder, name), name).model)
    with pytest.raises(FileNotFoundError) as err:
        model.init_weights()  # what mmengine's runner calls when training starts
    msg = str(err.value)
    for part in ("'pretrain/vit_small_patch16_224.pth'", "model.backbone.pretrained_cfg_overlay.file",
                 "timm.create_model('vit_small_patch16_224', pretrained=True)", "--no-pretrained"):
        assert part in msg, part


def test_lazy_backbone_loads_what_mmseg_timm_backbone_loads_and_leaves_the_random_stream(tmp_path):
    """Same weights as mmseg's TIMMBackbone(pretrained=True) built with the same arguments, same RNG state after."""
    from mmseg.models.backbones import TIMMBackbone

    torch.manual_seed(1)
    path = str(tmp_path / "vit_tiny_patch16_224.pth")
    torch.save(timm.create_model("vit_tiny_patch16_224").state_dict(), path)
    args = dict(model_name="vit_tiny_patch16_gab_224", features_only=True, pretrained=True,
                pretrained_cfg_overlay=dict(file=path), out_indices=(2, 5, 8, 11), img_size=CROP,
                dynamic_img_size=True, dynamic_img_pad=True)
    torch.manual_seed(0)
    reference = TIMMBackbone(**args)
    rng_after_reference = torch.get_rng_state()
    torch.manual_seed(0)
    lazy = MODELS.build(dict(type="LazyPretrainedTIMMBackbone", **args))
    lazy.init_weights()
    assert torch.equal(torch.get_rng_state(), rng_after_reference)
    ref_state = reference.state_dict()
    assert lazy.state_dict().keys() == ref_state.keys()
    for k, v in lazy.state_dict().items():
        assert torch.equal(v, ref_state[k]), k
