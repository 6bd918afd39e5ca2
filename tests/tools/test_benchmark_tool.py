"""tools/benchmark.py (speed with A/A control, FLOPs, parameters) and the SDPA FLOP handler."""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from mmengine.analysis import FlopAnalyzer
from mmengine.analysis import complexity_analysis as ca

from kim_plugins.cli import benchmark as bench
from kim_plugins.config.inspect import build_segmentor
from kim_plugins.mmseg.complexity import SDPA_OP, sdpa_flop_jit
from tests.tools import run_tool

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SMOKE = os.path.join(REPO, "configs", "smoke", "fcn_r18-tiny-d8_1xb2-4i_stare-32x32.py")


class _SDPA(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


def test_sdpa_flops_match_a_hand_count_and_vanish_without_the_handler(monkeypatch):
    # B=2, heads=3, L=5 queries, S=7 keys, E=4, Ev=6: QK^T = 2*3*5*7*4, AV = 2*3*5*7*6
    q, k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, 6)
    assert ca._DEFAULT_SUPPORTED_FLOP_OPS[SDPA_OP] is sdpa_flop_jit
    assert FlopAnalyzer(_SDPA(), (q, k, v)).total() == 2 * 3 * 5 * 7 * (4 + 6)
    monkeypatch.delitem(ca._DEFAULT_SUPPORTED_FLOP_OPS, SDPA_OP)
    assert FlopAnalyzer(_SDPA(), (q, k, v)).total() == 0  # mmengine alone: silently nothing


def test_timm_attention_fused_and_manual_paths_count_the_same_flops():
    from timm.layers import Attention

    dim, heads, n = 16, 2, 9
    attn = Attention(dim, num_heads=heads).eval()
    x = torch.randn(1, n, dim)
    hand = n * dim * 3 * dim + n * dim * dim + heads * n * n * 2 * (dim // heads)  # qkv, proj, QK^T + AV
    attn.fused_attn = True
    fused = FlopAnalyzer(attn, (x,)).total()
    attn.fused_attn = False
    manual = FlopAnalyzer(attn, (x,)).total()
    assert fused == manual == hand


def test_sdpa_handler_rejects_inconsistent_shapes():
    class _V:
        def __init__(self, shape):
            self.shape = shape

        def isCompleteTensor(self):
            return True

        def type(self):
            s = self.shape

            class _T:
                def sizes(self):
                    return s
            return _T()

    with pytest.raises(ValueError, match="inconsistent attention shapes"):
        sdpa_flop_jit([_V([1, 2, 5, 4]), _V([1, 2, 7, 3]), _V([1, 2, 7, 4])], [])


@pytest.fixture(scope="module")
def plugin_cfg(tmp_path_factory):
    p = tmp_path_factory.mktemp("cfg") / "fcn-sap_r18-tiny-d8_1xb2-4i_stare-32x32.py"
    p.write_text(f"_base_ = [{SMOKE!r}]\nmodel = dict(backbone=dict(type='ResNetV1dSAP', sap_keep_prob=0.5))\n")
    return str(p)


def test_benchmark_compares_two_configs_with_aa_control_flops_and_params(plugin_cfg, tmp_path):
    out = str(tmp_path / "bench")
    rows = run_tool("benchmark", [SMOKE, plugin_cfg, "--shape", "32", "48", "--batch-size", "2", "--rounds", "3",
                                  "--warmup", "1", "--flops", "--device", "cpu", "--out", out])
    base, plugin = "fcn_r18-tiny-d8_1xb2-4i_stare-32x32", "fcn-sap_r18-tiny-d8_1xb2-4i_stare-32x32"
    assert [r["name"] for r in rows] == [base, base + " (A/A)", plugin]
    for r in rows:
        assert r["median_ms"] > 0 and r["img_per_s"] == pytest.approx(2e3 / r["median_ms"])
        assert r["ratio_q1"] <= r["ratio"] <= r["ratio_q3"]
    assert rows[0]["ratio"] == 1.0
    # parameters and FLOPs are the built models' own
    model = build_segmentor(bench.load_config(SMOKE, None), None, torch.device("cpu"))
    n_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("auxiliary_head."))
    assert rows[0]["params"] == n_params
    inputs = model.data_preprocessor(bench.random_batch((32, 48), 2), False)["inputs"]
    assert rows[0]["flops"] == FlopAnalyzer(model, inputs).total() > 0
    assert rows[2]["flops_ratio"] == pytest.approx(rows[2]["flops"] / rows[0]["flops"])
    saved = json.load(open(out + ".json"))
    assert [r["name"] for r in saved] == [r["name"] for r in rows]
    assert saved[0]["meta"]["source"] == "random input 32x48, batch 2"
    assert "(A/A)" in open(out + ".md").read()


def test_benchmark_on_test_dataloader_batches(fixture_root):
    rows = run_tool("benchmark", [SMOKE, "--data", "--tiny", os.path.join(fixture_root, "stare"), "--rounds", "3",
                                  "--warmup", "0", "--device", "cpu"])
    assert rows[0]["_meta"]["source"].startswith("test dataloader of fcn_r18-tiny-d8_1xb2-4i_stare-32x32 (2 batches")
    assert rows[0]["img_per_s"] > 0 and "flops" not in rows[0]


def test_benchmark_argument_errors():
    with pytest.raises(SystemExit):
        bench.parse_args([SMOKE, SMOKE, "--checkpoint", "a.pth"])
    with pytest.raises(SystemExit):
        bench.parse_args([SMOKE, "--tiny", "/nowhere"])
