"""GAB, PLN and SAP timm models under ``torch.autocast`` (CPU bfloat16): finite and close to float32.

One forward and backward of a small model (img_size 32, depth 2 for the ViTs; a 16-channel ResNet-18-D at output
stride 8 for SAP) in float32 and under CPU bf16 autocast, same weights, same input, same random draws. Stated
tolerances (relative L2 error against float32):

- ViTs (GAB, PLN, GAB + PLN, relpos GAB): logits <= 2e-2 and the whole gradient (every parameter) <= 2e-2 in
  train mode; logits <= 2e-2 in eval mode (measured 4e-3 to 9e-3, as the plain timm hosts).
- SAP ResNet: logits <= 3e-2; whole gradient <= 1.5x the plain timm ResNet's own bf16 error (measured 0.25 vs
  0.19: the zero-initialised residual BN gammas make a ResNet's gradient bf16-sensitive at init).
"""
import pytest
import timm
import torch
import torch.nn.functional as F

import kim_plugins  # noqa: F401  registers the names

VIT = dict(img_size=32, depth=2, num_classes=10)
RESNET = dict(channels=(16, 32, 64, 128), stem_width=16, output_stride=8, num_classes=10)


def _errors(model, train=True):
    """(logit error, gradient error, all finite) of bf16 autocast against float32, relative L2."""
    model.train(train)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.arange(8) % 10
    runs = []
    for enabled in (False, True):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)  # the same SAP draws in both runs
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            out = model(x)
        if train:
            F.cross_entropy(out.float(), y).backward()
            grad = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
        else:
            grad = torch.zeros(1)
        runs.append((out.detach().float(), grad))
    (o32, g32), (o16, g16) = runs
    finite = bool(torch.isfinite(o16).all() and torch.isfinite(g16).all())
    rel = lambda a, b: float((a - b).norm() / b.norm().clamp_min(1e-30))  # noqa: E731
    return rel(o16, o32), (rel(g16, g32) if train else 0.0), finite


@pytest.mark.parametrize("name, kwargs", [
    ("vit_small_patch16_gab_224", {}),
    ("vit_small_patch16_gab_224", dict(global_pool="avg")),
    ("vit_relpos_small_patch16_gab_224", {}),
    ("vit_tiny_patch16_pln_224", {}),
    ("vit_small_patch16_pln_224", {}),
    ("vit_small_patch16_gab_pln_224", {}),
])
@pytest.mark.parametrize("train", [True, False])
def test_vit_plugins_under_autocast(name, kwargs, train):
    torch.manual_seed(0)
    model = timm.create_model(name, **dict(VIT, **kwargs))
    out_err, grad_err, finite = _errors(model, train)
    assert finite
    assert out_err < 2e-2, out_err
    assert grad_err < 2e-2, grad_err
    if train:
        gab = [p for n, p in model.named_parameters() if "gab_" in n]
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in gab)


def test_sap_resnet_under_autocast():
    torch.manual_seed(0)
    sap = timm.create_model("resnet18d_sap", **RESNET)
    torch.manual_seed(0)
    host = timm.create_model("resnet18d", **RESNET)
    host.load_state_dict(sap.state_dict())
    sap_out, sap_grad, finite = _errors(sap)
    host_out, host_grad, _ = _errors(host)
    assert finite
    assert sap_out < 3e-2, sap_out
    assert sap_grad <= 1.5 * host_grad, (sap_grad, host_grad)
