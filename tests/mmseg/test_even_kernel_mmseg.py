"""even_kernel_convert on mmseg ResNet backbones, and tools/dead_pixel_test.py on an mmseg config."""
import os

import pytest
import torch

pytest.importorskip("mmseg.models", reason="mmseg is part of the project's environment (tools/setup.sh)")

from kim_plugins.layers.dead_pixel import even_kernel_changes, even_kernel_convert  # noqa: E402
from tests.tools import run_tool  # noqa: E402

SMOKE = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "smoke", "fcn_r18-tiny-d8_1xb2-4i_stare-32x32.py")


def _backbone(**cfg):
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    init_default_scope("mmseg")
    torch.manual_seed(0)
    model = MODELS.build(cfg)
    model.init_weights()
    model.eval()  # mmseg's ResNet.train() returns None
    return model


@pytest.mark.parametrize("cfg, strided", [
    (dict(type="ResNet", depth=18, base_channels=8, stem_channels=8),
     {"conv1", "maxpool"} | {f"layer{i}.0.{s}" for i in (2, 3, 4) for s in ("conv1", "downsample.0")}),
    (dict(type="ResNetV1c", depth=50, base_channels=8, stem_channels=8, strides=(1, 2, 1, 1),
          dilations=(1, 1, 2, 4)),
     {"stem.0", "maxpool", "layer2.0.conv2", "layer2.0.downsample.0"}),
])
def test_mmseg_resnet_conversion_keeps_every_stage_output(cfg, strided):
    model = _backbone(**cfg)
    x = torch.randn(2, 3, 64, 64)
    ref = model(x)
    assert {c.name for c in even_kernel_changes(model)} == strided
    even_kernel_convert(model)
    assert even_kernel_changes(model) == [c for c in even_kernel_changes(model) if c.kind == "maxpool"]
    for a, b in zip(model(x), ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_dead_pixel_tool_on_an_mmseg_config(tmp_path):
    out = run_tool("dead_pixel_test", [SMOKE, "--size", "32", "--num-images", "2", "--init", "pad",
                                       "--no-maxpool", "--out-dir", str(tmp_path)])
    nums = out["numbers"]
    assert nums["kind"] == "mmseg backbone" and list(nums["before"]) == ["out0", "out1", "out2", "out3"]
    for stage in nums["before"]:  # zero-padded kernels, max-pool kept: the same function, the same ERF
        assert nums["after"][stage]["ratio"] == pytest.approx(nums["before"][stage]["ratio"], rel=1e-5)
