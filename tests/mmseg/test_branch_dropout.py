"""``BranchDropout`` as an mmseg ResNet plugin: position in the bottleneck, eval identity, checkpoint compatibility."""
import pytest
import torch


def _resnet(plugins=None):
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    import kim_plugins.mmseg  # noqa: F401

    init_default_scope("mmseg")
    torch.manual_seed(0)
    return MODELS.build(dict(type="ResNetV1c", depth=50, base_channels=8, stem_channels=8, num_stages=4,
                             out_indices=(0, 1, 2, 3), plugins=plugins))


def test_plugin_sits_after_norm2_relu_and_before_conv3():
    plain = _resnet()
    plain.eval()                                     # mmseg's ResNet.train() returns None: no chaining
    ours = _resnet([dict(cfg=dict(type="BranchDropout", p=0.3), position="after_conv2")])
    ours.load_state_dict(plain.state_dict(), strict=True)
    block = ours.layer2[1]
    assert block.after_conv2_plugin_names == ["branch_dropout"] and block.branch_dropout.p == 0.3
    x = torch.randn(2, 3, 32, 32)
    ours.eval()
    assert all(torch.equal(a, b) for a, b in zip(ours(x), plain(x)))   # no parameter, eval = the plain backbone
    order = []
    for name in ("norm2", "branch_dropout", "conv3"):
        getattr(block, name).register_forward_hook(lambda m, i, o, n=name: order.append(n))
    ours.train()
    ours(x)
    assert order == ["norm2", "branch_dropout", "conv3"]


def test_bad_rate_is_a_clear_error():
    with pytest.raises(ValueError, match="BranchDropout p"):
        _resnet([dict(cfg=dict(type="BranchDropout", p=1.5), position="after_conv2")])
