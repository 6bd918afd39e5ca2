"""Variance-safe data augmentation for ViTs: keep the positional embedding's share of the token variance.

Bum Jun Kim and Sang Woo Kim, "Configuring Data Augmentations to Reduce Variance
Shift in Positional Embedding of Vision Transformers" (arXiv 2405.14115).

[paper] A ViT adds its positional embedding (PE) to the patch embedding, and the
first LayerNorm divides the sum by its standard deviation, so what the PE
contributes depends on the ratio of the PE's variance to the image's. An
augmentation that changes the image variance in training but not at test time
shifts that ratio between training and test (*variance shift*); Mixup is the
paper's example. The paper gives a configuration of the augmentations that
removes the shift.

The variance algebra (exact, tested by Monte Carlo on real Fashion-MNIST):

- Mixup ``x = lam a + (1 - lam) b`` of independent images scales the variance
  about the mean image by ``lam^2 + (1 - lam)^2``; for ``lam ~ Beta(alpha,
  alpha)`` its mean is ``(alpha + 1) / (2 alpha + 1)`` (0.69 for timm's DeiT
  recipe ``alpha = 0.8``). The variance *of* the mean image is untouched.
- CutMix pastes a box of another image at the same place: every pixel keeps
  its distribution, so every variance is kept.
- Random erasing with a constant fill (timm ``mode='const'``: 0 after
  normalisation) removes the erased pixels' variance; with per-pixel normal
  noise (``mode='pixel'``) an image normalised to zero mean and unit variance
  keeps both where the erased pixels have the image-wide statistics (exactly
  for stationary data; on Fashion-MNIST, whose garments sit in the centre
  where the boxes fall most, timm's ``re_prob=0.25`` keeps 99.3 % and the
  constant fill 94.8 %). These are pixel statistics; the patch embedding also
  sees the pixels' correlation, which the PE/patch ratio
  (:func:`pe_to_patch_variance_ratio`) measures directly.
- Resampling a PE to another grid (timm ``resample_abs_pos_embed``) smooths it
  and lowers its variance over the tokens.

[paper, as summarised in public text; the body was not available to us] The
guideline: no Mixup for ViTs (CutMix is safe), random erasing in pixel mode
with the default mean/std normalisation, and a variance rescale of upsampled
PEs. METHODS.md §7 marks CutMix and pixel erasing [inferred].

[decision] Where the exact factor is not confirmed:
:func:`variance_preserving_resample` rescales the resampled PE, per channel and
about its token mean, by the measured ratio of standard deviations before and
after (``rescale='measured'``); ``rescale='none'`` is timm's plain resample and
a float is a fixed factor (e.g. ``1/sqrt(k)`` readings of the paper).

No timm import: the helpers return keyword dicts for timm's ``Mixup``,
``RandomErasing`` and ``create_transform``, and :func:`check_augmentation`
reads plain dicts (timm ``train.py`` argument names or those of the classes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F

__all__ = [
    "Finding",
    "variance_components",
    "mixup_variance_factor",
    "expected_within_variance_factor",
    "variance_safe_mixup_args",
    "variance_safe_random_erasing_args",
    "variance_safe_transform_args",
    "check_augmentation",
    "resample_pos_embed",
    "variance_preserving_resample",
    "pe_to_patch_variance_ratio",
]


# ----------------------------------------------------------------------------- variance algebra
def variance_components(images: torch.Tensor) -> Dict[str, float]:
    """Variance of an image batch, split into the part about the mean image and the mean image's own.

    Args:
        images: ``(N, C, H, W)`` (or ``(N, ...)``) batch, N >= 2.

    Returns:
        ``total``: the variance over every sample and pixel (per channel,
        averaged over channels); ``within``: the variance over samples of each
        pixel, averaged over pixels (what Mixup scales); ``between``: the
        variance of the mean image over pixels (``total = within + between``,
        population variances).
    """
    if not isinstance(images, torch.Tensor) or images.dim() < 2 or images.shape[0] < 2:
        raise ValueError(f"images must be an (N, ...) tensor with N >= 2, got "
                         f"{getattr(images, 'shape', type(images).__name__)}")
    x = images.detach().to(torch.float64)
    x = x.reshape(x.shape[0], x.shape[1], -1) if x.dim() >= 3 else x.reshape(x.shape[0], 1, -1)
    mean_image = x.mean(dim=0)  # (C, P)
    within = ((x - mean_image) ** 2).mean(dim=(0, 2))  # (C,)
    between = ((mean_image - mean_image.mean(dim=1, keepdim=True)) ** 2).mean(dim=1)
    return dict(total=float((within + between).mean()), within=float(within.mean()),
                between=float(between.mean()))


def mixup_variance_factor(lam: Optional[float] = None, alpha: Optional[float] = None) -> float:
    """Factor Mixup applies to the variance about the mean image (independent images).

    Args:
        lam: A fixed mixing weight: ``lam^2 + (1 - lam)^2``.
        alpha: ``lam ~ Beta(alpha, alpha)``: the mean ``(alpha + 1) / (2 alpha + 1)``.
            ``alpha = 0`` (Mixup off) gives 1.
    """
    if (lam is None) == (alpha is None):
        raise ValueError("give exactly one of lam (a fixed weight) or alpha (Beta(alpha, alpha))")
    if lam is not None:
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam must be in [0, 1], got {lam}")
        return lam ** 2 + (1 - lam) ** 2
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    return 1.0 if alpha == 0 else (alpha + 1) / (2 * alpha + 1)


def expected_within_variance_factor(mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, prob: float = 1.0,
                                    switch_prob: float = 0.5) -> float:
    """Mean factor on the variance about the mean image under timm's ``Mixup`` settings.

    timm applies the mix with probability ``prob``; with both alphas > 0 it
    picks CutMix with probability ``switch_prob`` (CutMix keeps the variance).
    """
    p_mixup = 0.0
    if mixup_alpha > 0:
        p_mixup = prob * ((1 - switch_prob) if cutmix_alpha > 0 else 1.0)
    return 1 - p_mixup + p_mixup * mixup_variance_factor(alpha=mixup_alpha)


# ----------------------------------------------------------------------------- the guideline as timm kwargs
def _no_variance_shift(kwargs: Mapping[str, Any], key: str, allowed: Sequence[Any], fix: str) -> None:
    if key in kwargs and kwargs[key] not in allowed:
        raise ValueError(f"{key}={kwargs[key]!r} shifts the image variance between training and test "
                         f"(arXiv 2405.14115); {fix}")


def variance_safe_mixup_args(num_classes: int, cutmix_alpha: float = 1.0, **kwargs: Any) -> Dict[str, Any]:
    """Keyword arguments for ``timm.data.Mixup`` following the guideline: CutMix, no Mixup.

    Args:
        num_classes: Classes of the targets.
        cutmix_alpha: CutMix's Beta parameter (1.0, the DeiT recipe's value).
        **kwargs: Any other ``Mixup`` argument (``prob``, ``label_smoothing``, ...).

    Raises:
        ValueError: ``mixup_alpha > 0`` in ``kwargs``.
    """
    _no_variance_shift(kwargs, "mixup_alpha", (0, 0.0), "leave it 0 and use CutMix (cutmix_alpha)")
    if cutmix_alpha <= 0:
        raise ValueError(f"cutmix_alpha must be > 0 (CutMix keeps the variance), got {cutmix_alpha}")
    return dict(kwargs, mixup_alpha=0.0, cutmix_alpha=float(cutmix_alpha), num_classes=int(num_classes))


def variance_safe_random_erasing_args(probability: float = 0.25, **kwargs: Any) -> Dict[str, Any]:
    """Keyword arguments for ``timm.data.RandomErasing``: per-pixel normal fill (``mode='pixel'``).

    Use it on images normalised to zero mean and unit variance (timm's default
    mean/std normalisation), where N(0, 1) noise keeps the variance.

    Raises:
        ValueError: ``mode`` other than ``'pixel'`` in ``kwargs``.
    """
    _no_variance_shift(kwargs, "mode", ("pixel",), "use mode='pixel' (per-pixel N(0, 1) fill)")
    return dict(kwargs, probability=float(probability), mode="pixel")


def variance_safe_transform_args(re_prob: float = 0.25, **kwargs: Any) -> Dict[str, Any]:
    """Keyword arguments for ``timm.data.create_transform(is_training=True)``: pixel-mode erasing.

    ``mean``/``std`` are left to timm's defaults (or your data's) so the
    normalised images have unit variance, which pixel-mode erasing needs.

    Raises:
        ValueError: ``re_mode`` other than ``'pixel'`` in ``kwargs``.
    """
    _no_variance_shift(kwargs, "re_mode", ("pixel",), "use re_mode='pixel'")
    return dict(kwargs, is_training=kwargs.get("is_training", True), re_prob=float(re_prob), re_mode="pixel")


# ----------------------------------------------------------------------------- checker
@dataclass
class Finding:
    """One setting that shifts (or may shift) the variance.

    Attributes:
        setting: The argument name as given.
        value: Its value.
        severity: ``'warning'`` (shifts the variance) or ``'note'`` (depends on data).
        message: What happens.
        fix: The guideline's setting.
        factor: Expected factor on the variance about the mean image in
            training (None when it depends on the data).
    """

    setting: str
    value: Any
    severity: str
    message: str
    fix: str
    factor: Optional[float] = None


_ALIASES = {  # timm train.py name -> (Mixup / RandomErasing / create_transform names)
    "mixup_alpha": ("mixup", "mixup_alpha"),
    "cutmix_alpha": ("cutmix", "cutmix_alpha"),
    "prob": ("mixup_prob", "prob"),
    "switch_prob": ("mixup_switch_prob", "switch_prob"),
    "re_prob": ("reprob", "re_prob", "probability"),
    "re_mode": ("remode", "re_mode", "mode"),
}
_DEFAULTS = dict(mixup_alpha=0.0, cutmix_alpha=0.0, prob=1.0, switch_prob=0.5, re_prob=0.0, re_mode="pixel")


def _get(args: Mapping[str, Any], key: str):
    for name in _ALIASES[key]:
        if name in args and args[name] is not None:
            return name, args[name]
    return key, _DEFAULTS[key]


def check_augmentation(args: Mapping[str, Any], data_std: Optional[Sequence[float]] = None,
                       pos_embed_resample: Optional[Mapping[str, Any]] = None) -> List[Finding]:
    """Settings that shift the image variance between training and test, with the fix.

    Args:
        args: Augmentation settings under timm ``train.py`` names (``mixup``,
            ``cutmix``, ``mixup_prob``, ``mixup_switch_prob``, ``reprob``,
            ``remode``, ``std``) or those of ``Mixup`` / ``RandomErasing`` /
            ``create_transform`` (``mixup_alpha``, ``cutmix_alpha``, ``prob``,
            ``switch_prob``, ``re_prob``/``probability``, ``re_mode``/``mode``).
            Missing keys take timm ``train.py``'s defaults.
        data_std: Per-channel pixel std of your data (0-1 scale); with
            ``std`` in ``args`` it tells whether pixel-mode erasing sees
            unit-variance images.
        pos_embed_resample: ``dict(rescale=...)`` of a PE resample in use
            (``'none'`` is flagged).

    Returns:
        The findings, most severe first (empty: nothing shifts the variance).
    """
    out: List[Finding] = []
    mix_name, mixup_alpha = _get(args, "mixup_alpha")
    _, cutmix_alpha = _get(args, "cutmix_alpha")
    _, prob = _get(args, "prob")
    _, switch_prob = _get(args, "switch_prob")
    if float(mixup_alpha) > 0 and float(prob) > 0:
        f = expected_within_variance_factor(float(mixup_alpha), float(cutmix_alpha), float(prob), float(switch_prob))
        out.append(Finding(mix_name, mixup_alpha, "warning",
                           f"Mixup scales the training images' variance by {f:.3f} on average "
                           f"(lam^2 + (1 - lam)^2, lam ~ Beta({mixup_alpha}, {mixup_alpha})"
                           + (f", applied to {1 - switch_prob:.0%} of the mixed batches" if float(cutmix_alpha) > 0
                              else "") + "), test images keep theirs: the PE/patch variance ratio shifts",
                           f"{mix_name}=0 (keep CutMix: cutmix=1.0)", factor=f))
    re_name, re_prob = _get(args, "re_prob")
    mode_name, re_mode = _get(args, "re_mode")
    if float(re_prob) > 0 and re_mode == "const":
        out.append(Finding(mode_name, re_mode, "warning",
                           f"random erasing ({re_name}={re_prob}) fills with a constant 0, which has no variance: "
                           f"erased pixels lower the image variance in training only",
                           f"{mode_name}='pixel' (per-pixel N(0, 1) on unit-variance normalised images)"))
    elif float(re_prob) > 0 and re_mode != "pixel":
        out.append(Finding(mode_name, re_mode, "note",
                           f"random erasing ({re_name}={re_prob}) fills each box with one random colour: the pixel "
                           f"variance is kept, but a flat box is not a textured patch for the patch embedding",
                           f"{mode_name}='pixel' (the guideline)"))
    if float(re_prob) > 0 and re_mode == "pixel" and data_std is not None and args.get("std") is not None:
        std = [float(s) for s in args["std"]]
        ratio = [d / s for d, s in zip(data_std, std)]
        if any(abs(r * r - 1) > 0.1 for r in ratio):
            out.append(Finding("std", tuple(std), "note",
                               f"normalised images have variance {[round(r * r, 3) for r in ratio]} per channel, "
                               f"while pixel-mode erasing fills with variance 1",
                               "normalise with the data's own mean/std (timm's ImageNet defaults for ImageNet)"))
    if pos_embed_resample is not None and pos_embed_resample.get("rescale", "none") == "none":
        out.append(Finding("pos_embed_resample", "rescale='none'", "warning",
                           "an upsampled positional embedding loses variance against the patch embedding",
                           "variance_preserving_resample(..., rescale='measured')"))
    return sorted(out, key=lambda f: f.severity != "warning")


# ----------------------------------------------------------------------------- positional embedding
def resample_pos_embed(pos_embed: torch.Tensor, new_size: Sequence[int], old_size: Optional[Sequence[int]] = None,
                       num_prefix_tokens: int = 1, interpolation: str = "bicubic",
                       antialias: bool = True) -> torch.Tensor:
    """timm's ``resample_abs_pos_embed`` (same arguments, same result; no timm import).

    Args:
        pos_embed: ``(1, prefix + H*W, C)``.
        new_size: ``(H', W')``.
        old_size: ``(H, W)`` (default: square).
        num_prefix_tokens: Class/register tokens in front (kept as they are).
        interpolation: ``F.interpolate`` mode.
        antialias: ``F.interpolate`` antialias.
    """
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must be (1, tokens, C), got {tuple(pos_embed.shape)}")
    n = pos_embed.shape[1] - num_prefix_tokens
    if old_size is None:
        hw = int(math.isqrt(n))
        old_size = (hw, hw)
    if old_size[0] * old_size[1] != n:
        raise ValueError(f"old_size {tuple(old_size)} does not hold the {n} grid tokens of pos_embed")
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim, dtype = grid.shape[-1], grid.dtype
    grid = grid.float().reshape(1, old_size[0], old_size[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(new_size), mode=interpolation, antialias=antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(dtype)
    return torch.cat([prefix, grid], dim=1) if num_prefix_tokens else grid


def variance_preserving_resample(pos_embed: torch.Tensor, new_size: Sequence[int],
                                 old_size: Optional[Sequence[int]] = None, num_prefix_tokens: int = 1,
                                 interpolation: str = "bicubic", antialias: bool = True,
                                 rescale: Union[str, float] = "measured") -> torch.Tensor:
    """Resample a PE to a new grid and restore its variance over the tokens.

    Args:
        pos_embed, new_size, old_size, num_prefix_tokens, interpolation,
            antialias: As :func:`resample_pos_embed`.
        rescale: ``'measured'`` ([decision]): per channel, the grid tokens'
            deviation from their mean is multiplied by ``std_before /
            std_after`` (population std over the tokens), so each channel's
            variance equals the original's; ``'none'``: timm's plain resample;
            a float: that fixed factor on the deviations.

    Returns:
        ``(1, prefix + H'*W', C)``; the prefix tokens are unchanged.
    """
    out = resample_pos_embed(pos_embed, new_size, old_size, num_prefix_tokens, interpolation, antialias)
    if rescale == "none":
        return out
    p = num_prefix_tokens
    grid = out[:, p:].to(torch.float32)
    mean = grid.mean(dim=1, keepdim=True)
    if rescale == "measured":
        before = pos_embed[:, p:].to(torch.float32).std(dim=1, unbiased=False, keepdim=True)
        after = grid.std(dim=1, unbiased=False, keepdim=True)
        factor = torch.where(after > 0, before / after.clamp_min(1e-12), torch.ones_like(after))
    elif isinstance(rescale, (int, float)) and not isinstance(rescale, bool) and rescale > 0:
        factor = torch.tensor(float(rescale))
    else:
        raise ValueError(f"rescale must be 'measured', 'none' or a positive float, got {rescale!r}")
    grid = (mean + (grid - mean) * factor).to(out.dtype)
    return torch.cat([out[:, :p], grid], dim=1) if p else grid


def pe_to_patch_variance_ratio(patch_tokens: torch.Tensor, pos_embed: torch.Tensor,
                               num_prefix_tokens: int = 1) -> float:
    """Variance of the PE's grid tokens over the variance of the patch embeddings (the paper's ratio).

    Args:
        patch_tokens: ``(B, N, C)`` patch embeddings *before* the PE is added
            (timm: ``model.patch_embed(x)`` flattened).
        pos_embed: ``(1, prefix + N, C)`` or ``(1, N, C)``.
        num_prefix_tokens: Prefix tokens in ``pos_embed`` to skip.

    Returns:
        ``Var(PE) / Var(patch tokens)``, each the variance over every element.
    """
    pe = pos_embed[:, num_prefix_tokens:] if pos_embed.shape[1] != patch_tokens.shape[1] else pos_embed
    return float(pe.detach().double().var(unbiased=False) / patch_tokens.detach().double().var(unbiased=False))
