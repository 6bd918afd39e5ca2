"""GAB attention and SAP pooling under ``torch.autocast`` (CPU bfloat16): float32 where the methods need it.

Tolerances (measured on this machine, CPU bf16, stated in docs/vit_plugins.md and
docs/stochastic_pooling.md):

- GAB attention with bf16 q, k, v and a float32 bias: the output is within 1e-2 (relative L2) of a float64
  computation on the same bf16 q, k, v (measured 2.4e-3: the bf16 value product and output rounding) and the
  bias gradient within 2e-2 (measured 7e-3); the bias itself enters the logits in float32.
- SAP: the window sums run in float32 whatever the input dtype, so a bf16 input gives exactly the float32
  computation of the same draw rounded once to bf16.
"""
import pytest
import torch

from kim_plugins.layers.gaussian_attention_bias import (GaussianAttentionBias, attention_with_bias,
                                                        packed_attention_with_bias)
from kim_plugins.layers.stochastic_pool import (StochasticAdaptiveAvgPool2d, StochasticAvgPool1d,
                                                StochasticAvgPool2d)

B, H, N, D = 2, 3, 17, 16  # 1 class token + a 4x4 patch grid


def _qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=g).bfloat16() for _ in range(3)]


def _attention(path, q, k, v, bias):
    if path == "split":
        return attention_with_bias(q, k, v, bias)
    packed = torch.stack((q, k, v), dim=2).permute(0, 3, 2, 1, 4).reshape(B, N, 3 * H * D)  # timm's layout
    return packed_attention_with_bias(packed, H, bias).reshape(B, N, H, D).transpose(1, 2)


def _reference(q, k, v, bias64):
    probs = torch.softmax(q.double() @ k.double().transpose(-2, -1) * D ** -0.5 + bias64, dim=-1)
    return probs @ v.double()


def _gab_bias():
    return GaussianAttentionBias(None, H, "head", 5.0, 1.0, 1)((4, 4)).detach()


@pytest.mark.parametrize("path", ["split", "packed"])
@pytest.mark.parametrize("grad", [False, True])
def test_gab_bias_enters_the_logits_in_float32_under_autocast(path, grad):
    """A bias change far below bf16 resolution (2^-12 at 1) still changes the attention output."""
    q, k, v = _qkv()
    bias = torch.zeros(1, H, N, N)
    bias[..., 5] = 1.0
    nudged = bias.clone()
    nudged[..., 5] += 2.0 ** -12  # bf16 rounds 1 + 2^-12 to 1
    bias.requires_grad_(grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = _attention(path, q, k, v, bias).float()
        b = _attention(path, q, k, v, nudged).float()
    assert not torch.equal(a, b)


@pytest.mark.parametrize("path", ["split", "packed"])
def test_gab_attention_under_autocast_is_close_to_float64(path):
    q, k, v = _qkv()
    bias = _gab_bias().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _attention(path, q, k, v, bias)
    d_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out.float() * d_out).sum().backward()
    bias64 = bias.detach().double().requires_grad_()
    ref = _reference(q, k, v, bias64)
    (ref * d_out.double()).sum().backward()
    assert torch.isfinite(out.float()).all() and torch.isfinite(bias.grad).all()
    assert bias.grad.dtype == torch.float32
    assert float((out.detach().double() - ref.detach()).norm() / ref.detach().norm()) < 1e-2
    assert float((bias.grad.double() - bias64.grad).norm() / bias64.grad.norm()) < 2e-2


def test_gab_module_gives_a_float32_bias_under_autocast():
    gab = GaussianAttentionBias(None, H, "block", 5.0, 1.0, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bias = gab((4, 4))
    assert bias.dtype == torch.float32
    torch.testing.assert_close(bias, gab((4, 4)))


@pytest.mark.parametrize("pool, shape", [
    (StochasticAdaptiveAvgPool2d(1), (2, 4, 48, 48)),          # global pooling: 2304 positions, 1152 kept
    (StochasticAvgPool2d(3, 2, padding=1, count_include_pad=False), (2, 4, 15, 15)),
    (StochasticAvgPool1d(4, 4), (2, 4, 64)),
])
def test_sap_window_sums_in_float32(pool, shape):
    """bf16 input (alone or under autocast) = the float32 computation of the same draw, rounded once to bf16."""
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3 + 100).bfloat16()
    pool.train()
    torch.manual_seed(7)
    ref = pool(x.float()).bfloat16()
    torch.manual_seed(7)
    assert torch.equal(pool(x), ref)
    torch.manual_seed(7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pool(x)
    assert torch.equal(out, ref)
    # a bf16 running sum would drift by far more than one final rounding: 1152 terms of ~100 in bf16 steps of 0.5
    xr = x.float().requires_grad_()
    torch.manual_seed(7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = pool(xr.bfloat16())
    y.float().sum().backward()
    assert torch.isfinite(xr.grad).all() and float(xr.grad.sum()) == pytest.approx(y.numel(), rel=1e-2)
