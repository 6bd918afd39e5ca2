"""Dead pixel test: the lattice of partially dead input pixels a strided network leaves in its ERF.

Bum Jun Kim, Hyeyeon Choi, Hyeonah Jang, et al., Sang Woo Kim, "Dead Pixel Test
Using Effective Receptive Field" (Pattern Recognition Letters), and the authors'
code ``kmbmjn/deadpixeltest_code`` (``my_model.py``).

[paper] A convolution (or pooling) whose kernel size is not a multiple of its
stride covers some input pixels with more windows than others: a 3x3 stride-2
window covers even rows twice and odd rows once. Stacked, this leaves a lattice
in the effective receptive field (ERF, :mod:`kim_plugins.layers.erf`) where some
pixels barely reach the output ("partially dead"), and a 1x1 stride-2 shortcut
never sees the odd pixels at all.

[code] The authors' fix: every stride-2 kernel ``k`` becomes ``k + 1`` (an even
kernel that tiles the input evenly) with the pretrained weights zero-padded at
the right and bottom (``nn.ZeroPad2d((0, 1, 0, 1))``, padding kept), the stem
max-pool 3 -> 4 (``kernel_size=4, stride=2, padding=1``) and the 1x1 stride-2
shortcut -> 2x2. Zero-padding keeps the function (the extra tap multiplies by
0) whenever the output size is unchanged, i.e. ``(H + 2p - k) mod s >= k' - k``
(every even input size for a ResNet's stride-2 layers); the max-pool change is
not function-preserving and is applied only when asked (``maxpool=True``).
Fresh models (the code's ``*_f`` variants) draw new weights for the even kernels.

What this module computes:

- :func:`dead_pixel_report`: from an ERF map, the mean ERF of every pixel-parity
  class ``(y mod P, x mod P)`` and their max/min ratio (the *lattice ratio*; 1 =
  no lattice), the same per axis, and a dead-pixel map.
- :func:`stage_dead_pixel_reports`: the report of every stage's ERF, so the
  stage where the lattice appears is visible (per-stage attribution).
- :func:`even_kernel_changes` / :func:`even_kernel_convert`: the authors'
  conversion, for any network built from ``nn.Conv2d`` / ``nn.MaxPool2d``
  (timm and mmseg ResNets included).

[decision] Details the sources leave open, each an argument:

- ``period=2``: pixel classes by parity (the stride of one downsampling layer);
  ``period=4, 8, ...`` shows the coarser lattices of deeper stages.
- The lattice ratio uses class *means* over the whole map; the per-axis ratio
  uses the means over rows (columns) of equal ``y mod P`` (``x mod P``). For
  one all-ones 3x3 stride-2 convolution the per-axis ratio is exactly 2 and the
  2D ratio its square, 4 (tested).
- A pixel is *dead* when its ERF is below ``threshold=0.5`` times its local
  lattice-free level: the mean, over the ``P x P`` windows containing it, of
  each window's mean (a window holds one pixel of every class). Only pixels
  inside the ERF count: every window containing them has a mean of at least
  ``support=0.01`` times the largest window mean.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from kim_plugins.layers.erf import erf_maps

__all__ = [
    "DeadPixelReport",
    "KernelChange",
    "dead_pixel_report",
    "stage_targets",
    "stage_dead_pixel_reports",
    "even_kernel_changes",
    "even_kernel_convert",
]


@dataclass
class DeadPixelReport:
    """The pixel-parity statistics of one ERF map.

    Attributes:
        period: Lattice period ``P`` (classes ``(y mod P, x mod P)``).
        class_means: ``(P, P)`` mean ERF of each class.
        ratio: max/min of ``class_means`` (``inf`` when a class gets nothing).
        axis_ratios: ``(ratio over y mod P, ratio over x mod P)`` of the row /
            column class means.
        dead_map: ``(H, W)`` bool map of dead pixels (inside the ERF support).
        dead_fraction: Dead pixels / pixels inside the support.
        threshold: Relative level under which a pixel is dead.
    """

    period: int
    class_means: torch.Tensor
    ratio: float
    axis_ratios: Tuple[float, float]
    dead_map: torch.Tensor
    dead_fraction: float
    threshold: float

    def numbers(self) -> Dict[str, object]:
        """The scalar fields (JSON-serialisable)."""
        return dict(period=self.period, ratio=self.ratio, ratio_y=self.axis_ratios[0],
                    ratio_x=self.axis_ratios[1], dead_fraction=self.dead_fraction, threshold=self.threshold,
                    class_means=self.class_means.tolist())


def _ratio(values: torch.Tensor) -> float:
    lo, hi = float(values.min()), float(values.max())
    if hi <= 0:
        return float("nan")
    return hi / lo if lo > 0 else math.inf


def dead_pixel_report(erf: torch.Tensor, period: int = 2, threshold: float = 0.5,
                      support: float = 0.01) -> DeadPixelReport:
    """Lattice ratio and dead-pixel map of an ERF.

    Args:
        erf: ``(H, W)`` non-negative ERF map (e.g. from :func:`kim_plugins.layers.erf.erf_maps`).
        period: Lattice period ``P >= 2``; classes are ``(y mod P, x mod P)``.
        threshold: A pixel is dead when ``erf < threshold * local level``, in (0, 1).
        support: Only pixels whose local level is at least ``support`` times
            the largest level count (the inside of the ERF), in [0, 1).

    Returns:
        A :class:`DeadPixelReport`.

    Raises:
        ValueError: a map that is not 2-D, negative or all zero, smaller than
            ``period``, or a bad ``period`` / ``threshold`` / ``support``.
    """
    if not isinstance(erf, torch.Tensor) or erf.dim() != 2:
        raise ValueError(f"erf must be an (H, W) tensor, got {getattr(erf, 'shape', type(erf).__name__)}")
    if not isinstance(period, int) or period < 2:
        raise ValueError(f"period must be an int >= 2, got {period!r}")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    if not 0.0 <= support < 1.0:
        raise ValueError(f"support must be in [0, 1), got {support}")
    z = erf.detach().to(torch.float64).cpu()
    h, w = z.shape
    if h < period or w < period:
        raise ValueError(f"the map ({h}x{w}) is smaller than the period {period}")
    if bool((z < 0).any()) or float(z.sum()) <= 0:
        raise ValueError("the ERF map must be non-negative with a positive sum")
    ys = torch.arange(h) % period
    xs = torch.arange(w) % period
    class_means = torch.zeros(period, period, dtype=torch.float64)
    for a in range(period):
        for b in range(period):
            class_means[a, b] = z[ys == a][:, xs == b].mean()
    row_means = torch.stack([z[ys == a].mean() for a in range(period)])
    col_means = torch.stack([z[:, xs == b].mean() for b in range(period)])
    level, lowest = _window_levels(z, period)
    inside = lowest >= support * float(level.max())
    dead = inside & (z < threshold * level)
    return DeadPixelReport(period=period, class_means=class_means, ratio=_ratio(class_means),
                           axis_ratios=(_ratio(row_means), _ratio(col_means)), dead_map=dead,
                           dead_fraction=float(dead.sum()) / max(int(inside.sum()), 1), threshold=threshold)


def _window_levels(z: torch.Tensor, period: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Lattice-free level of every pixel: the mean and the minimum, over the ``P x P``
    windows (inside the map) that contain it, of each window's mean (a window holds
    one pixel of every class)."""
    p = period
    win = F.avg_pool2d(z[None, None], p, stride=1)  # (1, 1, H-P+1, W-P+1) window means
    ones = torch.ones_like(win)
    pad = (p - 1, p - 1, p - 1, p - 1)
    total = F.avg_pool2d(F.pad(win, pad), p, stride=1, divisor_override=1)
    count = F.avg_pool2d(F.pad(ones, pad), p, stride=1, divisor_override=1)
    lowest = -F.max_pool2d(F.pad(-win, pad, value=-math.inf), p, stride=1)
    return (total / count)[0, 0], lowest[0, 0]


# ----------------------------------------------------------------------------- per-stage attribution
def stage_targets(model: nn.Module,
                  num_stages: Optional[int] = None) -> Dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """One ERF target per stage of a backbone: ``x -> (B, C, h, w)`` stage output.

    timm models: ``forward_intermediates(x, indices=[i], intermediates_only=True)``
    for each entry of ``feature_info`` (named by its module, e.g. ``act1``,
    ``layer1``). Other backbones (mmseg's ``ResNet``): the entries of the tuple
    ``model(x)`` returns, named ``out<i>``.

    Args:
        model: The backbone.
        num_stages: Number of stages of a backbone without ``feature_info``
            (default: measured with one forward of a 1x3x64x64 input).

    Raises:
        ValueError: a backbone whose forward gives neither intermediates nor a
            tuple of 4-D maps.
    """
    info = getattr(model, "feature_info", None)
    if hasattr(model, "forward_intermediates") and isinstance(info, (list, tuple)) and info:
        names = [str(f.get("module", f"stage{i}")) for i, f in enumerate(info)]

        def timm_target(i: int) -> Callable[[torch.Tensor], torch.Tensor]:
            return lambda x: model.forward_intermediates(x, indices=[i], intermediates_only=True)[-1]
        return {name: timm_target(i) for i, name in enumerate(names)}
    if num_stages is None:
        p = next(model.parameters(), None)
        with torch.no_grad():
            probe = model(torch.zeros(1, 3, 64, 64, device=p.device if p is not None else "cpu"))
        if not isinstance(probe, (list, tuple)) or not all(isinstance(t, torch.Tensor) and t.dim() == 4
                                                           for t in probe):
            raise ValueError(f"{type(model).__name__}: stage targets need timm's forward_intermediates or a "
                             f"forward returning a tuple of (B, C, h, w) maps (an mmseg backbone); pass targets")
        num_stages = len(probe)

    def tuple_target(i: int) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda x: model(x)[i]
    return {f"out{i}": tuple_target(i) for i in range(num_stages)}


def stage_dead_pixel_reports(model: nn.Module, images: torch.Tensor,
                             targets: Optional[Dict[str, Callable[[torch.Tensor], torch.Tensor]]] = None,
                             period: int = 2, threshold: float = 0.5, support: float = 0.01,
                             batch_size: int = 8, progress: bool = False
                             ) -> Dict[str, Tuple[torch.Tensor, DeadPixelReport]]:
    """ERF and dead-pixel report of the centre unit of every stage (eval mode).

    Args:
        model: The network (its mode is restored afterwards).
        images: ``(N, C, H, W)`` normalised images.
        targets: ``name -> x -> (B, C, h, w)`` (default :func:`stage_targets`).
        period, threshold, support: See :func:`dead_pixel_report`.
        batch_size: Images per backward.
        progress: Show a progress bar per stage.

    Returns:
        ``name -> (erf map (H, W), report)`` in stage order.
    """
    targets = stage_targets(model) if targets is None else targets
    out = {}
    for name, fn in targets.items():
        erf = erf_maps(model, images, target=fn, batch_size=batch_size, progress=progress)[0]
        out[name] = (erf, dead_pixel_report(erf, period=period, threshold=threshold, support=support))
    return out


# ----------------------------------------------------------------------------- even-kernel conversion
@dataclass
class KernelChange:
    """One layer the even-kernel conversion changes (or cannot change).

    Attributes:
        name: Module name in the model.
        kind: ``'conv'`` or ``'maxpool'``.
        old_kernel / new_kernel: ``(kh, kw)`` before and after.
        stride: ``(sh, sw)``.
        function_preserving: The change keeps the output (zero-padded conv
            weights, for input sizes where the output size is unchanged).
        applied: False when the layer is only reported (``reason`` says why).
        reason: Why a layer is not changed.
    """

    name: str
    kind: str
    old_kernel: Tuple[int, int]
    new_kernel: Tuple[int, int]
    stride: Tuple[int, int]
    function_preserving: bool
    applied: bool = True
    reason: str = ""


def _pair(v) -> Tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _even_kernel(kernel: Tuple[int, int], stride: Tuple[int, int]) -> Tuple[int, int]:
    """The smallest multiple of the stride that is >= the kernel, per axis (3, s2 -> 4; 1, s2 -> 2)."""
    return tuple(int(math.ceil(k / s)) * s for k, s in zip(kernel, stride))  # type: ignore[return-value]


def even_kernel_changes(model: nn.Module, maxpool: bool = False) -> List[KernelChange]:
    """What :func:`even_kernel_convert` changes in ``model`` (nothing is modified).

    Every ``nn.Conv2d`` (or subclass keeping its forward) with a stride > 1 and
    a kernel that is not a multiple of it, and every such ``nn.MaxPool2d``.

    Args:
        model: Any network.
        maxpool: Also change max-pools (not function-preserving); without it
            they are listed with ``applied=False``.
    """
    changes = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            stride, kernel = _pair(m.stride), _pair(m.kernel_size)
            if max(stride) == 1 or all(k % s == 0 for k, s in zip(kernel, stride)):
                continue
            new = _even_kernel(kernel, stride)
            reason = ""
            if type(m).forward is not nn.Conv2d.forward:
                reason = f"{type(m).__name__} has its own forward (e.g. dynamic 'same' padding)"
            elif isinstance(m.padding, str) or m.padding_mode != "zeros":
                reason = f"padding={m.padding!r}, padding_mode={m.padding_mode!r}: only explicit zero padding"
            elif _pair(m.dilation) != (1, 1):
                reason = f"dilation={m.dilation}: only undilated kernels"
            changes.append(KernelChange(name, "conv", kernel, new, stride, function_preserving=not reason,
                                        applied=not reason, reason=reason))
        elif isinstance(m, nn.MaxPool2d):
            stride, kernel = _pair(m.stride), _pair(m.kernel_size)
            if max(stride) == 1 or all(k % s == 0 for k, s in zip(kernel, stride)):
                continue
            reason = "" if maxpool else "a larger max-pool window changes the function: pass maxpool=True"
            if _pair(m.dilation) != (1, 1):
                reason = f"dilation={m.dilation}: only undilated windows"
            changes.append(KernelChange(name, "maxpool", kernel, _even_kernel(kernel, stride), stride,
                                        function_preserving=False, applied=not reason, reason=reason))
    return changes


def even_kernel_convert(model: nn.Module, maxpool: bool = False, init: str = "pad") -> nn.Module:
    """The authors' even-kernel conversion, in place: stride-``s`` kernels -> multiples of ``s``.

    Convolutions keep their padding, stride, groups and bias; their weight is
    zero-padded at the right and bottom (``init='pad'``, [code]
    ``get_padded_operation``), which keeps the function for input sizes where
    the output size does not change (``(H + 2p - k) mod s >= k' - k``; every
    even size for ResNets). Convert before building the optimizer: the weight
    is a new ``nn.Parameter``.

    Args:
        model: Network built from ``nn.Conv2d`` / ``nn.MaxPool2d`` (timm ``ResNet``,
            mmseg ``ResNet``/``ResNetV1c``/``ResNetV1d``, torchvision ResNets).
        maxpool: Also turn max-pools ``k`` -> even (3 -> 4 with the same stride
            and padding, [code]); this is not function-preserving.
        init: ``'pad'`` (zero-pad the existing weights) or ``'fresh'`` (draw
            the whole even kernel anew, Kaiming-normal fan-out as timm's ResNet
            init, [code] the ``*_f`` models).

    Returns:
        ``model`` itself.

    Raises:
        ValueError: an unknown ``init``.
    """
    if init not in ("pad", "fresh"):
        raise ValueError(f"init must be 'pad' (zero-pad the weights) or 'fresh' (new weights), got {init!r}")
    modules = dict(model.named_modules())
    for ch in even_kernel_changes(model, maxpool=maxpool):
        if not ch.applied:
            continue
        m = modules[ch.name]
        if ch.kind == "maxpool":
            m.kernel_size = ch.new_kernel
            continue
        dh, dw = ch.new_kernel[0] - ch.old_kernel[0], ch.new_kernel[1] - ch.old_kernel[1]
        with torch.no_grad():
            weight = F.pad(m.weight.detach(), (0, dw, 0, dh))
            if init == "fresh":
                nn.init.kaiming_normal_(weight, mode="fan_out", nonlinearity="relu")
        m.weight = nn.Parameter(weight, requires_grad=m.weight.requires_grad)
        m.kernel_size = ch.new_kernel
    return model
