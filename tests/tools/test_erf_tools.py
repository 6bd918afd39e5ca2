"""tools/erf.py and tools/atrous_rates.py end to end, on CPU, tiny sizes."""
import json
import os

import pytest

from tests.tools import run_tool

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
CONFIGS = os.path.join(ROOT, "configs", "atrous_rates")
UNET_RA = os.path.join(CONFIGS, "unet-s5-d16_deeplabv3-ra_4xb4-40k_stare-128x128.py")


def test_erf_tool_timm(tmp_path):
    out = run_tool("erf", ["resnet18", "--size", "64", "--num-images", "2", "--batch-size", "2",
                           "--out-dir", str(tmp_path)])
    nums = json.load(open(out["json"]))
    assert nums["weights"].startswith("untrained") and nums["input_size"] == [64, 64]
    assert nums["num_images"] == 2 and 1 <= nums["side_50"] <= nums["side_90"]
    assert os.path.getsize(out["png"]) > 5000


@pytest.mark.parametrize("name, host", [("vit_tiny_patch16_gab_224", "vit_tiny_patch16_224"),
                                        ("vit_tiny_patch16_pln_224", "vit_tiny_patch16_224"),
                                        ("resnet18d_sap", "resnet18d")])
def test_erf_tool_timm_plugin_with_plain_checkpoint(name, host, tmp_path):
    import timm
    import torch

    import kim_plugins  # noqa: F401
    vit = name.startswith("vit")
    kwargs = dict(img_size=48, depth=2) if vit else {}
    path = tmp_path / "plain.pth"
    torch.save(timm.create_model(host, **kwargs).state_dict(), path)
    args = [name, "--checkpoint", str(path), "--size", "48", "--num-images", "2", "--batch-size", "2",
            "--out-dir", str(tmp_path)]
    if vit:  # --size builds the fixed-size ViT for 48 px; --model-kwargs passes the rest to create_model
        args += ["--model-kwargs", json.dumps(dict(depth=2))]
    nums = json.load(open(run_tool("erf", args)["json"]))
    assert nums["input_size"] == [48, 48] and nums["weights"] == f"checkpoint {path}"


def test_erf_tool_vit_size_and_model_kwargs(tmp_path):
    from kim_plugins.cli import inputs

    model = inputs.load_timm("vit_tiny_patch16_gab_224", model_kwargs=dict(depth=1, gab_sigma_init=3.0), size=(96, 64))
    assert model.patch_embed.img_size == (96, 64) and len(model.blocks) == 1
    assert float(model.blocks[0].gab.sigma.detach()) == pytest.approx(3.0)
    out = run_tool("erf", ["vit_tiny_patch16_gab_224", "--model-kwargs", '{"img_size": 32, "depth": 1}',
                           "--num-images", "1", "--batch-size", "1", "--out-dir", str(tmp_path)])
    assert json.load(open(out["json"]))["input_size"] == [32, 32]
    with pytest.raises(SystemExit, match="--cfg-options"):
        run_tool("erf", [UNET_RA, "--model-kwargs", '{"depth": 1}', "--out-dir", str(tmp_path)])


def test_erf_tool_images_folder(tmp_path):
    from kim_plugins.dry_run.dataset_fixtures import make_dataset_fixture
    root = make_dataset_fixture("ade20k", str(tmp_path / "data"), num_train=2, num_val=1)
    out = run_tool("erf", ["resnet18", "--size", "48", "64", "--images", os.path.join(root, "images"),
                           "--num-images", "3", "--out-dir", str(tmp_path / "out"), "--name", "r18"])
    nums = json.load(open(out["json"]))
    assert nums["input_size"] == [48, 64] and nums["num_images"] == 3 and out["png"].endswith("r18_erf.png")


def test_erf_tool_mmseg_config(tmp_path):
    out = run_tool("erf", [UNET_RA, "--size", "32", "--num-images", "1", "--out-dir", str(tmp_path)])
    nums = json.load(open(out["json"]))
    assert nums["kind"] == "mmseg segmentor (centre pixel of the decoder features before conv_seg)"
    assert nums["input_size"] == [32, 32] and "stare" in nums["images"]
    logits = run_tool("erf", [UNET_RA, "--size", "32", "--num-images", "1", "--target", "logits",
                              "--out-dir", str(tmp_path / "logits")])
    assert json.load(open(logits["json"]))["kind"] == "mmseg segmentor (centre pixel of the logits)"
    assert logits["numbers"]["sigma_x"] != nums["sigma_x"]  # a different output unit, a different ERF


def test_erf_tool_vit_target_is_tokens_after_the_final_norm(tmp_path):
    out = run_tool("erf", ["vit_tiny_patch16_224", "--num-images", "1", "--batch-size", "1",
                           "--out-dir", str(tmp_path)])
    assert out["numbers"]["kind"] == "timm vision transformer (centre patch token after the final norm)"


def test_atrous_rates_tool_prints_rule(capsys):
    out = run_tool("atrous_rates", ["--crop-size", "512", "1024", "--output-stride", "8"])
    assert out["rates"] == [1, 10, 21, 31]
    assert "dilations=(1, 10, 21, 31)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        run_tool("atrous_rates", ["--crop-size", "512"])


def test_atrous_rates_tool_config_measures_stride(capsys):
    baseline = os.path.join(CONFIGS, "unet-s5-d16_deeplabv3_4xb4-40k_stare-128x128.py")
    rows = run_tool("atrous_rates", [baseline, "--cfg-options", "model.data_preprocessor.size=[64,64]",
                                     "model.backbone.norm_cfg.type=BN"])["heads"]
    assert len(rows) == 1 and rows[0]["output_stride"] == 1 and rows[0]["output_stride_source"] == "measured"
    assert rows[0]["rule"] == [1, 10, 21, 31] and rows[0]["configured"] == [1, 12, 24, 36]
    rows = run_tool("atrous_rates", [UNET_RA])["heads"]
    assert rows[0]["output_stride_source"] == "config" and rows[0]["rule"] == [1, 21, 42, 63]


def test_atrous_rates_search(tmp_path):
    out = run_tool("atrous_rates", [UNET_RA, "--search", "--search-size", "32", "--r-max", "4", "7",
                                    "--grid", "2", "--num-images", "1", "--batch-size", "4",
                                    "--out-dir", str(tmp_path), "--cfg-options",
                                    "model.backbone.base_channels=4", "model.decode_head.in_channels=4",
                                    "model.decode_head.channels=4", "model.auxiliary_head.in_channels=8",
                                    "model.auxiliary_head.channels=4"])
    s = out["search"]
    assert [d["r_max"] for d in s["results"]] == [5, 6, 7]  # r_max=4 gives (1, 1, 3, 4): not distinct
    assert s["rule_rates_at_search_size"] == [1, 5, 10, 15] and s["rule_rates_full"] == [1, 21, 42, 63]
    assert s["max_nondegenerate_r"] == 15 and all(d["non_degenerate"] for d in s["results"])
    assert s["search_best_r_max_non_degenerate"] == s["search_best_r_max"] in (5, 6, 7)
    assert all(0.0 < d["coverage"] <= 1.0 for d in s["results"])
    assert s["weights"].startswith("untrained")
    for p in out["paths"].values():
        assert os.path.getsize(p) > 0


def test_erf_tool_names_the_command_line_spelling_of_allow_uncalibrated(tmp_path):
    """An untrained scale-equalizer config: the error gives --checkpoint and the --cfg-options spelling."""
    smoke = os.path.join(ROOT, "configs", "smoke", "fcn_r18-tiny-d8_1xb2-4i_stare-32x32.py")
    cfg = tmp_path / "se_smoke.py"
    cfg.write_text(f"_base_ = [{os.path.abspath(smoke)!r}]\n"
                   "model = dict(decode_head=dict(_delete_=True, type='SEASPPHead', in_channels=64, in_index=3, "
                   "channels=8, dilations=(1, 2), num_classes=2, norm_cfg=dict(type='BN'), align_corners=False))\n")
    args = [str(cfg), "--num-images", "1", "--out-dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match=r"--checkpoint.*--cfg-options model\.decode_head\.allow_uncalibrated=True"):
        run_tool("erf", args)
    out = run_tool("erf", args + ["--cfg-options", "model.decode_head.allow_uncalibrated=True"])
    assert json.load(open(out["json"]))["num_images"] == 1
