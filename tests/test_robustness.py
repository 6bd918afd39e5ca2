"""kim_plugins.robustness: the contrast change against its formula, severities, normalisation, evaluation."""
import pytest
import torch

from kim_plugins import robustness


def test_contrast_change_formula():
    torch.manual_seed(0)
    x = 0.4 + 0.2 * torch.rand(2, 3, 5, 7)  # no clipping for these factors
    for c in (0.05, 0.4, 1.0, 1.5):
        y = robustness.contrast_change(x, c)
        mean = x.mean(dim=(2, 3), keepdim=True)
        torch.testing.assert_close(y.mean(dim=(2, 3), keepdim=True), mean)  # per image and channel
        torch.testing.assert_close(y - mean, c * (x - mean))
    torch.testing.assert_close(robustness.contrast_change(x, 1.0), x)


def test_contrast_enhancement_clips_to_unit_range():
    x = torch.tensor([0.0, 0.25, 0.75, 1.0]).view(1, 1, 2, 2)
    y = robustness.contrast_change(x, 4.0)  # mean 0.5: (x - 0.5) * 4 + 0.5
    torch.testing.assert_close(y.flatten(), torch.tensor([0.0, 0.0, 1.0, 1.0]))


def test_bad_factors():
    with pytest.raises(ValueError, match="contrast factor must be >= 0, got -1"):
        robustness.contrast_change(torch.zeros(1, 3, 2, 2), -1)
    with pytest.raises(ValueError, match="--enhance factors must be > 1, got 0.5"):
        robustness.severity_table([0.4], [0.5])
    with pytest.raises(ValueError, match=r"--reduce factors must be in \[0, 1\), got 2.0"):
        robustness.severity_table([2.0], [1.5])


def test_normalizer_uses_the_model_cfg_on_the_input_dtype():
    model = torch.nn.Linear(1, 1)
    model.pretrained_cfg = dict(mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0))
    x = torch.ones(1, 3, 1, 1, dtype=torch.float64)
    y = robustness.normalizer(model)(x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y.flatten(), torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64))


class _MeanBrightnessClassifier(torch.nn.Module):
    """Class 1 when the image's spread around its mean is large: contrast reduction flips it to class 0."""

    def __init__(self):
        super().__init__()
        self.pretrained_cfg = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        spread = (x - x.mean(dim=(2, 3), keepdim=True)).abs().mean(dim=(1, 2, 3))
        return torch.stack([0.1 - spread, spread - 0.1], dim=1)


def test_evaluate_counts_top1_per_factor():
    x = torch.zeros(4, 3, 2, 2)
    x[:, :, 0, 0] = 1.0  # spread 0.375 per image
    y = torch.tensor([1, 1, 0, 1])
    acc = robustness.evaluate(_MeanBrightnessClassifier(), lambda: iter([(x[:2], y[:2]), (x[2:], y[2:])]),
                              [1.0, 0.1], progress=False)
    assert acc == {1.0: 75.0, 0.1: 25.0}  # spread 0.0375 < 0.1 at c = 0.1: everything becomes class 0
    with pytest.raises(ValueError, match="no images to evaluate"):
        robustness.evaluate(_MeanBrightnessClassifier(), lambda: iter([]), [1.0], progress=False)
