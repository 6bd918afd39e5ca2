"""The flex-attention path of the Gaussian attention bias (bias computed in the kernel, never materialised).

Checked on CPU in float64 against the explicit computation written out here
from the formula ``B[q, k] = a² · exp(-(dh² + dw²) / (2σ²))`` (zero for prefix
rows and columns), values and gradients for σ and a.
"""
import pytest
import torch

from kim_plugins.layers.gaussian_attention_bias import (FLEX_MIN_TOKENS, GaussianAttentionBias,
                                                        flex_attention_available, flex_gaussian_attention,
                                                        use_flex_gaussian_attention)

pytestmark = pytest.mark.skipif(not flex_attention_available(), reason="torch without flex_attention")


def explicit_attention(q, k, v, sigma, amplitude, grid, num_prefix):
    """softmax(q kᵀ / sqrt(d) + B) v with B built entry by entry from the patch coordinates."""
    h, w = grid
    coords = [(i // w, i % w) for i in range(h * w)]
    d2 = torch.tensor([[(a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2 for b in coords] for a in coords], dtype=q.dtype)
    bias = amplitude[:, None, None] ** 2 * torch.exp(-d2 / (2 * sigma[:, None, None] ** 2))
    tokens = num_prefix + h * w
    full = torch.zeros(bias.shape[0], tokens, tokens, dtype=q.dtype)
    full[:, num_prefix:, num_prefix:] = bias
    logits = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5 + full
    return logits.softmax(-1) @ v


def _inputs(heads, grid, num_prefix, batch=2, dim=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = num_prefix + grid[0] * grid[1]
    return [torch.randn(batch, heads, t, dim, generator=g, dtype=torch.float64) for _ in range(3)]


@pytest.mark.parametrize("grid,num_prefix,per_head", [((3, 5), 0, False), ((4, 3), 1, False), ((3, 3), 5, True),
                                                      ((1, 6), 2, True)])
def test_values_and_sigma_amplitude_gradients_match_explicit_float64(grid, num_prefix, per_head):
    heads = 3
    q, k, v = _inputs(heads, grid, num_prefix)
    p = heads if per_head else 1
    sigma0 = torch.tensor([0.7, 1.9, 3.1][:p], dtype=torch.float64)
    amp0 = torch.tensor([1.3, -0.6, 2.2][:p], dtype=torch.float64)
    w = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    results = []
    for fn in (flex_gaussian_attention, explicit_attention):
        sigma, amp = sigma0.clone().requires_grad_(), amp0.clone().requires_grad_()
        out = fn(q, k, v, sigma, amp, grid, num_prefix)
        (out * w).sum().backward()
        results.append((out.detach(), sigma.grad, amp.grad))
    (out_f, ds_f, da_f), (out_e, ds_e, da_e) = results
    torch.testing.assert_close(out_f, out_e, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ds_f, ds_e, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(da_f, da_e, rtol=1e-10, atol=1e-12)
    assert ds_e.abs().min() > 1e-6 and da_e.abs().min() > 1e-6  # the gradients checked are not trivially zero


def test_module_attention_flex_equals_materialised_in_values_and_parameter_gradients():
    torch.manual_seed(0)
    gab = GaussianAttentionBias((3, 4), num_heads=2, granularity="head", num_prefix_tokens=1).double()
    with torch.no_grad():
        for i, prm in enumerate(gab.parameters()):  # move σ, a away from their initial values
            prm.add_(torch.tensor([0.3, -0.2], dtype=torch.float64) * (i + 1))
    q, k, v = _inputs(2, (3, 4), 1)
    grads, outs = [], []
    for flex in (True, False):
        gab.flex = flex
        gab.zero_grad(set_to_none=True)
        out = gab.attention(q, k, v)
        out.pow(2).sum().backward()
        outs.append(out.detach())
        grads.append([prm.grad.clone() for prm in gab.parameters()])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)
    for g_flex, g_mat in zip(*grads):
        torch.testing.assert_close(g_flex, g_mat, rtol=1e-10, atol=1e-12)


def test_automatic_selection():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert use_flex_gaussian_attention(FLEX_MIN_TOKENS, cuda)
    assert not use_flex_gaussian_attention(FLEX_MIN_TOKENS - 1, cuda)
    assert not use_flex_gaussian_attention(10 ** 6, cpu)  # CPU flex is an unfused reference: never automatic
    assert not use_flex_gaussian_attention(10 ** 6, cuda, dropout_p=0.1)  # flex has no attention dropout
    assert use_flex_gaussian_attention(5, cuda, min_tokens=5)
    assert use_flex_gaussian_attention(5, cpu, flex=True)
    assert not use_flex_gaussian_attention(10 ** 6, cuda, flex=False)
    with pytest.raises(RuntimeError, match="dropout"):
        use_flex_gaussian_attention(10, cuda, dropout_p=0.1, flex=True)


def test_token_count_must_match_the_grid():
    q, k, v = _inputs(2, (3, 3), 1)
    one = torch.ones(1, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"grid \(3, 4\)"):
        flex_gaussian_attention(q, k, v, one, one, (3, 4), 1)
    with pytest.raises(ValueError, match="1 or heads"):
        flex_gaussian_attention(q, k, v, torch.ones(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64),
                                (3, 3), 1)


@pytest.mark.parametrize("granularity", ["block", "head"])
def test_gab_vit_with_the_bias_in_the_kernel_equals_the_materialised_bias(granularity):
    import timm

    import kim_plugins.timm  # noqa: F401  registrations
    from kim_plugins.timm.kim_vit import GabBlock

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_gab_224", img_size=48, gab_granularity=granularity,
                              num_classes=5).eval()
    with torch.no_grad():
        gab_params = [p for n, p in model.named_parameters() if ".gab." in n]
        for i, prm in enumerate(gab_params):  # distinct σ, a per block (and head) so a mixed-up module would show
            prm.add_(0.05 * i + 0.1 * torch.arange(prm.numel(), dtype=prm.dtype))
    x = torch.randn(2, 3, 48, 48)
    gabs = [m for m in model.modules() if isinstance(m, GaussianAttentionBias)]
    calls = []
    hooks = [b.attn.register_forward_hook(lambda *a: calls.append(1)) for b in model.blocks]  # plain path only
    with torch.no_grad():
        for g in gabs:
            g.flex = False
        ref = model(x)
        n_plain = len(calls)
        for g in gabs:
            g.flex = True
        out = model(x)
    for h in hooks:
        h.remove()
    assert n_plain == len(model.blocks) and len(calls) == n_plain  # the flex path bypassed attn.forward
    assert isinstance(model.blocks[0], GabBlock)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert (out - ref).abs().max() < 1e-4 and ref.abs().max() > 0
