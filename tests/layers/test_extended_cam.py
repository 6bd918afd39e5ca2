"""Extended-CAM (arXiv 2001.05153): Gaussian upsampling, additivity on linear models, deletion/insertion."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from kim_plugins.data.fashion_mnist import load_fashion_mnist
from kim_plugins.layers.extended_cam import (CAM, ExtendedCAM, GradCAM, bilinear_upsample, cell_maps,
                                             deletion_insertion, gaussian_upsample, gaussian_weights)


def test_gaussian_upsampling_of_a_delta_is_the_gaussian():
    cam = torch.zeros(7, 7, dtype=torch.float64)
    cam[2, 3] = 5.0
    out = gaussian_upsample(cam, (28, 28), sigma=3.0)
    cy, cx = 2.5 * 4 - 0.5, 3.5 * 4 - 0.5  # the cell's receptive-field centre (stride 4)
    yy, xx = torch.meshgrid(torch.arange(28.0, dtype=torch.float64), torch.arange(28.0, dtype=torch.float64),
                            indexing="ij")
    g = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 9.0))
    g = g * ((yy - cy).abs() <= 12) * ((xx - cx).abs() <= 12)
    torch.testing.assert_close(out, 5.0 * g / g.sum(), rtol=1e-12, atol=1e-15)
    peak = gaussian_upsample(cam, (28, 28), sigma=3.0, normalize="peak")
    torch.testing.assert_close(peak, 5.0 * g, rtol=1e-12, atol=1e-15)


def test_gaussian_upsampling_keeps_the_mass_and_bilinear_interpolates():
    cam = torch.rand(2, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = gaussian_upsample(cam, (40, 48), sigma=(5.0, 2.0))
    torch.testing.assert_close(out.sum(dim=(1, 2)), cam.sum(dim=(1, 2)), rtol=1e-12, atol=0)
    assert bilinear_upsample(cam, (40, 48)).shape == (2, 40, 48)
    with pytest.raises(ValueError, match="sigma"):
        gaussian_weights(10, 5, sigma=0.0)


class GaussianRFLinear(nn.Module):
    """A linear classifier whose cells see the image through Gaussian receptive fields (sigma0, stride 4)."""

    def __init__(self, size=32, cells=8, sigma0=3.0, classes=3):
        super().__init__()
        self.register_buffer("wy", gaussian_weights(size, cells, sigma0).float())
        self.register_buffer("wx", gaussian_weights(size, cells, sigma0).float())
        self.fc = nn.Linear(cells * cells, classes)
        with torch.no_grad():
            self.fc.weight.normal_(generator=torch.Generator().manual_seed(1))
            self.fc.bias.fill_(0.7)

    def forward_features(self, x):
        return (self.wy.T @ x @ self.wx)  # (B, 1, cells, cells)

    def forward_head(self, a):
        return self.fc(a.flatten(1))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def test_cells_of_a_linear_head_add_up_to_the_score_gradcam_does_not():
    model = GaussianRFLinear()
    x = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    targets = torch.tensor([0, 1, 2, 0])
    feats = model.forward_features(x)
    maps, scores = cell_maps(feats, model.forward_head, targets)
    analytic = model.fc.weight[targets].view(4, 8, 8) * feats[:, 0]  # V_cij * A_ij
    torch.testing.assert_close(maps, analytic, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(maps.sum(dim=(1, 2)), scores - 0.7, rtol=1e-5, atol=1e-5)
    grad, _ = cell_maps(feats, model.forward_head, targets, weighting="gradcam")
    assert (grad - analytic).abs().max() > 0.1 * analytic.abs().max()


def test_extended_cam_of_a_linear_model_is_its_analytic_contribution_map():
    model = GaussianRFLinear()
    x = torch.ones(2, 1, 32, 32)  # constant image: every cell integrates its receptive field to 1
    x.requires_grad_(True)
    targets = torch.tensor([2, 1])
    score = model(x).gather(1, targets.view(-1, 1)).sum()
    (grad,) = torch.autograd.grad(score, x)
    analytic = (grad * x).detach()[:, 0]  # gradient x input of a linear model: the exact contribution
    ext = ExtendedCAM(model, sigma=3.0)
    maps, _ = ext.contributions(x.detach(), targets)
    torch.testing.assert_close(maps, analytic, rtol=1e-4, atol=1e-6)
    bil, _ = GradCAM(model).contributions(x.detach(), targets)
    assert (bil - analytic).abs().max() > 0.5 * analytic.abs().max()
    # Any image: the Extended-CAM map sums to the score minus the bias (mass-preserving, additive).
    xr = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    maps, _ = ext.contributions(xr, targets)
    torch.testing.assert_close(maps.sum(dim=(1, 2)), model(xr)[[0, 1], targets] - 0.7, rtol=1e-4, atol=1e-4)


def test_sigma_erf_recovers_the_receptive_field():
    model = GaussianRFLinear(sigma0=3.0)
    cam = ExtendedCAM(model)  # sigma='erf'
    sy, sx = cam.measure_sigma(torch.randn(2, 1, 32, 32))
    assert sy == pytest.approx(3.0, rel=0.02) and sx == pytest.approx(3.0, rel=0.02)
    out = cam(torch.randn(3, 1, 32, 32), targets=[0, 1, 2])
    assert out.shape == (3, 32, 32) and out.dtype == np.float32 and out.max() == pytest.approx(1.0)
    assert out.min() >= 0


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match="forward_features"):
        CAM(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="upsample"):
        CAM(GaussianRFLinear(), upsample="nearest")
    with pytest.raises(ValueError, match="targets"):
        ExtendedCAM(GaussianRFLinear(), sigma=2.0).contributions(torch.randn(2, 1, 32, 32), [0])


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
                                  nn.Conv2d(32, 32, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(32, 10)

    def forward_features(self, x):
        return self.body(x)

    def forward_head(self, a):
        return self.fc(a.mean(dim=(2, 3)))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def test_deletion_insertion_on_fashion_mnist_cams_beat_a_random_order():
    images, labels = load_fashion_mnist("train")
    x = torch.from_numpy(images[:6000].copy()).float()[:, None] / 255.0
    x = (x - 0.286) / 0.353
    y = torch.from_numpy(labels[:6000].astype(np.int64))
    torch.manual_seed(0)
    model = TinyCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(150):
        idx = torch.randint(len(x), (64,))
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    test_images, test_labels = load_fashion_mnist("test")
    xt = (torch.from_numpy(test_images[:48].copy()).float()[:, None] / 255.0 - 0.286) / 0.353
    yt = torch.from_numpy(test_labels[:48].astype(np.int64))
    scores = {}
    for name, cam in (("gradcam", GradCAM(model)), ("extended", ExtendedCAM(model))):
        maps, _ = cam.contributions(xt, yt)
        scores[name] = deletion_insertion(model, xt, maps, yt)
    rand = torch.rand(48, 28, 28, generator=torch.Generator().manual_seed(0))
    scores["random"] = deletion_insertion(model, xt, rand, yt)
    for name in ("gradcam", "extended"):
        assert scores[name]["deletion"] < scores["random"]["deletion"], scores
        assert scores[name]["insertion"] > scores["random"]["insertion"], scores
    assert all(0 <= v <= 1 and not math.isnan(v) for s in scores.values() for v in s.values())


def test_extended_cam_under_bf16_autocast_matches_float32():
    model = GaussianRFLinear()
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(4))
    ref, _ = ExtendedCAM(model, sigma=3.0).contributions(x, [0, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = ExtendedCAM(model, sigma=3.0).contributions(x, [0, 1])
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() <= 0.05 * ref.abs().max()
