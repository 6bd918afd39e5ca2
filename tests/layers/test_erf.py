"""Tests of the effective receptive field toolkit (METHODS.md §6)."""
import math

import pytest
import torch
from torch import nn

from kim_plugins.layers.erf import (centred_square_side, effective_receptive_field, erf_coverage, erf_maps,
                                    fit_gaussian_2d, grid_positions, resolve_target, segmentation_logits_target)


def _positive_conv(cin, cout, k, dilation=1, stride=1, padding=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, stride=stride, dilation=dilation, bias=True,
                     padding=dilation * (k // 2) if padding is None else padding)
    with torch.no_grad():
        conv.weight.copy_(torch.rand(conv.weight.shape, generator=g) + 0.1)
        conv.bias.normal_()
    return conv


def _support(erf):
    return {tuple(ix) for ix in torch.nonzero(erf > 0).tolist()}


def _images(n=3, size=(21, 25), c=3, seed=0):
    return torch.randn(n, c, *size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_single_conv_is_its_kernel_footprint(k):
    conv = _positive_conv(3, 4, k)
    images = _images()
    erf = erf_maps(conv, images, target="output")[0]
    h, w = images.shape[-2:]
    cy, cx = h // 2, w // 2
    expected = torch.zeros(h, w, dtype=torch.float64)
    kernel = conv.weight.detach().double().mean(dim=(0, 1))  # channel-averaged output, RGB-averaged input
    expected[cy - k // 2:cy + k // 2 + 1, cx - k // 2:cx + k // 2 + 1] = kernel / kernel.sum()
    torch.testing.assert_close(erf, expected, rtol=1e-6, atol=1e-12)
    assert centred_square_side(erf, 1.0) == k


@pytest.mark.parametrize("n", [1, 2, 4])
def test_stack_of_3x3_convs_has_2n_plus_1_support(n):
    net = nn.Sequential(*[_positive_conv(3 if i == 0 else 4, 4, 3, seed=i) for i in range(n)])
    images = _images(size=(31, 31))
    erf = erf_maps(net, images, target="output")[0]
    c = 15
    assert _support(erf) == {(y, x) for y in range(c - n, c + n + 1) for x in range(c - n, c + n + 1)}
    assert centred_square_side(erf, 1.0) == 2 * n + 1


@pytest.mark.parametrize("rate", [2, 5])
def test_dilated_conv_has_taps_at_plus_minus_rate(rate):
    conv = _positive_conv(3, 2, 3, dilation=rate)
    erf = erf_maps(conv, _images(size=(23, 23)), target="output")[0]
    c = 11
    assert _support(erf) == {(c + dy, c + dx) for dy in (-rate, 0, rate) for dx in (-rate, 0, rate)}


@pytest.mark.parametrize("rate, os_", [(2, 4), (3, 8)])
def test_aspp_branch_lattice_has_satellites_at_rate_times_os(rate, os_):
    # A stride-OS "backbone" (patchify conv) followed by one ASPP branch (3x3, dilation r).
    net = nn.Sequential(_positive_conv(3, 4, os_, stride=os_, padding=0),
                        _positive_conv(4, 4, 3, dilation=rate))
    feat = 2 * rate + 3
    images = _images(n=2, size=(feat * os_, feat * os_))
    erf = erf_maps(net, images, target="output")[0]
    c = feat // 2  # centre feature unit
    expected = {((c + dy) * os_ + py, (c + dx) * os_ + px)
                for dy in (-rate, 0, rate) for dx in (-rate, 0, rate) for py in range(os_) for px in range(os_)}
    assert _support(erf) == expected
    # satellites: the nine OS x OS blocks carry equal mass up to the kernel taps, offsets are +-r*OS pixels
    ys = sorted({y for y, _ in expected})
    starts = [ys[0], ys[os_], ys[2 * os_]]
    assert [b - starts[1] for b in starts] == [-rate * os_, 0, rate * os_]


class _SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=2, dilation=2))

    def forward_features(self, x):
        return self.body(x)


def _trained_bn_net():
    torch.manual_seed(0)
    net = _SmallNet()
    with torch.no_grad():  # give BN non-trivial running statistics
        net.train()
        for _ in range(3):
            net.forward_features(torch.randn(4, 3, 16, 16) * 2 + 1)
    return net


def test_batched_equals_loop_and_keeps_mode():
    net = _trained_bn_net()
    net.train()
    images = _images(n=5, size=(17, 19))
    positions = [(0.5, 0.5), (0.1, 0.8), (0.9, 0.2)]
    batched = erf_maps(net, images, positions=positions, batch_size=7)
    loop = torch.stack([erf_maps(net, images, positions=[p], batch_size=1)[0] for p in positions])
    torch.testing.assert_close(batched, loop, rtol=1e-5, atol=1e-9)  # float32 summation order only
    assert net.training and all(m.training for m in net.modules())  # mode restored
    net.eval()
    torch.testing.assert_close(erf_maps(net, images, positions=positions, batch_size=15), loop,
                               rtol=1e-5, atol=1e-9)
    # the comparison can fail: train-mode BN (no eval handling, model=None) couples the images
    net.train()
    coupled = erf_maps(None, images, positions=positions, target=net.forward_features, batch_size=15)
    assert (coupled - loop).abs().max() > 1e-3 * loop.abs().max()


def test_loop_by_hand_matches_definition():
    net = _trained_bn_net().eval()
    images = _images(n=3, size=(16, 16))
    acc = torch.zeros(16, 16, dtype=torch.float64)
    for img in images:
        x = img[None].clone().requires_grad_(True)
        out = net.forward_features(x)
        out[0, :, out.shape[2] // 2, out.shape[3] // 2].mean().backward()
        acc += x.grad[0].mean(0).clamp_min(0).double()
    torch.testing.assert_close(erf_maps(net, images)[0], acc / acc.sum())
    raw = erf_maps(net, images, normalize=False)[0]
    torch.testing.assert_close(raw, acc)


def test_gaussian_fit_recovers_known_gaussian():
    h, w = 48, 40
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    g = torch.exp(-0.5 * ((yy - 20.3) ** 2 / 3.0 ** 2 + (xx - 17.8) ** 2 / 5.5 ** 2))
    fit = fit_gaussian_2d(g / g.sum())
    assert fit["center_y"] == pytest.approx(20.3, abs=1e-6)
    assert fit["center_x"] == pytest.approx(17.8, abs=1e-6)
    assert fit["sigma_y"] == pytest.approx(3.0, abs=1e-6)
    assert fit["sigma_x"] == pytest.approx(5.5, abs=1e-6)
    assert fit["r2"] == pytest.approx(1.0, abs=1e-9)
    # a uniform square is a poor Gaussian
    sq = torch.zeros(32, 32, dtype=torch.float64)
    sq[8:24, 8:24] = 1
    assert fit_gaussian_2d(sq)["r2"] < 0.95


def test_centred_square_side_by_hand():
    z = torch.zeros(9, 9, dtype=torch.float64)
    z[4, 4] = 0.6
    z[3, 3] = z[5, 5] = 0.15   # ring 1 (3x3 square)
    z[1, 4] = 0.1              # ring 3 (7x7 square)
    assert centred_square_side(z, 0.5, center=(4, 4)) == 1
    assert centred_square_side(z, 0.9, center=(4, 4)) == 3
    assert centred_square_side(z, 0.95, center=(4, 4)) == 7
    assert centred_square_side(z, 1.0, center=(4, 4)) == 7
    # default centre: pixel nearest to the centroid (4 - 0.3, 4) -> (4, 4)
    assert centred_square_side(z, 0.9) == 3
    with pytest.raises(ValueError, match="fraction"):
        centred_square_side(z, 0.0)


def test_coverage_by_hand():
    z = torch.zeros(2, 4, 5, dtype=torch.float64)
    z[0, 0, 0] = 1.0
    z[0, 1, 1] = 0.02       # above 1 % of max
    z[0, 2, 2] = 0.005      # below
    z[1] = 1.0              # flat: everything covered
    torch.testing.assert_close(erf_coverage(z), torch.tensor([2 / 20, 1.0], dtype=torch.float64))
    assert float(erf_coverage(z[0], threshold=0.001)) == pytest.approx(3 / 20)


def test_result_numbers_and_timm_model_by_name():
    images = _images(n=2, size=(64, 64))
    res = effective_receptive_field("resnet18", images, batch_size=2)
    assert res.erf.shape == (64, 64) and float(res.erf.sum()) == pytest.approx(1.0)
    nums = res.numbers()
    assert set(nums) >= {"sigma_x", "sigma_y", "r2", "side_50", "side_90", "num_images", "input_size"}
    assert nums["num_images"] == 2 and 1 <= nums["side_50"] <= nums["side_90"] <= 2 * 64 + 1
    assert math.isfinite(nums["sigma_x"]) and math.isfinite(nums["r2"])


@pytest.mark.parametrize("name, kwargs", [
    ("vit_tiny_patch16_224", dict(reg_tokens=2)),                      # final norm on every token
    ("vit_relpos_small_patch16_224", dict(global_pool="avg")),         # fc_norm: final norm after pooling
    ("vit_small_patch16_gab_224", {}),
])
def test_vit_target_is_the_patch_tokens_after_the_final_norm(name, kwargs):
    """GAB paper §2: the ERF of a ViT differentiates the output tokens after the final norm."""
    import timm

    import kim_plugins  # noqa: F401  registers the GAB names

    torch.manual_seed(0)
    vit = timm.create_model(name, pretrained=False, img_size=64, depth=2, **kwargs).eval()
    final_norm = vit.fc_norm if not isinstance(vit.fc_norm, nn.Identity) else vit.norm
    with torch.no_grad():  # fresh LayerNorms: weight 1, bias 0, so the target is standardised per token
        final_norm.weight.normal_(1.0, 0.1)
        final_norm.bias.normal_(0.0, 0.1)
    x = _images(n=2, size=(64, 64))
    blocks_out = {}
    vit.blocks[-1].register_forward_hook(lambda m, args, out: blocks_out.update(x=out))
    out = resolve_target(vit, "auto")(x)
    assert out.shape == (2, vit.embed_dim, 4, 4)
    patches = blocks_out["x"][:, vit.num_prefix_tokens:]  # (B, 16, C), before the final norm
    expected = torch.nn.functional.layer_norm(patches, (vit.embed_dim,), final_norm.weight, final_norm.bias,
                                              final_norm.eps)
    torch.testing.assert_close(out, expected.transpose(1, 2).reshape(2, -1, 4, 4))
    assert not torch.allclose(out, patches.transpose(1, 2).reshape(2, -1, 4, 4), atol=1e-2)
    assert resolve_target(vit, "features")(x).shape == out.shape
    erf = effective_receptive_field(vit, x).erf
    assert erf.shape == (64, 64) and float(erf.sum()) == pytest.approx(1.0)


class _Head(nn.Module):
    """An mmseg-like decode head: conv + ReLU + dropout + the 1x1 classifier ``conv_seg``."""

    align_corners = False

    def __init__(self, cin=4, channels=6, num_classes=3):
        super().__init__()
        self.conv = nn.Conv2d(cin, channels, 3, padding=1)
        self.dropout = nn.Dropout2d(0.1)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats):
        return self.conv_seg(self.dropout(torch.relu(self.conv(feats[-1]))))


class _Seg(nn.Module):
    """An mmseg-like segmentor (``extract_feat`` + ``decode_head``), output stride 2."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.decode_head = _Head()

    def extract_feat(self, x):
        return [self.backbone(x)]

    def forward(self, x):
        return nn.functional.interpolate(self.decode_head(self.extract_feat(x)), size=x.shape[-2:],
                                         mode="bilinear", align_corners=False)


def test_segmentor_default_target_is_the_decoder_features_before_conv_seg():
    seg = _Seg().eval()
    x = _images(n=2, size=(10, 12))
    head = seg.decode_head
    feats = torch.relu(head.conv(seg.extract_feat(x)[-1]))  # what conv_seg reads (dropout off in eval)
    expected = nn.functional.interpolate(feats, size=(10, 12), mode="bilinear", align_corners=False)
    for target in ("auto", "features", "decoder"):
        torch.testing.assert_close(resolve_target(seg, target)(x), expected)
    logits = resolve_target(seg, "logits")(x)
    assert logits.shape == (2, 3, 10, 12)
    torch.testing.assert_close(logits, seg(x))
    with pytest.raises(ValueError, match="needs an mmseg segmentor"):
        resolve_target(nn.Conv2d(3, 3, 1), "logits")
    with pytest.raises(ValueError, match="needs an mmseg segmentor"):
        resolve_target(nn.Conv2d(3, 3, 1), "decoder")
    seg.decode_head.conv_seg = None
    with pytest.raises(ValueError, match="no conv_seg"):
        resolve_target(seg, "decoder")


def test_default_target_ignores_the_class_mean_direction_that_softmax_never_trains():
    """Adding one vector to every class row of conv_seg changes no prediction and no softmax output; it changes
    the class-mean-logit ERF (the option) arbitrarily, never the default one."""
    seg = _Seg().eval()
    x = _images(n=4, size=(16, 16))
    before = {t: erf_maps(seg, x, target=t)[0] for t in ("auto", "logits")}
    probs = torch.softmax(seg(x), dim=1)
    with torch.no_grad():
        seg.decode_head.conv_seg.weight.add_(torch.randn(1, 6, 1, 1, generator=torch.Generator().manual_seed(3)))
    torch.testing.assert_close(torch.softmax(seg(x), dim=1), probs)
    torch.testing.assert_close(erf_maps(seg, x, target="auto")[0], before["auto"])
    assert float((erf_maps(seg, x, target="logits")[0] - before["logits"]).abs().sum()) > 0.1


def test_default_erf_changes_when_training_changes_the_classifier_facing_features():
    """Train with softmax cross-entropy: the default ERF moves; the class-mean logit direction does not train.

    conv_seg's class-mean row is set to 0 first (no prediction changes). Cross-entropy's gradient with
    respect to conv_seg sums to 0 over classes, so plain SGD keeps that row at 0: the class-mean-logit
    target stays identically 0 (no ERF at all) before and after training, while the default target, the
    features conv_seg reads, is trained.
    """
    seg = _Seg()
    with torch.no_grad():
        w = seg.decode_head.conv_seg.weight
        w.sub_(w.mean(dim=0, keepdim=True))
    x = _images(n=4, size=(16, 16))
    before = erf_maps(seg, x)[0]

    def logit_to_default_mass() -> float:  # raw (unnormalised) gradient mass, class-mean logits vs default
        raw = {t: float(erf_maps(seg, x, target=t, normalize=False).sum()) for t in ("logits", "auto")}
        return raw["logits"] / raw["auto"]

    assert logit_to_default_mass() < 1e-5  # float32 rounding of a zero row
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(seg.parameters(), lr=0.2)
    seg.train()
    for _ in range(30):
        img = torch.randn(8, 3, 16, 16, generator=g)
        label = (nn.functional.avg_pool2d(img[:, :1], 5, 1, 2)[:, 0] > 0).long() + (img[:, 1] > 1).long()
        loss = nn.functional.cross_entropy(seg(img), label)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(seg.decode_head.conv_seg.weight.detach().mean(dim=0).abs().max()) < 1e-6  # still never trained
    after = erf_maps(seg, x)[0]
    assert float((after - before).abs().sum()) > 0.1  # L1 distance of the normalised maps (max 2)
    assert logit_to_default_mass() < 1e-5


def test_grid_positions():
    assert grid_positions(2) == [(0.25, 0.25), (0.25, 0.75), (0.75, 0.25), (0.75, 0.75)]


def test_bad_input():
    conv = _positive_conv(3, 2, 3)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        erf_maps(conv, torch.zeros(3, 8, 8), target="output")
    with pytest.raises(ValueError, match="batch_size"):
        erf_maps(conv, _images(), target="output", batch_size=0)
    with pytest.raises(ValueError, match="fractional"):
        erf_maps(conv, _images(), positions=[(0.5, 1.0)], target="output")
    with pytest.raises(ValueError, match="target must be"):
        erf_maps(conv, _images(), target="centre")
    zero = nn.Conv2d(3, 2, 3, padding=1)
    nn.init.zeros_(zero.weight)
    with pytest.raises(ValueError, match="zero everywhere"):
        erf_maps(zero, _images(), target="output")
