"""Extended-CAM: class activation maps upsampled with the Gaussian receptive field.

Bum Jun Kim, Gyogwon Koo, Hyeyeon Choi, Sang Woo Kim, "Extending Class
Activation Mapping Using Gaussian Receptive Field" (arXiv 2001.05153).

[paper] Two changes to CAM-style visualisation (Zhou et al. 2016; Grad-CAM,
Selvaraju et al. 2017): (1) *Gaussian upsampling*: a feature-map cell's value
is spread over the input with a Gaussian centred on its receptive field
instead of bilinear interpolation between cell centres, because a unit's
effective receptive field is Gaussian (Luo et al. 2016); (2) the "unnatural
terms" of the existing CAM derivations are modified.

[decision] The paper body was not available to us (METHODS.md §7: "details not
found"), so the exact forms are this project's reading, each switchable:

- ``weighting='elementwise'``: the map is ``sum_k dy/dA_kij * A_kij`` per cell
  (gradient times activation), the first-order Taylor term of the class score,
  instead of Grad-CAM's channel weights averaged over the map
  (``weighting='gradcam'``). For a head that is linear in the features the
  cells then add up to the score minus the head's bias exactly; Grad-CAM's
  averaging is exact only for global-average-pooling heads (tested).
- ``sigma='erf'``: the Gaussian's standard deviation is that of the 2D Gaussian
  fitted to the measured ERF of the feature map's centre unit
  (:mod:`kim_plugins.layers.erf`), per axis; a float fixes it.
- Cell ``(i, j)`` of an ``h x w`` map on an ``H x W`` input is centred at
  ``((i + 0.5) H/h - 0.5, (j + 0.5) W/w - 0.5)`` (the centres bilinear
  ``align_corners=False`` uses); the Gaussian is cut at ``truncate=4`` sigma
  and normalised to sum 1 over the image (``normalize='mass'``: the upsampled
  map sums to the cells' sum), or has peak 1 (``normalize='peak'``).
- Signed maps are returned by :meth:`CAM.contributions`; :meth:`CAM.__call__`
  clips at 0 and scales each map to [0, 1], as ``pytorch-grad-cam`` does.

:class:`ExtendedCAM` and :class:`GradCAM` share the call convention of
``pytorch-grad-cam`` (``cam(input_tensor, targets=...)`` -> ``(B, H, W)``
numpy maps in [0, 1]) without depending on it. Deletion / insertion scores
(Petsiuk et al., RISE, 2018) compare maps: :func:`deletion_insertion`.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kim_plugins.layers.erf import erf_maps, fit_gaussian_2d

__all__ = [
    "gaussian_upsample",
    "gaussian_weights",
    "bilinear_upsample",
    "cell_maps",
    "CAM",
    "ExtendedCAM",
    "GradCAM",
    "deletion_insertion",
]

Sigma = Union[float, Tuple[float, float]]


def gaussian_weights(out_size: int, in_size: int, sigma: float, truncate: float = 4.0,
                     normalize: str = "mass", dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``(out_size, in_size)`` matrix: column ``i`` is the Gaussian of cell ``i`` over the output pixels.

    Cell ``i`` is centred at ``(i + 0.5) * out_size / in_size - 0.5``; values
    beyond ``truncate * sigma`` are 0; ``normalize='mass'`` makes each column
    sum to 1 over the output, ``'peak'`` leaves ``exp(0) = 1`` at the centre.
    """
    if sigma <= 0 or truncate <= 0:
        raise ValueError(f"sigma and truncate must be > 0, got sigma={sigma}, truncate={truncate}")
    if normalize not in ("mass", "peak"):
        raise ValueError(f"normalize must be 'mass' or 'peak', got {normalize!r}")
    p = torch.arange(out_size, dtype=dtype)[:, None]
    c = (torch.arange(in_size, dtype=dtype)[None, :] + 0.5) * (out_size / in_size) - 0.5
    d = p - c
    w = torch.exp(-0.5 * (d / sigma) ** 2) * (d.abs() <= truncate * sigma)
    if normalize == "mass":
        w = w / w.sum(dim=0, keepdim=True).clamp_min(1e-300)
    return w


def _sigma_pair(sigma: Sigma) -> Tuple[float, float]:
    if isinstance(sigma, (int, float)):
        return float(sigma), float(sigma)
    sy, sx = sigma
    return float(sy), float(sx)


def gaussian_upsample(cam: torch.Tensor, size: Sequence[int], sigma: Sigma, truncate: float = 4.0,
                      normalize: str = "mass") -> torch.Tensor:
    """Spread every cell of ``cam`` over the input with a Gaussian on its receptive-field centre.

    Separable: ``W_y @ cam @ W_x^T`` with :func:`gaussian_weights` per axis.

    Args:
        cam: ``(h, w)`` or ``(B, h, w)`` maps.
        size: Output ``(H, W)``.
        sigma: Standard deviation in output pixels (one float or ``(sy, sx)``).
        truncate: Cut-off in standard deviations.
        normalize: ``'mass'`` (each cell's Gaussian sums to 1: the map's sum is
            kept) or ``'peak'`` (peak 1).

    Returns:
        ``(H, W)`` or ``(B, H, W)`` in ``cam``'s dtype.
    """
    if cam.dim() not in (2, 3):
        raise ValueError(f"cam must be (h, w) or (B, h, w), got {tuple(cam.shape)}")
    sy, sx = _sigma_pair(sigma)
    h, w = cam.shape[-2:]
    wy = gaussian_weights(int(size[0]), h, sy, truncate, normalize).to(cam.device)
    wx = gaussian_weights(int(size[1]), w, sx, truncate, normalize).to(cam.device)
    return (wy @ cam.to(torch.float64) @ wx.T).to(cam.dtype)


def bilinear_upsample(cam: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Grad-CAM's upsampling: bilinear, ``align_corners=False``; ``(h, w)`` or ``(B, h, w)``."""
    x = cam[None, None] if cam.dim() == 2 else cam[:, None]
    out = F.interpolate(x.float(), size=tuple(int(s) for s in size), mode="bilinear", align_corners=False)
    return (out[0, 0] if cam.dim() == 2 else out[:, 0]).to(cam.dtype)


def cell_maps(features: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], targets: torch.Tensor,
              weighting: str = "elementwise") -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-cell class evidence of a ``(B, K, h, w)`` feature map.

    Args:
        features: The feature map (it is detached and re-attached here).
        head: ``features -> (B, num_classes)`` scores (timm ``forward_head``).
        targets: ``(B,)`` class per image.
        weighting: ``'elementwise'`` (``sum_k dy/dA * A``, signed) or
            ``'gradcam'`` (``relu(sum_k mean_ij(dy/dA_k) A_k)``, Grad-CAM).

    Returns:
        ``(maps (B, h, w), scores (B,))``.
    """
    if weighting not in ("elementwise", "gradcam"):
        raise ValueError(f"weighting must be 'elementwise' or 'gradcam', got {weighting!r}")
    if features.dim() != 4:
        raise ValueError(f"features must be (B, K, h, w), got {tuple(features.shape)}")
    a = features.detach().requires_grad_(True)
    with torch.enable_grad():
        scores = head(a)
        if scores.dim() != 2 or scores.shape[0] != a.shape[0]:
            raise ValueError(f"head must give (B, num_classes) scores, got {tuple(scores.shape)}")
        y = scores.gather(1, targets.view(-1, 1).to(scores.device)).squeeze(1)
        (grad,) = torch.autograd.grad(y.sum(), a)
    if weighting == "elementwise":
        maps = (grad * a.detach()).sum(dim=1)
    else:
        alpha = grad.mean(dim=(2, 3), keepdim=True)
        maps = torch.relu((alpha * a.detach()).sum(dim=1))
    return maps.detach(), y.detach()


class CAM:
    """CAM of a classifier's last feature map, upsampled to the input.

    Args:
        model: A classifier with ``forward_features`` (``(B, K, h, w)``) and
            ``forward_head`` (timm CNNs), or pass ``features_fn`` / ``head_fn``.
        weighting: See :func:`cell_maps`.
        upsample: ``'gaussian'`` or ``'bilinear'``.
        sigma: ``'erf'`` (fitted to the measured ERF of the feature map's
            centre unit on the first images given, cached in ``sigma_``) or a
            float / ``(sy, sx)`` in input pixels.
        truncate, normalize: See :func:`gaussian_upsample`.
        features_fn, head_fn: Split of the model at the visualised layer.
    """

    def __init__(self, model: nn.Module, weighting: str = "elementwise", upsample: str = "gaussian",
                 sigma: Union[str, Sigma] = "erf", truncate: float = 4.0, normalize: str = "mass",
                 features_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 head_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> None:
        if upsample not in ("gaussian", "bilinear"):
            raise ValueError(f"upsample must be 'gaussian' or 'bilinear', got {upsample!r}")
        if isinstance(sigma, str) and sigma != "erf":
            raise ValueError(f"sigma must be 'erf' or a positive float / (sy, sx), got {sigma!r}")
        self.model = model
        self.features_fn = features_fn or getattr(model, "forward_features", None)
        self.head_fn = head_fn or getattr(model, "forward_head", None)
        if self.features_fn is None or self.head_fn is None:
            raise ValueError(f"{type(model).__name__} has no forward_features/forward_head: pass features_fn= "
                             f"(x -> (B, K, h, w)) and head_fn= (features -> (B, num_classes))")
        self.weighting, self.upsample, self.truncate, self.normalize = weighting, upsample, truncate, normalize
        self.sigma_: Optional[Tuple[float, float]] = None if sigma == "erf" else _sigma_pair(sigma)

    def measure_sigma(self, images: torch.Tensor) -> Tuple[float, float]:
        """Fit a Gaussian to the ERF of the feature map's centre unit; cache and return ``(sy, sx)``."""
        erf = erf_maps(self.model, images, target=self.features_fn, batch_size=max(1, min(len(images), 8)))[0]
        fit = fit_gaussian_2d(erf)
        self.sigma_ = (max(fit["sigma_y"], 0.5), max(fit["sigma_x"], 0.5))
        return self.sigma_

    def contributions(self, input_tensor: torch.Tensor,
                      targets: Optional[Union[Sequence[int], torch.Tensor]] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Signed ``(B, H, W)`` maps (not normalised) and the ``(B,)`` targets used (default: predicted class)."""
        training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                feats = self.features_fn(input_tensor)
                if targets is None:
                    targets = self.head_fn(feats).argmax(dim=1)
            targets = torch.as_tensor(targets, device=feats.device).long().view(-1)
            if targets.numel() != input_tensor.shape[0]:
                raise ValueError(f"targets has {targets.numel()} entries for {input_tensor.shape[0]} images")
            maps, _ = cell_maps(feats, self.head_fn, targets, self.weighting)
            size = input_tensor.shape[-2:]
            if self.upsample == "bilinear":
                return bilinear_upsample(maps, size), targets
            if self.sigma_ is None:
                self.measure_sigma(input_tensor)
            return gaussian_upsample(maps, size, self.sigma_, self.truncate, self.normalize), targets
        finally:
            self.model.train(training)

    def __call__(self, input_tensor: torch.Tensor,
                 targets: Optional[Union[Sequence[int], torch.Tensor]] = None) -> np.ndarray:
        """``(B, H, W)`` float32 maps clipped at 0 and scaled to [0, 1] per image (pytorch-grad-cam's output)."""
        maps, _ = self.contributions(input_tensor, targets)
        maps = maps.clamp_min(0).float()
        peak = maps.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]
        return (maps / peak).cpu().numpy()


class ExtendedCAM(CAM):
    """Extended-CAM (arXiv 2001.05153): element-wise weighting, Gaussian upsampling with the ERF's sigma."""

    def __init__(self, model: nn.Module, sigma: Union[str, Sigma] = "erf", **kwargs) -> None:
        super().__init__(model, weighting=kwargs.pop("weighting", "elementwise"), upsample="gaussian",
                         sigma=sigma, **kwargs)


class GradCAM(CAM):
    """Grad-CAM (Selvaraju et al. 2017): averaged-gradient channel weights, ReLU, bilinear upsampling."""

    def __init__(self, model: nn.Module, **kwargs) -> None:
        super().__init__(model, weighting="gradcam", upsample="bilinear", sigma=1.0, **kwargs)


def deletion_insertion(predict: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, maps: torch.Tensor,
                       targets: torch.Tensor, steps: int = 16, baseline: float = 0.0) -> Dict[str, float]:
    """Deletion and insertion scores of saliency maps (RISE, Petsiuk et al. 2018).

    Pixels are ranked by the map (highest first). *Deletion*: the most salient
    ``t/steps`` of the pixels are set to ``baseline``; *insertion*: only they
    are kept, the rest is ``baseline``. The score is the mean over the
    ``steps + 1`` levels of the target-class probability (the area under the
    curve, trapezoid rule). Lower deletion and higher insertion are better.

    Args:
        predict: ``images -> (B, num_classes)`` logits.
        images: ``(B, C, H, W)`` normalised images.
        maps: ``(B, H, W)`` saliency.
        targets: ``(B,)`` classes.
        steps: Levels between 0 and all pixels.
        baseline: Value of removed pixels (0 = the normalised data mean).

    Returns:
        ``deletion`` and ``insertion`` (means over the images).
    """
    if maps.shape[0] != images.shape[0] or maps.shape[-2:] != images.shape[-2:]:
        raise ValueError(f"maps {tuple(maps.shape)} must be (B, H, W) of images {tuple(images.shape)}")
    b, _, h, w = images.shape
    n = h * w
    order = maps.reshape(b, n).argsort(dim=1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n, device=order.device).expand(b, n))
    rank = rank.view(b, 1, h, w)
    curves = {"deletion": [], "insertion": []}
    with torch.no_grad():
        for t in range(steps + 1):
            k = int(round(n * t / steps))
            top = rank < k
            for name, keep in (("deletion", ~top), ("insertion", top)):
                x = torch.where(keep, images, torch.full_like(images, baseline))
                p = torch.softmax(predict(x).float(), dim=1).gather(1, targets.view(-1, 1)).squeeze(1)
                curves[name].append(p)
    out = {}
    for name, ps in curves.items():
        c = torch.stack(ps, dim=1)  # (B, steps + 1)
        out[name] = float(((c[:, 1:] + c[:, :-1]) / 2).mean())
    return out
