"""Even-kernel ResNets (dead-pixel paper) and even_kernel_convert on timm ResNets."""
import pytest
import timm
import torch

import kim_plugins  # noqa: F401  registers the models
from kim_plugins.layers.dead_pixel import even_kernel_changes, even_kernel_convert
from kim_plugins.timm.even_kernel_resnet import EvenKernelResNet

SIZE = 64


@pytest.mark.parametrize("name, conv", [("resnet18", "conv1"), ("resnet50", "conv2")])
def test_convert_timm_resnet_is_the_authors_layer_list_and_function_preserving(name, conv):
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    ref = model(x)
    changes = {c.name: c for c in even_kernel_changes(model)}
    expected = {"conv1", "maxpool"} | {f"layer{i}.0.{s}" for i in (2, 3, 4) for s in (conv, "downsample.0")}
    assert set(changes) == expected  # my_model.py's my_resnet{18,50}_pad list
    even_kernel_convert(model)
    assert model.conv1.weight.shape[-2:] == (8, 8)
    assert model.layer2[0].downsample[0].weight.shape[-2:] == (2, 2)
    assert getattr(model.layer3[0], conv).weight.shape[-2:] == (4, 4)
    torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["resnet18_even", "resnet50_even"])
def test_registered_even_models_have_no_odd_stride2_kernel(name):
    assert name in timm.list_models("*_even")
    model = timm.create_model(name, num_classes=7)
    assert isinstance(model, EvenKernelResNet) and model.maxpool.kernel_size == (4, 4)
    assert even_kernel_changes(model, maxpool=True) == []  # every stride-2 kernel is even now
    assert (model.conv1.weight[..., 7, :] != 0).any()  # fresh weights, not zero-padded
    cfg = model.pretrained_cfg
    assert model.get_submodule(cfg["first_conv"]) is model.conv1 and model.get_submodule(cfg["classifier"]) is model.fc
    out = model(torch.randn(2, 3, SIZE, SIZE))
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_plain_weights_load_zero_padded_and_keep_the_convs(tmp_path):
    torch.manual_seed(0)
    plain = timm.create_model("resnet18").eval()
    path = tmp_path / "resnet18.pth"
    torch.save(plain.state_dict(), path)
    even = timm.create_model("resnet18_even", pretrained=True, even_maxpool=False,
                             pretrained_cfg_overlay=dict(file=str(path))).eval()
    assert (even.conv1.weight[..., 7, :] == 0).all()
    x = torch.randn(1, 3, SIZE, SIZE)
    torch.testing.assert_close(even(x), plain(x), atol=1e-5, rtol=0)


def test_even_model_under_bf16_autocast_stays_close_to_float32():
    torch.manual_seed(0)
    model = timm.create_model("resnet18_even", num_classes=10, zero_init_last=False).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() <= 0.05 * ref.abs().max()


def test_features_only_gives_the_plain_resnet_shapes():
    x = torch.randn(1, 3, SIZE, SIZE)
    even = [f.shape for f in timm.create_model("resnet18_even", features_only=True).eval()(x)]
    plain = [f.shape for f in timm.create_model("resnet18", features_only=True).eval()(x)]
    assert even == plain
