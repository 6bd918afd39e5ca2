"""Dead pixel test (kim_plugins.layers.dead_pixel): lattice ratios against exact window counts."""
import math

import pytest
import torch
from torch import nn

from kim_plugins.layers.dead_pixel import (dead_pixel_report, even_kernel_changes, even_kernel_convert,
                                           stage_dead_pixel_reports)
from kim_plugins.layers.erf import erf_maps


def _ones_conv(k, stride, padding):
    conv = nn.Conv2d(1, 1, k, stride=stride, padding=padding, bias=False)
    nn.init.ones_(conv.weight)
    return conv


def _erf(net, size=32):
    """ERF of the centre unit of ``net`` (positive linear nets: independent of the images)."""
    images = torch.randn(2, 1, size, size, generator=torch.Generator().manual_seed(0))
    return erf_maps(net, images, target="output")[0]


def _after_5x5(conv):
    """``conv`` then an all-ones 5x5 stride-1 window: the centre unit sums 5x5 outputs of ``conv``."""
    return nn.Sequential(conv, _ones_conv(5, 1, 2))


def test_3x3_stride2_has_per_axis_ratio_exactly_2():
    # Window i covers rows 2i-1..2i+1: odd rows are covered twice, even rows once.
    rep = dead_pixel_report(_erf(_after_5x5(_ones_conv(3, 2, 1))))
    assert math.isclose(rep.axis_ratios[0], 2.0, rel_tol=1e-12)
    assert math.isclose(rep.axis_ratios[1], 2.0, rel_tol=1e-12)
    assert math.isclose(rep.ratio, 4.0, rel_tol=1e-12)  # 2D classes: (2 x 2) / (1 x 1)
    # The class covered once per axis gets 1/4 of the best class: dead at threshold 0.5.
    m = rep.class_means
    assert int(torch.argmax(m)) == 3 and int(torch.argmin(m)) == 0  # (odd, odd) best, (even, even) worst
    dead = rep.dead_map
    assert dead[14:20:2, 14:20:2].all() and not dead[15:20:2, 15:20:2].any()
    assert not dead[:4].any()  # outside the ERF nothing counts


def test_4x4_stride2_has_ratio_exactly_1():
    rep = dead_pixel_report(_erf(_after_5x5(_ones_conv(4, 2, 1))))
    assert math.isclose(rep.ratio, 1.0, rel_tol=1e-12)
    assert rep.axis_ratios == pytest.approx((1.0, 1.0), rel=1e-12)
    assert rep.dead_fraction == 0.0


def test_1x1_stride2_leaves_odd_pixels_dead():
    erf = _erf(_after_5x5(_ones_conv(1, 2, 0)))
    rep = dead_pixel_report(erf)
    assert rep.ratio == math.inf and rep.axis_ratios == (math.inf, math.inf)
    assert (erf[1::2] == 0).all() and (erf[:, 1::2] == 0).all()
    box = rep.dead_map[12:21, 12:21]  # the 5x5 outputs read input pixels 12..20
    assert box[1::2].all() and box[:, 1::2].all() and not box[::2, ::2].any()
    assert rep.dead_fraction == pytest.approx(56 / 81)  # inside = the 9x9 box, 25 pixels alive


@pytest.mark.parametrize("k, expected", [(3, 2.0), (4, 1.0)])
def test_two_stride2_layers_even_kernel_removes_the_lattice(k, expected):
    # Two stacked stride-2 layers: 3x3 leaves the lattice (1D counts 1,1,2,1,2,1,1 -> odd 6 / even 3),
    # 4x4 tiles the input evenly at period 2 and 4.
    net = nn.Sequential(_ones_conv(k, 2, 1), _ones_conv(k, 2, 1))
    erf = _erf(net, size=32)
    assert dead_pixel_report(erf).axis_ratios[0] == pytest.approx(expected, rel=1e-12)
    if k == 4:
        assert dead_pixel_report(erf, period=4).ratio == pytest.approx(1.0, rel=1e-12)


def test_report_rejects_bad_input():
    with pytest.raises(ValueError, match="period"):
        dead_pixel_report(torch.ones(8, 8), period=1)
    with pytest.raises(ValueError, match="threshold"):
        dead_pixel_report(torch.ones(8, 8), threshold=1.5)
    with pytest.raises(ValueError, match="non-negative"):
        dead_pixel_report(-torch.ones(8, 8))
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        dead_pixel_report(torch.ones(1, 8, 8))


class _TinyResNetStem(nn.Module):
    """conv 7x7/2, max-pool 3/2, a stride-2 basic block with a 1x1/2 shortcut (the layout of a ResNet)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.conv2 = nn.Conv2d(8, 16, 3, 2, 1)
        self.down = nn.Conv2d(8, 16, 1, 2, 0, groups=8)
        self.conv3 = nn.Conv2d(16, 16, 3, 1, 1)

    def forward(self, x):
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        return self.conv3(torch.relu(self.conv2(x))) + self.down(x)


def test_convert_lists_the_authors_layers_and_keeps_the_function():
    torch.manual_seed(0)
    net = _TinyResNetStem().eval()
    x = torch.randn(2, 3, 32, 48)
    ref = net(x)
    changes = {c.name: c for c in even_kernel_changes(net)}
    assert set(changes) == {"conv1", "maxpool", "conv2", "down"}
    assert changes["conv1"].new_kernel == (8, 8) and changes["down"].new_kernel == (2, 2)
    assert not changes["maxpool"].applied and "maxpool=True" in changes["maxpool"].reason
    even_kernel_convert(net)
    assert net.conv1.weight.shape[-2:] == (8, 8) and net.maxpool.kernel_size == 3
    assert (net.conv1.weight[..., 7, :] == 0).all() and (net.conv1.weight[..., :, 7] == 0).all()
    torch.testing.assert_close(net(x), ref, atol=1e-5, rtol=0)
    even_kernel_convert(net, maxpool=True)
    assert net.maxpool.kernel_size == (4, 4) and net(x).shape == ref.shape
    assert not torch.allclose(net(x), ref, atol=1e-5)  # the max-pool change is not function-preserving


def test_convert_fresh_draws_nonzero_taps_and_rejects_bad_init():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1))
    even_kernel_convert(net, init="fresh")
    assert (net[0].weight[..., 3, :] != 0).any()
    with pytest.raises(ValueError, match="init"):
        even_kernel_convert(net, init="zeros")


def test_convert_reports_convs_it_cannot_change():
    class SameConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(x)

    net = nn.Sequential(SameConv(3, 4, 3, 2, 1), nn.Conv2d(3, 4, 3, 2, 2, dilation=2))
    changes = even_kernel_changes(net)
    assert [c.applied for c in changes] == [False, False]
    even_kernel_convert(net)
    assert net[0].kernel_size == (3, 3) and net[1].kernel_size == (3, 3)


def test_stage_reports_of_a_timm_resnet():
    import timm
    model = timm.create_model("resnet18", pretrained=False)
    reps = stage_dead_pixel_reports(model, torch.randn(1, 3, 64, 64), batch_size=1)
    assert list(reps) == ["act1", "layer1", "layer2", "layer3", "layer4"]
    erf, rep = reps["act1"]
    assert erf.shape == (64, 64) and rep.ratio >= 1.0
