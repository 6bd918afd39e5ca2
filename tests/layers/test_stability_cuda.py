"""fp16 autocast on CUDA: the NaN-safe depth loss, the log-space depth and temperature-free InfoNCE stay finite and close to float32."""
import pytest
import torch

from kim_plugins.layers.nan_safe_depth import StableSiLogLoss, log_depth_from_logits
from kim_plugins.layers.temperature_free_infonce import TemperatureFreeInfoNCE

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (fp16 autocast)")


def test_fp16_autocast_depth_loss_and_log_space_head_are_finite_and_close_to_float32():
    g = torch.Generator(device="cuda").manual_seed(0)
    target = torch.rand(4, 1, 64, 64, device="cuda", generator=g) * 9 + 0.5
    target[:, :, :8] = 0.0
    target[3] = 0.0                                                  # a crop without valid pixels
    logits = torch.randn(4, 1, 64, 64, device="cuda", generator=g) * 3
    logits[:, :, -4:] = -60.0                                        # saturated pixels
    ref = StableSiLogLoss()(log_depth_from_logits(logits, 10.0), target, pred_is_log=True)
    x = logits.clone().requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.float16):
        y = x * 1.0                                                 # an fp16 op upstream
        loss = StableSiLogLoss()(log_depth_from_logits(y, 10.0), target, pred_is_log=True)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(x.grad).all()
    assert abs(loss.item() - ref.item()) < 1e-2 * ref.item()
    assert (x.grad[:3, :, -4:].abs() > 0).any()                      # saturated pixels keep a gradient


def test_fp16_autocast_temperature_free_infonce_is_finite_and_close_to_float32():
    g = torch.Generator(device="cuda").manual_seed(0)
    z1 = torch.randn(256, 128, device="cuda", generator=g)
    z2 = z1 + 0.1 * torch.randn(256, 128, device="cuda", generator=g)
    z2[:8] = z1[:8]                                                  # s = 1 positives
    ref = TemperatureFreeInfoNCE()(z1, z2)
    a = z1.clone().requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.float16):
        loss = TemperatureFreeInfoNCE()(a.half(), z2.half())
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(a.grad).all()
    assert abs(loss.item() - ref.item()) < 1e-2 * ref.item()
