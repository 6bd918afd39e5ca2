"""Gaussian attention bias: the formula entry by entry, gradients, the eval cache, the attention op, errors."""
import math

import pytest
import torch
import torch.nn.functional as F

from kim_plugins.layers.gaussian_attention_bias import (
    GAB_PARAMS,
    GaussianAttentionBias,
    _machine_eps,
    attention_with_bias,
    packed_attention_with_bias,
    gaussian_attention_bias,
    grid_distance_sq,
)


def _expected_bias(grid, sigmas, amps, num_prefix):
    """Formula a² exp(-(dh² + dw²) / (2σ²)) written out with Python loops, zero prefix rows/columns."""
    h, w = grid
    n = num_prefix + h * w
    out = torch.zeros(1, len(sigmas), n, n, dtype=torch.float64)
    for p, (sigma, amp) in enumerate(zip(sigmas, amps)):
        for qi in range(h * w):
            for ki in range(h * w):
                dh = qi // w - ki // w
                dw = qi % w - ki % w
                out[0, p, num_prefix + qi, num_prefix + ki] = amp ** 2 * math.exp(-(dh * dh + dw * dw) / (2 * sigma ** 2))
    return out


def _set(module, sigmas, amps):
    sigmas = torch.tensor(sigmas, dtype=torch.float64)
    with torch.no_grad():
        module._sigma_parameter().copy_(sigmas.log() if module.param == "log" else sigmas)
        module.gab_amplitude.copy_(torch.tensor(amps, dtype=torch.float64))


def test_distance_is_row_major_patch_order():
    d2 = grid_distance_sq((2, 3))
    # index = h * W + w: patch 1 is (0, 1), patch 5 is (1, 2)
    assert d2[1, 5].item() == 1 + 1
    assert d2[0, 5].item() == 1 + 4
    assert d2[3, 2].item() == 1 + 4
    assert torch.equal(d2, d2.T) and torch.all(d2.diagonal() == 0)


@pytest.mark.parametrize("num_prefix", [0, 1, 3])
@pytest.mark.parametrize("granularity", ["block", "network"])
def test_bias_equals_formula_one_parameter(granularity, num_prefix):
    gab = GaussianAttentionBias((3, 4), num_heads=5, granularity=granularity, sigma_init=1.7,
                                amplitude_init=-0.8, num_prefix_tokens=num_prefix, dtype=torch.float64)
    bias = gab()
    assert bias.shape == (1, 1, num_prefix + 12, num_prefix + 12)
    torch.testing.assert_close(bias, _expected_bias((3, 4), [1.7], [-0.8], num_prefix), rtol=1e-12, atol=0)
    if num_prefix:
        assert torch.all(bias[..., :num_prefix, :] == 0) and torch.all(bias[..., :, :num_prefix] == 0)
    # the diagonal is a², the maximum of every row
    torch.testing.assert_close(bias[0, 0, num_prefix:, num_prefix:].diagonal(),
                               torch.full((12,), 0.64, dtype=torch.float64))


@pytest.mark.parametrize("param", GAB_PARAMS)
def test_bias_equals_formula_per_head(param):
    sigmas, amps = [0.5, 2.0, 7.0], [1.0, 0.3, -2.0]
    gab = GaussianAttentionBias((4, 3), num_heads=3, granularity="head", num_prefix_tokens=1, dtype=torch.float64,
                                param=param)
    assert gab._sigma_parameter().shape == (3,) and gab.gab_amplitude.shape == (3,)
    _set(gab, sigmas, amps)
    torch.testing.assert_close(gab((4, 3)), _expected_bias((4, 3), sigmas, amps, 1), rtol=1e-12, atol=0)


@pytest.mark.parametrize("param", GAB_PARAMS)
def test_fresh_bias_is_published_init(param):
    """Supplement §C: A0 = 2, σ0 = 5, so the diagonal is 4 and an offset d gives 4·exp(-d²/50)."""
    gab = GaussianAttentionBias((6, 5), num_heads=3, num_prefix_tokens=1, dtype=torch.float64, param=param)
    bias = gab()[0, 0, 1:, 1:]
    torch.testing.assert_close(bias.diagonal(), torch.full((30,), 4.0, dtype=torch.float64), rtol=0, atol=0)
    d2 = grid_distance_sq((6, 5), dtype=torch.float64)
    torch.testing.assert_close(bias, 4.0 * torch.exp(-d2 / 50.0), rtol=1e-14, atol=0)
    assert bias[0, 29].item() == pytest.approx(4.0 * math.exp(-(25 + 16) / 50.0), rel=1e-14)  # (0,0)-(5,4)


def test_raw_is_the_default_and_log_is_the_option():
    raw, log = GaussianAttentionBias(2, num_heads=1), GaussianAttentionBias(2, num_heads=1, param="log")
    assert [n for n, _ in raw.named_parameters()] == ["gab_sigma", "gab_amplitude"]
    assert [n for n, _ in log.named_parameters()] == ["gab_sigma_log", "gab_amplitude"]
    assert raw.gab_sigma.item() == 5.0 and log.gab_sigma_log.item() == pytest.approx(math.log(5.0))
    assert raw.gab_amplitude.item() == log.gab_amplitude.item() == 2.0
    torch.testing.assert_close(raw.sigma, log.sigma)
    torch.testing.assert_close(raw(), log(), rtol=1e-6, atol=0)


def test_log_sigma_stays_positive():
    gab = GaussianAttentionBias(2, num_heads=1, param="log")
    with torch.no_grad():
        gab.gab_sigma_log.fill_(-20.0)  # any real value of the parameter is a valid, positive σ
    assert gab.sigma.item() > 0 and torch.isfinite(gab()).all()


def test_raw_sigma_sign_does_not_matter_and_zero_is_guarded():
    gab = GaussianAttentionBias((3, 3), num_heads=1, sigma_init=1.5, dtype=torch.float64)
    positive = gab()
    with torch.no_grad():
        gab.gab_sigma.neg_()
    torch.testing.assert_close(gab(), positive, rtol=0, atol=0)
    assert gab.sigma.item() == 1.5
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        gab = GaussianAttentionBias((3, 3), num_heads=1, dtype=dtype)
        with torch.no_grad():
            gab.gab_sigma.zero_()
        bias = gab()  # σ = 0: the limit, a² on the diagonal and ~0 elsewhere, and finite gradients
        assert torch.equal(bias[0, 0].diagonal(), torch.full((9,), 4.0, dtype=dtype))
        torch.testing.assert_close(bias[0, 0], 4.0 * torch.eye(9, dtype=dtype), rtol=0, atol=1e-26)  # bf16: 4e^-64
        bias.sum().backward()
        assert torch.isfinite(gab.gab_sigma.grad).all() and torch.isfinite(gab.gab_amplitude.grad).all()


def test_machine_eps_is_finfo():
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        assert _machine_eps(dtype) == torch.finfo(dtype).eps


def test_amplitude_zero_gives_zero_bias_of_full_shape_and_warns_that_it_never_trains():
    with pytest.warns(UserWarning, match=r"amplitude_init=0.*never"):
        gab = GaussianAttentionBias((2, 2), num_heads=2, amplitude_init=0.0, num_prefix_tokens=1)
    bias = gab()
    assert bias.shape == (1, 1, 5, 5) and torch.count_nonzero(bias) == 0
    # what the warning says: every gradient of σ and a is exactly 0, whatever the loss
    gab.train()
    (gab() * torch.randn(1, 1, 5, 5)).sum().backward()
    assert all(torch.count_nonzero(p.grad) == 0 for p in gab.parameters())


@pytest.mark.parametrize("param", GAB_PARAMS)
def test_gradients_match_closed_form(param):
    gab = GaussianAttentionBias((3, 3), num_heads=1, sigma_init=2.0, amplitude_init=1.5, num_prefix_tokens=1,
                                dtype=torch.float64, param=param)
    weights = torch.randn(1, 1, 10, 10, dtype=torch.float64)
    (gab() * weights).sum().backward()
    sigma, amp = 2.0, 1.5
    d2 = F.pad(grid_distance_sq((3, 3), dtype=torch.float64), [1, 0, 1, 0])
    g = torch.exp(-d2 / (2 * sigma ** 2))
    g[0, :] = 0
    g[:, 0] = 0
    w = weights[0, 0]
    d_amp = (w * 2 * amp * g).sum()
    d_sigma = (w * amp ** 2 * g * d2 / sigma ** 3).sum()  # d/dσ of exp(-d2 / 2σ²) = G d2 / σ³
    torch.testing.assert_close(gab.gab_amplitude.grad, d_amp.reshape(1))
    # d/d log σ = σ d/dσ
    torch.testing.assert_close(gab._sigma_parameter().grad, (d_sigma * sigma if param == "log" else d_sigma).reshape(1))


def test_grid_follows_the_call():
    gab = GaussianAttentionBias(None, num_heads=1, sigma_init=1.0, dtype=torch.float64)
    for grid in [(2, 5), (5, 2), (1, 1)]:
        torch.testing.assert_close(gab(grid), _expected_bias(grid, [1.0], [2.0], 0), rtol=1e-12, atol=0)
    with pytest.raises(RuntimeError, match="needs the patch grid"):
        gab()


class TestEvalCache:
    def test_cached_in_eval_without_grad(self):
        gab = GaussianAttentionBias((3, 3), num_heads=2).eval()
        with torch.no_grad():
            first = gab()
            assert gab() is first
            other = gab((2, 4))
            assert other.shape[-1] == 8 and gab((2, 4)) is other and gab() is first

    def test_not_cached_in_train_or_when_grad_is_needed(self):
        gab = GaussianAttentionBias((3, 3), num_heads=2)
        with torch.no_grad():
            assert gab() is not gab()  # training mode: always recomputed
        gab.eval()
        bias = gab()  # eval with grad enabled: σ, a must still get gradients (e.g. ERF, frozen-BN fine-tuning)
        assert bias.requires_grad
        bias.sum().backward()
        assert gab.gab_sigma.grad is not None

    @pytest.mark.parametrize("change", ["optimizer_step", "load_state_dict", "to_double", "train_eval", "copy_"])
    def test_invalidated_when_parameters_change(self, change):
        gab = GaussianAttentionBias((3, 3), num_heads=1, sigma_init=2.0).eval()
        with torch.no_grad():
            stale = gab().clone()
        if change == "optimizer_step":
            gab.train()
            opt = torch.optim.SGD(gab.parameters(), lr=0.5)
            gab().sum().backward()
            opt.step()
            gab.eval()
        elif change == "load_state_dict":
            gab.load_state_dict({"gab_sigma": torch.tensor([0.1]), "gab_amplitude": torch.tensor([3.0])})
        elif change == "to_double":
            gab.double()
        elif change == "train_eval":
            with torch.no_grad():
                gab.gab_amplitude.data.mul_(2)  # bypasses version tracking; a mode switch drops the cache
            gab.train().eval()
        elif change == "copy_":
            with torch.no_grad():
                gab.gab_amplitude.copy_(torch.tensor([0.5]))
        with torch.no_grad():
            fresh = gab.compute_bias((3, 3))
            cached = gab()
        torch.testing.assert_close(cached, fresh, rtol=0, atol=0)
        if change == "to_double":
            assert stale.dtype == torch.float32 and cached.dtype == torch.float64
        else:
            assert not torch.allclose(cached, stale)

    def test_inference_mode_tensors_do_not_leak_into_autograd(self):
        gab = GaussianAttentionBias((2, 2), num_heads=1).eval().requires_grad_(False)
        with torch.inference_mode():
            gab()
        q = torch.randn(1, 1, 4, 8, requires_grad=True)
        out = F.scaled_dot_product_attention(q, q, q, attn_mask=gab())
        out.sum().backward()  # would fail if the inference-mode bias were returned
        assert q.grad is not None


@pytest.mark.parametrize("bias_shape", [(1, 1, 7, 7), (1, 3, 7, 7), (2, 1, 7, 7), (7, 7)])
def test_attention_with_bias_matches_sdpa(bias_shape):
    torch.manual_seed(0)
    qkv = torch.randn(2, 7, 3, 3, 8, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(bias_shape, dtype=torch.float64, requires_grad=True)

    def run(fn):
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # non-contiguous, as in timm's Attention
        out = fn(q, k, v, bias)
        return (out,) + torch.autograd.grad((out * torch.linspace(-1, 1, 8, dtype=out.dtype)).sum(), (qkv, bias))

    ours = run(attention_with_bias)
    ref = run(lambda q, k, v, b: F.scaled_dot_product_attention(q, k, v, attn_mask=b))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bias_shape", [(1, 1, 7, 7), (1, 3, 7, 7), (2, 1, 7, 7), (2, 3, 7, 7), (7, 7)])
def test_packed_attention_with_bias_matches_split_sdpa(bias_shape):
    torch.manual_seed(0)
    qkv = torch.randn(2, 7, 3 * 3 * 8, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(bias_shape, dtype=torch.float64, requires_grad=True)
    weight = torch.linspace(-1, 1, 24, dtype=torch.float64)

    def reference():
        q, k, v = qkv.reshape(2, 7, 3, 3, 8).permute(2, 0, 3, 1, 4).unbind(0)  # timm's Attention
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=0.3).transpose(1, 2).reshape(2, 7, 24)

    outs = []
    for fn in (lambda: packed_attention_with_bias(qkv, 3, bias, scale=0.3), reference):
        out = fn()
        outs.append((out,) + torch.autograd.grad((out * weight).sum(), (qkv, bias)))
    assert outs[0][0].grad_fn.name().startswith("_PackedAttentionWithLearnableBias")  # the hand-written path ran
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_packed_attention_with_bias_default_scale_and_sdpa_cases():
    torch.manual_seed(0)
    qkv = torch.randn(1, 5, 3 * 2 * 4)
    q, k, v = qkv.reshape(1, 5, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
    bias = torch.randn(1, 2, 5, 5, requires_grad=True)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).reshape(1, 5, 8)
    torch.testing.assert_close(packed_attention_with_bias(qkv, 2, bias), expected, rtol=1e-6, atol=1e-6)
    with torch.no_grad():  # constant bias: SDPA itself, bit for bit
        out = packed_attention_with_bias(qkv, 2, bias)
        assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).reshape(1, 5, 8))
    with pytest.raises(ValueError, match="qkv width 24 is not 3 x num_heads \\(5\\)"):
        packed_attention_with_bias(qkv, 5, bias)


def test_attention_with_bias_uses_sdpa_when_bias_is_constant():
    q = torch.randn(1, 2, 5, 4)
    bias = torch.randn(1, 1, 5, 5)
    torch.testing.assert_close(attention_with_bias(q, q, q, bias), F.scaled_dot_product_attention(q, q, q, bias),
                               rtol=0, atol=0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(granularity="layer"), "unknown GAB granularity 'layer'"),
    (dict(param="exp"), "unknown GAB param 'exp'; use one of \\('raw', 'log'\\)"),
    (dict(sigma_init=-1.0), "sigma_init must be a finite number > 0"),
    (dict(sigma_init=0.0), "sigma_init must be a finite number > 0"),
    (dict(amplitude_init=float("nan")), "amplitude_init must be a finite number"),
    (dict(num_prefix_tokens=-1), "num_prefix_tokens must be an int >= 0"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GaussianAttentionBias((2, 2), num_heads=2, **kwargs)


def test_bad_grid_and_heads():
    with pytest.raises(ValueError, match=r"grid_size must be a positive int or a \(height, width\) pair"):
        GaussianAttentionBias((0, 3), num_heads=2)
    with pytest.raises(ValueError, match="num_heads must be an int >= 1"):
        GaussianAttentionBias((2, 2), num_heads=0)


@pytest.mark.parametrize("param", GAB_PARAMS)
def test_functional_form_matches_module(param):
    sigma = torch.tensor([0.3, 1.1])
    amp = torch.tensor([0.7, 1.2])
    gab = GaussianAttentionBias((3, 2), num_heads=2, granularity="head", num_prefix_tokens=2, param=param)
    with torch.no_grad():
        gab._sigma_parameter().copy_(sigma)
        gab.gab_amplitude.copy_(amp)
    torch.testing.assert_close(gab(), gaussian_attention_bias(sigma, amp, (3, 2), 2, param))


@pytest.mark.parametrize("param", GAB_PARAMS)
@pytest.mark.parametrize("granularity, num_prefix", [("block", 0), ("head", 1), ("network", 3)])
def test_training_path_gradients_pass_gradcheck(granularity, num_prefix, param):
    """The module's hand-written backward (closed-form d/dσ or d/d log σ, d/da) against finite differences."""
    gab = GaussianAttentionBias((3, 2), num_heads=2, granularity=granularity, num_prefix_tokens=num_prefix,
                                dtype=torch.float64, param=param)
    sigma_param = gab._sigma_parameter()
    with torch.no_grad():
        if param == "log":
            sigma_param.uniform_(-0.5, 1.0)
        else:  # both signs of the raw σ
            sigma_param.copy_(torch.linspace(-2.5, 1.7, sigma_param.numel()))
        gab.gab_amplitude.uniform_(-1.5, 1.5)
    weights = torch.randn(gab().shape, dtype=torch.float64)

    def f(sigma, amplitude):
        with torch.no_grad():
            sigma_param.copy_(sigma)
            gab.gab_amplitude.copy_(amplitude)
        out = gab((3, 2))
        return (out * weights).sum(), torch.autograd.grad((out * weights).sum(), (sigma_param, gab.gab_amplitude))

    s0, a0 = sigma_param.detach().clone(), gab.gab_amplitude.detach().clone()
    _, (gs, ga) = f(s0, a0)
    eps = 1e-6
    for i in range(s0.numel()):
        e = torch.zeros_like(s0)
        e[i] = eps
        fd_s = (f(s0 + e, a0)[0] - f(s0 - e, a0)[0]) / (2 * eps)
        fd_a = (f(s0, a0 + e)[0] - f(s0, a0 - e)[0]) / (2 * eps)
        torch.testing.assert_close(gs[i], fd_s, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(ga[i], fd_a, rtol=1e-6, atol=1e-8)


def test_distance_cache_follows_device_and_dtype():
    gab = GaussianAttentionBias(None, num_heads=1)
    gab((2, 3))
    gab.double()
    bias = gab((2, 3))
    assert bias.dtype == torch.float64  # (σ was rounded to float32 before the move: 1e-7)
    torch.testing.assert_close(bias, _expected_bias((2, 3), [5.0], [2.0], 0), rtol=1e-7, atol=0)


@pytest.mark.parametrize("tokens", [197, 200, 5])
def test_sdpa_mask_layout_keeps_values_and_has_the_strides_sdpa_takes_without_a_copy(tokens):
    from kim_plugins.layers.gaussian_attention_bias import SDPA_MASK_ALIGNMENT, sdpa_mask_layout
    bias = torch.randn(1, 3, tokens, tokens, dtype=torch.float64)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        out = sdpa_mask_layout(bias, dtype)
        assert out.shape == bias.shape and out.dtype == dtype
        assert torch.equal(out, bias.to(dtype))  # the cast SDPA's autocast would do, bit for bit
        # torch's aligned_tensor<8> (attention.cpp): every stride but the last a multiple of 8, the last 1
        assert out.stride(-1) == 1 and all(s % SDPA_MASK_ALIGNMENT == 0 for s in out.stride()[:-1])
    q, k, v = torch.randn(3, 2, 3, tokens, 8).unbind(0)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.float())
    assert torch.equal(F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask_layout(bias, torch.float32)), ref)


def test_eval_cache_stores_the_sdpa_layout_on_its_devices_and_recomputes_for_another_dtype(monkeypatch):
    import kim_plugins.layers.gaussian_attention_bias as gab_mod
    monkeypatch.setattr(gab_mod, "_SDPA_LAYOUT_DEVICES", ("cpu",))  # the CUDA branch, exercised on CPU
    m = GaussianAttentionBias((3, 4), num_heads=2, granularity="head", num_prefix_tokens=1).eval()
    with torch.no_grad():
        m.gab_sigma.copy_(torch.tensor([1.3, 3.1]))
    ref = m.compute_bias((3, 4)).detach()
    with torch.no_grad():
        first = m((3, 4))
        assert m((3, 4)) is first  # cached
    assert torch.equal(first, ref)  # 1 + 3 * 4 = 13 tokens, rows padded to 16
    assert all(s % 8 == 0 for s in first.stride()[:-1]) and not first.is_contiguous()
    m.double()  # another parameter dtype: a new entry in that dtype
    with torch.no_grad():
        assert m((3, 4)).dtype == torch.float64
    monkeypatch.setattr(gab_mod, "_SDPA_LAYOUT_DEVICES", ())
    m.clear_cache()
    with torch.no_grad():
        assert m((3, 4)).is_contiguous()  # CPU default: the plain bias


class _FunctionalBias(torch.nn.Module):
    def __init__(self, param):
        super().__init__()
        self.param = param
        self.sigma = torch.nn.Parameter(torch.tensor([1.7, 0.9]))
        self.amplitude = torch.nn.Parameter(torch.tensor([2.0, -1.1]))

    def forward(self, x):
        return x + gaussian_attention_bias(self.sigma, self.amplitude, (3, 4), 1, self.param)


@pytest.mark.parametrize("param", GAB_PARAMS)
def test_functional_bias_traces_with_torch_fx(param):
    """Plain torch.fx symbolic tracing (no leaf lists): the dtype-dependent σ → 0 guard is one graph node."""
    model = _FunctionalBias(param)
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(13, 13)
    torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)
    assert any(n.op == "call_function" and getattr(n.target, "__name__", "") == "_inv_two_var"
               for n in traced.graph.nodes)
    traced(x).sum().backward()
    assert torch.isfinite(model.sigma.grad).all() and torch.count_nonzero(model.sigma.grad) == 2
