"""Resolution-aware atrous rates for ASPP.

Paper: Bum Jun Kim, Hyeyeon Choi, Hyeonah Jang, Sang Woo Kim, "Resolution-Aware
Design of Atrous Rates for Semantic Segmentation Networks", arXiv 2307.14179.

[paper] ASPP's fixed rates (mmseg configs use ``(1, 12, 24, 36)``, the head's
default is ``(1, 6, 12, 18)``) fix its field of view; the effective receptive
field (ERF) of ASPP is a lattice (the centre plus satellites at +-r*OS input
pixels), and the optimal rate has to be set from the input image size.

[decision] The closed form was not available to us. The rule implemented here:
with the feature size ``F = ceil(min(H, W) / OS)`` of the crop that the head
sees, ``r_max = max(1, min(floor(kappa * F), floor((F - 1) / 2)))``
(``kappa = 0.5``: the outermost taps of the centre pixel reach the image
border; ``kappa`` must lie in (0, 0.5]), and the ladder keeps the shape of
the reference ladder ``(1, 12, 24, 36)`` scaled to ``r_max``: ``r_0 = 1`` and
``r_i = round(r_max * i / (n - 1))`` for ``i = 1 .. n-1`` (rounding half up).
The ladder must be strictly increasing; a feature map too small for
``num_rates`` distinct rates is an error.

Non-degenerate branches: a 3x3 convolution of rate ``r`` has a position whose
taps ``y - r, y, y + r`` all fall inside an ``F``-pixel axis only if
``2r <= F - 1``, i.e. ``r <= floor((F - 1) / 2)`` (:func:`max_nondegenerate_rate`).
A larger rate leaves a branch of which no output sees its full 3x3 kernel —
the degenerate case DeepLabV3 (Chen et al., arXiv 1706.05587, section 3.3)
warns about. The rule never exceeds that bound (for an even ``F`` and
``kappa = 0.5``, ``floor(F/2)`` would be one too many), and
:func:`resolve_dilations` warns about any explicit rate beyond it, naming the
rate, the feature size and the rule's suggestion. ASPP's rate-1 branch is a
1x1 convolution in mmseg, so rate 1 is never degenerate. The bound uses the
shorter side of a non-square crop, the only side for which every branch stays
non-degenerate along both axes.

``output_stride`` is the stride of the feature map the ASPP head actually
sees: 8 for the ResNet-D8 DeepLabV3 configs, but 1 for mmseg's UNet-S5-D16 +
ASPP configs (the head reads the full-resolution decoder output). Use
:func:`measure_output_stride` (a dummy forward) when in doubt; the mmseg
adapter does that for ``output_stride='infer'``.

This module needs only torch.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Callable, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "REFERENCE_RATES",
    "resolution_aware_rates",
    "rate_ladder",
    "feature_size",
    "max_nondegenerate_rate",
    "degenerate_rates",
    "DegenerateRateWarning",
    "resolve_dilations",
    "measure_output_stride",
    "normalize_crop_size",
]

#: The rates mmseg's DeepLabV3 / DeepLabV3+ configs use (the paper's baseline).
REFERENCE_RATES: Tuple[int, ...] = (1, 12, 24, 36)

CropSize = Union[int, Sequence[int]]


def normalize_crop_size(crop_size: CropSize) -> Tuple[int, int]:
    """Return ``crop_size`` as an ``(H, W)`` tuple of positive ints.

    Args:
        crop_size: An int (square crop) or an ``(H, W)`` pair, as in mmseg's
            ``crop_size = (512, 1024)``.

    Raises:
        ValueError: not an int or a pair of ints, or not positive.
    """
    if isinstance(crop_size, bool):
        raise ValueError(f"crop_size must be an int or an (H, W) pair of ints, got {crop_size!r}")
    if isinstance(crop_size, numbers.Integral):
        hw = (int(crop_size), int(crop_size))
    elif (isinstance(crop_size, Sequence) and not isinstance(crop_size, str) and len(crop_size) == 2
          and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in crop_size)):
        hw = (int(crop_size[0]), int(crop_size[1]))
    else:
        raise ValueError(f"crop_size must be an int or an (H, W) pair of ints, got {crop_size!r}")
    if min(hw) <= 0:
        raise ValueError(f"crop_size must be positive, got {crop_size!r}")
    return hw


def _check_output_stride(output_stride: object) -> int:
    if isinstance(output_stride, bool) or not isinstance(output_stride, numbers.Integral):
        hint = (" 'infer' is resolved by the segmentor, not by this function: use "
                "type='RAEncoderDecoder' or kim_plugins.mmseg.ra_aspp_heads.resolve_auto_dilations(cfg)"
                if output_stride == "infer" else "")
        raise ValueError(f"output_stride must be a positive int, got {output_stride!r}.{hint}")
    if output_stride <= 0:
        raise ValueError(f"output_stride must be positive, got {output_stride!r}")
    return int(output_stride)


class DegenerateRateWarning(UserWarning):
    """An atrous rate leaves a 3x3 branch with no position whose taps all fall inside the feature map."""


def feature_size(crop_size: CropSize, output_stride: int) -> int:
    """``F = ceil(min(H, W) / output_stride)``: the shorter side of the feature map the head sees."""
    hw = normalize_crop_size(crop_size)
    return math.ceil(min(hw) / _check_output_stride(output_stride))


def max_nondegenerate_rate(feat: int) -> int:
    """The largest rate ``r = floor((F - 1) / 2)`` whose 3x3 taps all fit, at some position, in ``F`` pixels.

    Taps ``y - r, y, y + r`` lie in ``[0, F - 1]`` for some ``y`` iff ``2r <= F - 1``.
    """
    if isinstance(feat, bool) or not isinstance(feat, numbers.Integral) or feat < 1:
        raise ValueError(f"feature size must be an int >= 1, got {feat!r}")
    return (int(feat) - 1) // 2


def degenerate_rates(dilations: Sequence[int], crop_size: CropSize, output_stride: int) -> Tuple[int, ...]:
    """The rates (> 1) of ``dilations`` above :func:`max_nondegenerate_rate` of the crop's feature map.

    Rate 1 is ASPP's 1x1 branch in mmseg and never degenerate.
    """
    bound = max_nondegenerate_rate(feature_size(crop_size, output_stride))
    return tuple(int(d) for d in dilations if d > 1 and d > bound)


def _check_kappa(kappa: object) -> float:
    if isinstance(kappa, bool) or not isinstance(kappa, numbers.Real) or not math.isfinite(kappa) \
            or not 0 < kappa <= 0.5:
        raise ValueError(f"kappa must be a number in (0, 0.5], got {kappa!r}: the largest rate reaches kappa * F "
                         f"of the F-pixel feature map, and above 0.5 the centre position's outer taps leave the map "
                         f"(use explicit dilations for larger rates)")
    return float(kappa)


def _suggestion(crop_size: CropSize, output_stride: int, num_rates: int, kappa: float) -> str:
    """The rule's rates for the crop, or the longest ladder the feature map allows."""
    for n in range(int(num_rates), 1, -1):
        try:
            rates = resolution_aware_rates(crop_size, output_stride, num_rates=n, kappa=kappa)
        except ValueError:
            continue
        return (f"dilations={rates}" if n == num_rates else
                f"dilations={rates} (the map is too small for {num_rates} distinct rates)")
    return "rate 1 only (the map is too small for any dilated 3x3 branch)"


def rate_ladder(r_max: int, num_rates: int = 4) -> Tuple[int, ...]:
    """The rule's ladder for a given largest rate: ``(1, round(r_max * i / (n - 1)) for i = 1 .. n-1)``.

    Rounding is half up. The result is not checked for being strictly
    increasing (:func:`resolution_aware_rates` does that); the ERF search of
    ``tools/atrous_rates.py`` sweeps ``r_max`` through this function.
    """
    if isinstance(num_rates, bool) or not isinstance(num_rates, numbers.Integral) or num_rates < 2:
        raise ValueError(f"num_rates must be an int >= 2 (the ladder starts at 1 and ends at r_max), "
                         f"got {num_rates!r}")
    n = int(num_rates)
    return (1,) + tuple(int(math.floor(r_max * i / (n - 1) + 0.5)) for i in range(1, n))


def resolution_aware_rates(crop_size: CropSize, output_stride: int, num_rates: int = 4,
                           kappa: float = 0.5) -> Tuple[int, ...]:
    """Atrous rates for an ASPP head from the training crop and the feature stride.

    ``F = ceil(min(H, W) / output_stride)``,
    ``r_max = max(1, min(floor(kappa * F), floor((F - 1) / 2)))``, ``r_0 = 1``,
    ``r_i = round(r_max * i / (num_rates - 1))`` (half up). This is the
    project's reading of arXiv 2307.14179 ([decision], see the module
    docstring). Every rate satisfies ``r <= floor((F - 1) / 2)``: no branch is
    degenerate (some position sees all its 3x3 taps inside the map). Scaling
    ``crop_size`` and ``output_stride`` by the same integer leaves the rates
    unchanged.

    Examples:
        >>> resolution_aware_rates((512, 1024), 8)    # Cityscapes, R-101-D8: F = 64, r_max = 31
        (1, 10, 21, 31)
        >>> resolution_aware_rates(128, 1)            # STARE, UNet-S5-D16 + ASPP: F = 128, r_max = 63
        (1, 21, 42, 63)

    Args:
        crop_size: Training crop, an int or ``(H, W)``.
        output_stride: Stride of the feature map the ASPP head sees, relative
            to the crop (8 for ResNet-D8, 1 for mmseg's UNet + ASPP).
        num_rates: Number of ASPP branches (length of the ladder), >= 2.
        kappa: Fraction of the feature size reached by the largest rate, in (0, 0.5].

    Returns:
        A strictly increasing tuple of ``num_rates`` ints starting at 1, each
        at most ``floor((F - 1) / 2)`` (rate 1 excepted: a 1x1 branch).

    Raises:
        ValueError: non-positive sizes, ``num_rates < 2``, ``kappa`` outside
            (0, 0.5], or a feature map too small for ``num_rates`` distinct
            rates (the message names the crop size and output stride).
    """
    stride = _check_output_stride(output_stride)
    feat = feature_size(crop_size, stride)
    rate_ladder(1, num_rates)  # validates num_rates
    kappa = _check_kappa(kappa)
    r_max = max(1, min(math.floor(kappa * feat), max_nondegenerate_rate(feat)))
    n = int(num_rates)
    rates = rate_ladder(r_max, n)
    if any(b <= a for a, b in zip(rates, rates[1:])):
        raise ValueError(
            f"crop_size={crop_size!r} with output_stride={stride} gives a {feat}-pixel feature map and "
            f"r_max={r_max}: too small for {n} distinct atrous rates (ladder {rates}). Use a larger crop, "
            f"a smaller output_stride, fewer rates (num_rates) or explicit dilations.")
    return rates


def resolve_dilations(dilations: Union[str, Sequence[int]], crop_size: Optional[CropSize] = None,
                      output_stride: Optional[int] = None, num_rates: int = 4,
                      kappa: float = 0.5) -> Tuple[int, ...]:
    """Resolve an ASPP ``dilations`` argument that may be ``'auto'``.

    Explicit dilations are returned unchanged (as a tuple); ``'auto'`` is
    replaced by :func:`resolution_aware_rates`. This is the single resolver
    every resolution-aware head uses. When ``crop_size`` and an int
    ``output_stride`` are known, an explicit rate above
    ``floor((F - 1) / 2)`` (a degenerate branch, see the module docstring)
    gets a :class:`DegenerateRateWarning` naming the rate, the feature size
    and the rule's suggestion.

    Args:
        dilations: ``'auto'`` or a sequence of positive ints.
        crop_size: Training crop (required for ``'auto'``).
        output_stride: Stride of the feature map the head sees (required for
            ``'auto'``, an int; ``'infer'`` must have been resolved before).
        num_rates: Ladder length for ``'auto'``.
        kappa: See :func:`resolution_aware_rates`.

    Returns:
        The dilations as a tuple of ints.

    Raises:
        ValueError: unknown string, missing ``crop_size``/``output_stride`` for
            ``'auto'``, ``kappa`` outside (0, 0.5], or non-positive /
            non-integer explicit rates.
    """
    kappa = _check_kappa(kappa)
    if isinstance(dilations, str):
        if dilations != "auto":
            raise ValueError(f"dilations must be 'auto' or a tuple of ints, got {dilations!r}")
        missing = [n for n, v in (("crop_size", crop_size), ("output_stride", output_stride)) if v is None]
        if missing:
            raise ValueError(f"dilations='auto' needs {' and '.join(missing)}: pass crop_size=<training crop "
                             f"(H, W)> and output_stride=<stride of the feature map the head sees, e.g. 8 "
                             f"for ResNet-D8, 1 for UNet-S5-D16>")
        return resolution_aware_rates(crop_size, output_stride, num_rates=num_rates, kappa=kappa)
    if isinstance(dilations, torch.Tensor) or not isinstance(dilations, Sequence):
        raise ValueError(f"dilations must be 'auto' or a tuple of ints, got {dilations!r}")
    if not dilations or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and d > 0
                                for d in dilations):
        raise ValueError(f"dilations must be 'auto' or a non-empty tuple of positive ints, got {dilations!r}")
    rates = tuple(int(d) for d in dilations)
    known = (crop_size is not None and isinstance(output_stride, numbers.Integral)
             and not isinstance(output_stride, bool))
    bad = degenerate_rates(rates, crop_size, output_stride) if known else ()
    if bad:
        feat = feature_size(crop_size, output_stride)
        warnings.warn(
            f"dilations={rates}: rate{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))} > "
            f"floor((F - 1) / 2) = {max_nondegenerate_rate(feat)} for the F={feat}-pixel feature map "
            f"(crop_size={crop_size!r}, output_stride={output_stride}): no position sees all the 3x3 taps of "
            f"{'these branches' if len(bad) > 1 else 'this branch'} (degenerate). The rule (dilations='auto') suggests "
            f"{_suggestion(crop_size, output_stride, len(rates), kappa)}.",
            DegenerateRateWarning, stacklevel=2)
    return rates


def measure_output_stride(feature_fn: Callable[[torch.Tensor], torch.Tensor], crop_size: CropSize,
                          in_channels: int = 3, device: Optional[torch.device] = None) -> int:
    """Measure the stride of a feature map with one dummy forward at the crop size.

    Args:
        feature_fn: Maps an image batch ``(1, C, H, W)`` to the feature map the
            head sees, ``(1, C', h, w)``.
        crop_size: Training crop, an int or ``(H, W)``.
        in_channels: Channels of the dummy image.
        device: Device of the dummy image (default: CPU).

    Returns:
        ``round(H / h)``, which must equal ``round(W / w)``.

    Raises:
        ValueError: the feature map is not 4-D, is larger than the input, or
            the two axes disagree.
    """
    h_in, w_in = normalize_crop_size(crop_size)
    with torch.no_grad():
        feat = feature_fn(torch.zeros(1, in_channels, h_in, w_in, device=device))
    if not isinstance(feat, torch.Tensor) or feat.dim() != 4:
        raise ValueError(f"feature_fn must return a (N, C, h, w) tensor, got "
                         f"{getattr(feat, 'shape', type(feat).__name__)}")
    h, w = feat.shape[-2:]
    sy, sx = h_in / h, w_in / w
    if sy < 0.75 or sx < 0.75:
        raise ValueError(f"feature map {tuple(feat.shape[-2:])} is larger than the crop {(h_in, w_in)}")
    if round(sy) != round(sx):
        raise ValueError(f"feature map {tuple(feat.shape[-2:])} of crop {(h_in, w_in)} has different strides "
                         f"along H ({sy:.2f}) and W ({sx:.2f})")
    return int(round(sy))
