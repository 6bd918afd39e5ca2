"""``TemperatureFreeInfoNCELoss`` through mmseg's registry: same value as the layer, loss conventions."""
import torch

from kim_plugins.layers.temperature_free_infonce import info_nce_loss, temperature_free_info_nce_loss


def test_registered_loss_builds_and_weights_the_layer_loss():
    import kim_plugins.mmseg  # noqa: F401
    from mmseg.registry import MODELS

    z1, z2 = torch.randn(8, 16), torch.randn(8, 16)
    loss = MODELS.build(dict(type="TemperatureFreeInfoNCELoss", loss_weight=0.5))
    assert loss.loss_name == "loss_infonce"
    assert torch.equal(loss(z1, z2), 0.5 * temperature_free_info_nce_loss(z1, z2))
    baseline = MODELS.build(dict(type="TemperatureFreeInfoNCELoss", temperature=0.07))
    assert torch.equal(baseline(z1, z2), info_nce_loss(z1, z2, temperature=0.07))
