"""Every registered kim_plugins timm name under graph capture, as timm's own model suite checks its models.

timm's ``tests/test_models.py`` traces each model with torch.fx through
torchvision's feature extractor, given timm's lists of modules and functions
not to trace into, and checks: the traced forward equals the eager one; a
traced training forward/backward reaches every parameter; the model scripts
with TorchScript; the FX-traced model scripts too. Here the same four checks
run on every name (shrunk: fewer blocks, small inputs), plus ``torch.export``
and ``torch.compile`` without graph breaks for the Gaussian-attention-bias
models, whose eval-time bias cache and CPU training attention must stay out
of a captured graph.
"""
import pkgutil

import pytest
import timm
import torch
from timm.models import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import kim_plugins.timm
from kim_plugins.layers.stochastic_pool import (StochasticAdaptiveAvgPool1d, StochasticAdaptiveAvgPool2d,
                                                StochasticAvgPool1d, StochasticAvgPool2d, StochasticAvgPool2dSame)

FAMILIES = sorted(m.name for m in pkgutil.iter_modules(kim_plugins.timm.__path__))
NAMES = timm.list_models(module=FAMILIES)
# each family shrunk to a few blocks and a small input; a family not listed runs at its default size
SHRINK = {"kim_vit": dict(img_size=32, depth=2), "kim_resnet": dict(layers=(1, 1, 1, 1))}
INPUT = {"kim_vit": 32, "kim_resnet": 64}
# the GAB hosts and granularities, one case each (the granularities differ in where the bias module sits)
GAB_CASES = [("vit_tiny_patch16_gab_224", "block"), ("vit_tiny_patch16_gab_224", "network"),
             ("vit_relpos_small_patch16_gab_224", "network"), ("vit_small_patch16_gab_pln_224", "head")]


def _family(name):
    return next(f for f in FAMILIES if name in timm.list_models(module=f))


def _build(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, **dict(SHRINK.get(_family(name), {}), **kwargs))


def _input(name, batch=1):
    size = INPUT.get(_family(name), 224)
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def _fx(model):
    """The model traced the way timm's suite traces it: its final node, timm's no-trace lists as leaves."""
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                         param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    return create_feature_extractor(model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]],
                                    tracer_kwargs=tracer_kwargs)


def _only(outputs):
    values = list(outputs.values())
    assert len(values) == 1
    return values[0]


def test_every_family_is_covered():
    assert {"kim_vit", "kim_resnet"} <= set(FAMILIES) and len(NAMES) >= 14


@pytest.mark.parametrize("name", NAMES)
def test_fx_forward_equals_eager(name):
    model = _build(name).eval()
    x = _input(name)
    with torch.inference_mode():
        expected = model(x)
        traced = _fx(model)
        got = _only(traced(x))
    assert torch.equal(got, expected)


@pytest.mark.parametrize("name", NAMES)
def test_fx_backward_reaches_every_parameter(name):
    model = _build(name, num_classes=42).train()
    traced = _fx(model)
    out = _only(traced(_input(name, batch=2)))
    assert out.shape == (2, 42) and torch.isfinite(out).all()
    out.mean().backward()
    no_grad = [n for n, p in traced.named_parameters() if p.grad is None]
    assert not no_grad
    assert sum(p.numel() for p in traced.parameters()) == sum(p.numel() for p in model.parameters())


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("fx_first", [False, True], ids=["torchscript", "fx_then_torchscript"])
def test_torchscript_equals_eager(name, fx_first):
    with timm.set_scriptable(True):
        model = _build(name).eval()
    x = _input(name)
    scripted = torch.jit.script(_fx(model) if fx_first else model)
    with torch.inference_mode():
        out = scripted(x)
        torch.testing.assert_close(_only(out) if fx_first else out, model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, granularity", GAB_CASES)
def test_fx_without_timm_lists_traces_through_the_bias(name, granularity):
    """torchvision's create_feature_extractor as users call it: no leaf lists, the bias becomes plain graph ops."""
    model = _build(name, num_classes=42, gab_granularity=granularity).train()
    x = _input(name, batch=2)
    train_nodes, eval_nodes = get_graph_node_names(model)
    assert any(n.startswith("gab.") or ".gab." in n for n in eval_nodes)  # traced into, not a leaf
    traced = create_feature_extractor(model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]])
    out = _only(traced(x))
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    out.mean().backward()
    assert all(p.grad is not None for p in traced.parameters())
    traced.eval(), model.eval()
    with torch.no_grad():
        torch.testing.assert_close(_only(traced(x)), model(x), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- torch.export / torch.compile


@pytest.mark.parametrize("name, granularity", GAB_CASES)
def test_export_eval_runs_like_eager(name, granularity):
    model = _build(name, gab_granularity=granularity).eval()
    x = _input(name, batch=2)
    with torch.no_grad():
        model(x)  # a filled eval-time bias cache must not leak into the export
        exported = torch.export.export(model, (x,))
        torch.testing.assert_close(exported.module()(x), model(x), rtol=1e-5, atol=1e-5)
        # the graph holds σ and a, not a baked bias: a new amplitude changes the exported program's output
        for m in model.modules():
            if hasattr(m, "gab_amplitude"):
                m.gab_amplitude.fill_(3.0)
        again = torch.export.export(model, (x,)).module()
        torch.testing.assert_close(again(x), model(x), rtol=1e-5, atol=1e-5)


def test_export_relpos_with_gradients_runs_like_its_host():
    """As above for the relpos host; its own exported training graph differs from eager by ~5e-8 (float64)."""
    model = _Features(_build("vit_relpos_small_patch16_gab_224")).train()
    x = _input("vit_relpos_small_patch16_gab_224", batch=2)
    exported = torch.export.export(model, (x,)).module()
    out = exported(x)
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    gab = [n for n, _ in model.named_parameters() if "gab_" in n]
    grads = torch.autograd.grad(out.square().mean(), [exported.get_parameter(n) for n in gab])
    assert all(torch.isfinite(g).all() and torch.count_nonzero(g) > 0 for g in grads)


def test_jit_trace_keeps_sigma_and_amplitude_live():
    """torch.jit.trace (and exporters built on it) records the bias formula, not the eval-time cached bias."""
    model = _build("vit_tiny_patch16_gab_224").eval()
    x = _input("vit_tiny_patch16_gab_224", batch=2)
    with torch.no_grad():
        model(x)  # fills the cache
        traced = torch.jit.trace(model, (x,))
        for m in model.modules():
            if hasattr(m, "gab_amplitude"):
                m.gab_amplitude.fill_(3.0)
        torch.testing.assert_close(traced(x), model(x), rtol=1e-5, atol=1e-5)


def test_export_with_dynamic_batch_and_grid_builds_the_bias_per_call():
    """``dynamic_img_size``: the exported program's grid (and so its bias) follows the input, as in eager."""
    model = _build("vit_tiny_patch16_gab_224", dynamic_img_size=True).eval()
    batch, h, w = torch.export.Dim("batch", min=1, max=8), torch.export.Dim("h", max=8), torch.export.Dim("w", max=8)
    exported = torch.export.export(model, (torch.randn(2, 3, 32, 48),),
                                   dynamic_shapes={"x": {0: batch, 2: 16 * h, 3: 16 * w}}).module()
    with torch.no_grad():
        for shape in [(3, 3, 64, 32), (1, 3, 48, 80)]:
            x = torch.randn(*shape)
            torch.testing.assert_close(exported(x), model(x), rtol=1e-5, atol=1e-5)


class _Features(torch.nn.Module):
    """``forward_features`` as the forward: a loss on every token reaches σ and a of every block."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_features(x)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_gab_224", "vit_small_patch16_gab_pln_224"])
def test_export_with_gradients_runs_and_backpropagates_like_eager(name):
    """Training mode, gradients on: the CPU hand-written attention stays out; values and gradients match (float64)."""
    model = _Features(_build(name)).train().double()
    x = _input(name, batch=2).double()
    exported = torch.export.export(model, (x,)).module()
    gab = [n for n, _ in model.named_parameters() if "gab_" in n]
    out = model(x)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad((out * weight).sum(), [model.get_parameter(n) for n in gab])
    out_exported = exported(x)
    torch.testing.assert_close(out_exported, out, rtol=1e-5, atol=1e-5)
    exported_grads = torch.autograd.grad((out_exported * weight).sum(), [exported.get_parameter(n) for n in gab])
    scale = max(float(g.abs().max()) for g in grads)
    assert scale > 0
    for n, a, b in zip(gab, exported_grads, grads):
        assert torch.count_nonzero(b) > 0, n
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9 * scale, msg=n)


@pytest.mark.parametrize("name, host", [("vit_tiny_patch16_gab_224", "vit_tiny_patch16_224"),
                                        ("vit_relpos_small_patch16_gab_224", "vit_relpos_small_patch16_224")])
@pytest.mark.parametrize("train", [False, True])
def test_compile_has_no_graph_break_where_the_host_has_none(name, host, train):
    x = _input(name, batch=2)
    counts = []
    for n in (host, name):
        model = timm.create_model(n, img_size=32, depth=1).train(train)
        torch._dynamo.reset()
        counts.append(torch._dynamo.explain(model)(x).graph_break_count)
    torch._dynamo.reset()
    assert counts == [0, 0]


# ----------------------------------------------------------------------------- SAP pools under TorchScript


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
@pytest.mark.parametrize("pool, shape", [
    (StochasticAvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False), (2, 3, 9, 7)),
    (StochasticAvgPool2d(2, divisor_override=3), (2, 3, 8, 8)),
    (StochasticAvgPool2dSame(3, 2), (2, 3, 9, 8)),      # timm's 'SAME' padding, odd and even sizes
    (StochasticAvgPool2dSame((2, 3), (2, 1)), (1, 2, 7, 5)),
    (StochasticAdaptiveAvgPool2d(1, flatten=True), (2, 3, 5, 5)),
    (StochasticAdaptiveAvgPool2d((2, 3)), (2, 3, 7, 8)),
    (StochasticAvgPool1d(3, 2, 1), (2, 3, 9)),
    (StochasticAdaptiveAvgPool1d(2), (2, 3, 7)),
])
def test_scripted_sap_pool_is_the_plain_pool_in_eval_and_refuses_training(pool, shape):
    x = torch.randn(*shape)
    pool.eval()
    scripted = torch.jit.script(pool)
    assert torch.equal(scripted(x), pool(x))
    scripted.train()
    with pytest.raises(torch.jit.Error, match="evaluation mode only"):  # the RuntimeError, raised in TorchScript
        scripted(x)
