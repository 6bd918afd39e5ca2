"""Scale-equalized mmseg decode heads: UPer, PSP, ASPP, separable ASPP and FCN.

Paper: Bum Jun Kim, Sang Woo Kim, "Scale Equalization for Multi-Level Feature
Fusion", TMLR 2024, arXiv 2402.01149. The equalizer itself, its calibration
and its folding are in :mod:`kim_plugins.layers.scale_equalizer`; this module
only places equalizers in mmseg's heads.

Registered names (``mmseg.registry.MODELS``), each taking every argument of
its mmseg parent (and rejecting what the parent rejects, with the parent's
exception type) plus the SE options of :class:`ScaleEqualizedHeadMixin`:

=================================  ==============================  ==========================================
name                               parent                          upsampled operands: an equalizer after ...
=================================  ==============================  ==========================================
``SEPSPHead``                      ``PSPHead``                     each PPM branch's resize (``ppm_i``)
``SEUPerHead``                     ``UPerHead``                    each PPM branch's resize (``ppm_i``); the
                                                                   top-down ``resize(laterals[i])`` before it
                                                                   is added to ``laterals[i-1]``
                                                                   (``top_down_i``); each ``fpn_outs[i]``
                                                                   resize, i >= 1 (``fpn_i``)
``SEASPPHead``                     ``ASPPHead``                    the image-pool resize (``image_pool``)
``SEDepthwiseSeparableASPPHead``   ``DepthwiseSeparableASPPHead``  the image-pool resize; the ASPP output's
                                                                   resize to the c1 size (``aspp_to_c1``,
                                                                   only when ``c1_in_channels > 0``)
``SEFCNHead``                      ``FCNHead``                     each of inputs[1:] resized in
                                                                   ``_transform_inputs`` (``input_i``; only
                                                                   with ``input_transform='resize_concat'``)
=================================  ==============================  ==========================================

Which operands [decision, METHODS.md §1 "Which operands"]: the paper promises
scale *equilibrium* across the fused features, so by default
(``equalize_all_branches=True``) every operand of each fusion that a bilinear
upsampling feeds is equalized: besides the upsampled ones above, ``ppm_input``
(PSP/UPer), the lateral ``lateral_i`` of each top-down add and ``fpn_0``
(UPer), every ASPP branch ``aspp_i`` and ``c1`` (ASPP heads), ``input_0``
(FCN). ``equalize_all_branches=False`` is the alternative, literal reading of
"after every bilinear upsampling": only the upsampled operands, which leaves
the others at the scale the network gives them. A head in which no bilinear
upsampling feeds a fusion (e.g. ``SEFCNHead`` with the default
``input_transform=None``) has no equalizer, computes exactly its parent, and
says so once in the log.

One mechanism serves all five heads: the mixin wraps the parent's
``forward`` in a thread-local ``TorchFunctionMode`` that applies the k-th
equalizer to the output of the k-th bilinear ``F.interpolate`` call of the
parent's own code (mmseg's ``resize``), so the parent's forward runs unchanged;
each head only declares its call sites (``_se_resize_sites``), its fusion
sites (``_se_fusion_sites``) and the convolutions that consume them
(``_se_fold_plan``). A head checks after every forward that the parent made
exactly the calls it declared. With ``se_mode=None`` (or once every
equalizer is folded) the head *is* its parent's forward. A calibrated
``'dataset'`` equalizer is a constant affine map, which commutes with the
resize (its weights sum to 1), so in training it is applied to the resize's
small input rather than to its upsampled output: the same values and
gradients at a fraction of the cost (``se_apply_before_resize``). Calibration
and ``'batch'`` mode always see the upsampled tensor.

Config example (``custom_imports=dict(imports=['kim_plugins.mmseg'])``)::

    model = dict(decode_head=dict(type='SEPSPHead'))   # the rest of the head config is unchanged
    custom_hooks = [dict(type='ScaleEqualizerCalibrationHook', num_batches=50)]
"""
from __future__ import annotations

import logging
import warnings
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from mmcv.cnn import ConvModule
from mmengine.logging import print_log
from mmseg.models.decode_heads import (ASPPHead, DepthwiseSeparableASPPHead, FCNHead, PSPHead,
                                       UPerHead)
from mmseg.registry import MODELS

from kim_plugins.layers.fusion_trace import FusionTracingMode
from kim_plugins.layers.scale_equalizer import SE_MODES, ScaleEqualizer, fold_input_affine
from kim_plugins.mmseg.ra_aspp_heads import ResolutionAwareDilationsMixin

__all__ = [
    "ScaleEqualizedHeadMixin",
    "SEPSPHead",
    "SEUPerHead",
    "SEASPPHead",
    "SEDepthwiseSeparableASPPHead",
    "SEFCNHead",
]

# (owner module, attribute holding the consumer nn.Conv2d, [(site, first channel, end channel)])
FoldPlan = List[Tuple[nn.Module, str, List[Tuple[str, int, int]]]]


class _FusionSiteMode(FusionTracingMode):
    """Applies a head's equalizers at its declared ``F.interpolate`` calls and fusion operands.

    The interception is :class:`~kim_plugins.layers.fusion_trace.FusionTracingMode`, shared with the
    benchmark suite's variance probe.
    """

    def __init__(self, head: "ScaleEqualizedHeadMixin") -> None:
        super().__init__()
        self.head = head
        self.resize_sites = head._se_resize_plan
        self.fusion_sites = head._se_fusion_plan
        self.n_resize = 0
        self.n_fusion = 0

    def _is_upsampled(self, t: Any) -> bool:  # an equalized resize output
        return self.marked(t) is not None

    def _equalize_fusion_operand(self, t: torch.Tensor) -> torch.Tensor:
        k = self.n_fusion
        self.n_fusion += 1
        if k >= len(self.fusion_sites):
            return t  # reported by check()
        return self.head.scale_equalizers[self.fusion_sites[k]](t)

    def on_interpolate(self, func, args, kwargs):
        k = self.n_resize
        self.n_resize += 1
        site = self.resize_sites[k] if k < len(self.resize_sites) else None
        se = self.head.scale_equalizers[site] if site is not None else None
        if isinstance(se, ScaleEqualizer) and self.head.se_apply_before_resize and se.commutes_with_resize:
            # a constant affine map commutes with the resize: apply it to the smaller input
            if args:
                args = (se(args[0]),) + tuple(args[1:])
            else:
                kwargs = dict(kwargs, input=se(kwargs["input"]))
            out = func(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
            if se is not None:
                out = se(out)
        if se is not None and self.fusion_sites:
            self.mark(out)
        return out

    def on_concat(self, tensors):
        if self.fusion_sites and any(self._is_upsampled(t) for t in tensors):
            return [t if self._is_upsampled(t) else self._equalize_fusion_operand(t) for t in tensors]
        return None

    def on_add(self, a, b):
        if not self.fusion_sites:
            return None
        if self._is_upsampled(b) and not self._is_upsampled(a):
            return self._equalize_fusion_operand(a), b
        if self._is_upsampled(a) and not self._is_upsampled(b):
            return a, self._equalize_fusion_operand(b)
        return None

    def check(self) -> None:
        head = type(self.head).__name__
        parent = self.head._se_parent_name()
        if self.n_resize != len(self.resize_sites):
            raise RuntimeError(
                f"{head}: {parent}.forward made {self.n_resize} F.interpolate calls, the equalizer placement "
                f"expects {len(self.resize_sites)} (sites {self.resize_sites}); the installed mmseg head differs "
                f"from mmseg 1.2.2, which kim_plugins supports")
        if self.n_fusion != len(self.fusion_sites):
            raise RuntimeError(
                f"{head}: {parent}.forward fused {self.n_fusion} non-upsampled operands with upsampled ones, "
                f"equalize_all_branches expects {len(self.fusion_sites)} ({self.fusion_sites}); the installed "
                f"mmseg head differs from mmseg 1.2.2, which kim_plugins supports")


def _conv_module_output_scalable(cm: nn.Module) -> bool:
    """Whether ``c * ConvModule(x)`` (c > 0) can be folded into the module's own weights."""
    if not isinstance(cm, ConvModule) or getattr(cm, "with_spectral_norm", False):
        return False
    if tuple(cm.order) != ("conv", "norm", "act"):
        return False
    if cm.with_activation and not isinstance(cm.activate, (nn.ReLU, nn.LeakyReLU, nn.Identity)):
        return False  # only positively homogeneous activations commute with c > 0
    if cm.with_norm:
        norm = cm.norm
        return getattr(norm, "weight", None) is not None and getattr(norm, "bias", None) is not None
    return isinstance(cm.conv, nn.Conv2d)


@torch.no_grad()
def _scale_conv_module_output(cm: ConvModule, c: float) -> None:
    """Scale a ConvModule's (eval-mode) output by ``c > 0`` through its last affine map."""
    if cm.with_norm:
        cm.norm.weight.mul_(c)
        cm.norm.bias.mul_(c)
    else:
        cm.conv.weight.mul_(c)
        if cm.conv.bias is not None:
            cm.conv.bias.mul_(c)


def _foldable_conv(conv: Any) -> bool:
    return type(conv) is nn.Conv2d or (isinstance(conv, nn.Conv2d) and type(conv).__module__.startswith(
        "mmcv.cnn.bricks.wrappers"))


class ScaleEqualizedHeadMixin:
    """Puts a :class:`~kim_plugins.layers.scale_equalizer.ScaleEqualizer` after every fused bilinear resize.

    From "Scale Equalization for Multi-Level Feature Fusion" (Kim & Kim, TMLR
    2024, arXiv 2402.01149). Put it first in the bases of an mmseg decode
    head; the head declares its sites (see the module docstring). All other
    arguments go to the parent head unchanged.

    Args:
        se_mode: ``'dataset'`` (default; calibrated statistics, frozen --
            add ``ScaleEqualizerCalibrationHook``), ``'batch'`` [decision,
            option; BatchNorm-like], or ``None`` (no equalizers: exactly the
            parent head).
        equalize_all_branches: Equalize every operand of each fusion that a
            bilinear upsampling feeds (default True [decision]: scale
            equilibrium across the fusion); False equalizes the upsampled
            operands only (the literal placement, the alternative reading).
        se_eps: Equalizer eps inside the square root.
        se_momentum: Running-estimate momentum of ``'batch'`` mode.
        allow_uncalibrated: Let uncalibrated ``'dataset'`` equalizers run in
            eval (mean 0, variance 1), for benchmarks and FLOP counts.
        se_sync_batch_stats: ``'batch'`` mode under ``torch.distributed``:
            statistics of the global batch (default True, like SyncBN);
            False keeps them per process.

    Attributes:
        scale_equalizers: ``nn.ModuleDict`` site name -> equalizer (state-dict
            keys ``decode_head.scale_equalizers.<site>.mean`` etc.).
    """

    _owns_scale_equalizers = True
    #: Apply calibrated ('dataset') equalizers to the resize's input instead of its output: the same
    #: result (resizing commutes with a constant affine map), on a 4-64x smaller tensor. False only to
    #: observe the equalizers' upsampled inputs/outputs with hooks.
    se_apply_before_resize = True

    def __init__(self, *args: Any, se_mode: Optional[str] = "dataset", equalize_all_branches: bool = True,
                 se_eps: float = 1e-5, se_momentum: float = 0.1, allow_uncalibrated: bool = False,
                 se_sync_batch_stats: bool = True, **kwargs: Any) -> None:
        name = type(self).__name__
        if se_mode is not None and se_mode not in SE_MODES:
            raise ValueError(f"{name}: se_mode={se_mode!r} is not one of {SE_MODES + (None,)}: 'dataset' "
                             f"(calibrated statistics, the paper's default; add ScaleEqualizerCalibrationHook), "
                             f"'batch' (BatchNorm-like) or None (no equalizers)")
        if not isinstance(equalize_all_branches, bool):
            raise TypeError(f"{name}: equalize_all_branches must be a bool, got {equalize_all_branches!r}")
        if not isinstance(se_sync_batch_stats, bool):
            raise TypeError(f"{name}: se_sync_batch_stats must be a bool, got {se_sync_batch_stats!r}")
        super().__init__(*args, **kwargs)
        self.se_mode = se_mode
        self.equalize_all_branches = equalize_all_branches
        self.allow_uncalibrated = allow_uncalibrated
        resize_sites = self._se_resize_sites()
        upsampled = any(s is not None for s in resize_sites)
        fusion_sites = self._se_fusion_sites() if equalize_all_branches and upsampled else []
        if se_mode is not None and not upsampled:
            _log_once(f"{name}: no bilinear upsampling feeds a fusion ({self._se_no_upsampling_reason()}), so the "
                      f"head has no scale equalizer and computes exactly {self._se_parent_name()}")
        self.scale_equalizers = nn.ModuleDict()
        if se_mode is None:
            self._se_resize_plan: List[Optional[str]] = [None] * len(resize_sites)
            self._se_fusion_plan: List[str] = []
        else:
            self._se_resize_plan = list(resize_sites)
            self._se_fusion_plan = list(fusion_sites)
            for site in [s for s in resize_sites if s is not None] + list(fusion_sites):
                self.scale_equalizers[site] = ScaleEqualizer(se_mode, eps=se_eps, momentum=se_momentum,
                                                             allow_uncalibrated=allow_uncalibrated,
                                                             sync_batch_stats=se_sync_batch_stats)
        self._se_folded = False

    # ---- declared by each head --------------------------------------------------------------------------
    def _se_resize_sites(self) -> List[Optional[str]]:
        """Site name (or None: not equalized) of each ``F.interpolate`` call of the parent's forward, in order."""
        raise NotImplementedError

    def _se_fusion_sites(self) -> List[str]:
        """Site names of the non-upsampled fusion operands, in the order the parent fuses them."""
        raise NotImplementedError

    def _se_fold_plan(self) -> FoldPlan:
        """The convolutions that read each site's equalized channels."""
        raise NotImplementedError

    def _se_fold_special(self) -> List[str]:
        """Sites folded by a head-specific rule (UPer's top-down path); default none."""
        return []

    def _se_no_upsampling_reason(self) -> str:
        """Why this head's configuration upsamples nothing into a fusion (for the log)."""
        return "this configuration fuses no upsampled operand"

    def _se_parent_name(self) -> str:
        for cls in type(self).__mro__[1:]:
            if cls.__module__.startswith("mmseg."):
                return cls.__name__
        return "parent"

    # ---- forward ----------------------------------------------------------------------------------------
    def _se_active(self) -> bool:
        return any(isinstance(m, ScaleEqualizer) for m in self.scale_equalizers.values())

    def forward(self, inputs: Any) -> torch.Tensor:
        """The parent's forward with the equalizers applied at the declared sites."""
        if self._se_folded and self.training:
            raise RuntimeError(f"{type(self).__name__}: its scale equalizers were folded for inference "
                               f"(fold_scale_equalizers); rebuild the head and load a checkpoint to train")
        if not self._se_active():
            return super().forward(inputs)
        mode = _FusionSiteMode(self)
        with mode:
            out = super().forward(inputs)
        mode.check()
        return out

    # ---- folding ----------------------------------------------------------------------------------------
    def _se_affine(self, site: str) -> Optional[Tuple[float, float]]:
        se = self.scale_equalizers[site] if site in self.scale_equalizers else None
        if not isinstance(se, ScaleEqualizer):
            return None
        scale, shift = se.scale_shift()
        return float(scale), float(shift)

    def _se_replace_conv(self, owner: nn.Module, attr: str, scale: torch.Tensor, shift: torch.Tensor) -> None:
        conv = getattr(owner, attr)
        setattr(owner, attr, fold_input_affine(conv, scale, shift))

    @torch.no_grad()
    def fold_scale_equalizers(self) -> List[str]:
        """Fold the eval-time equalizers into the convolutions that read them (inference only).

        Each equalizer is the constant map ``x * s + t``; it is folded into its
        consumer conv's input channels with
        :func:`~kim_plugins.layers.scale_equalizer.fold_input_affine` (exact,
        zero padding included). UPer's top-down equalizers are folded through
        the lateral path (see :class:`SEUPerHead`). Folded equalizers become
        ``nn.Identity``; with all folded the forward is the parent's.
        Afterwards the head can no longer train.

        Returns:
            The names of the folded sites.

        Raises:
            RuntimeError: an uncalibrated ``'dataset'`` equalizer (not built
                with ``allow_uncalibrated=True``).
        """
        self.eval()
        ses = {k: m for k, m in self.scale_equalizers.items() if isinstance(m, ScaleEqualizer)}
        if not ses:  # nothing to fold (e.g. SEFCNHead without resize_concat): the head stays trainable
            return []
        bad = [k for k, m in ses.items() if m.mode == "dataset" and not bool(m.calibrated)
               and not m.allow_uncalibrated]
        if bad:
            raise RuntimeError(f"{type(self).__name__}: cannot fold uncalibrated equalizers {bad}: calibrate first "
                               f"(ScaleEqualizerCalibrationHook / calibrate_scale_equalizers) or load a checkpoint")
        folded = set(self._se_fold_special())
        plan = [(owner, attr, [s for s in segs if s[0] in ses and s[0] not in folded])
                for owner, attr, segs in self._se_fold_plan()]
        ok = {s for _, _, segs in plan for s, _, _ in segs}
        changed = True
        while changed:  # a site folds only if every conv reading it can take it
            changed = False
            for owner, attr, segs in plan:
                sites = {s for s, _, _ in segs if s in ok}
                if sites and not _foldable_conv(getattr(owner, attr)):
                    ok -= sites
                    changed = True
        for owner, attr, segs in plan:
            segs = [s for s in segs if s[0] in ok]
            if not segs:
                continue
            conv = getattr(owner, attr)
            scale = torch.ones(conv.in_channels, dtype=torch.float64)
            shift = torch.zeros(conv.in_channels, dtype=torch.float64)
            for site, start, stop in segs:
                scale[start:stop], shift[start:stop] = self._se_affine(site)
            self._se_replace_conv(owner, attr, scale, shift)
        folded |= ok
        for site in folded:
            self.scale_equalizers[site] = nn.Identity()
        left = sorted(set(ses) - folded)
        if left:
            warnings.warn(f"{type(self).__name__}: equalizers {left} read by a convolution that cannot be folded "
                          f"(not a plain nn.Conv2d) still run at inference", stacklevel=2)
        self._se_folded = True
        return sorted(folded)


_LOGGED: set = set()


def _log_once(message: str) -> None:
    """Log ``message`` to the current mmengine logger, once per process."""
    if message not in _LOGGED:
        _LOGGED.add(message)
        print_log(message, logger="current", level=logging.INFO)


def _segments(sites: Sequence[str], widths: Sequence[int], start: int = 0) -> List[Tuple[str, int, int]]:
    """Channel ranges of consecutive concatenated operands."""
    out, pos = [], start
    for site, w in zip(sites, widths):
        out.append((site, pos, pos + w))
        pos += w
    return out


# ---------------------------------------------------------------------------------------------------------
# PSP / UPer
# ---------------------------------------------------------------------------------------------------------

class _PPMSitesMixin:
    """The PPM part shared by PSP and UPer: ``cat([x] + [resize(ppm_i(x))]) -> bottleneck``."""

    def _ppm_resize_sites(self) -> List[str]:
        return [f"ppm_{i}" for i in range(len(self.psp_modules))]

    def _ppm_fold_plan(self, in_channels: int) -> FoldPlan:
        n = len(self.psp_modules)
        segs = _segments(["ppm_input"] + self._ppm_resize_sites(), [in_channels] + [self.channels] * n)
        return [(self.bottleneck, "conv", segs)]


@MODELS.register_module()
class SEPSPHead(ScaleEqualizedHeadMixin, _PPMSitesMixin, PSPHead):
    """PSPNet head with scale equalizers after each pyramid branch's upsampling.

    Scale Equalization for Multi-Level Feature Fusion (arXiv 2402.01149) on
    Pyramid Scene Parsing Network (arXiv 1612.01105). Same arguments as
    :class:`mmseg.models.decode_heads.PSPHead` plus the SE options of
    :class:`ScaleEqualizedHeadMixin`. Sites: ``ppm_i``; with
    ``equalize_all_branches``: ``ppm_input``.
    """

    def _se_resize_sites(self) -> List[Optional[str]]:
        return self._ppm_resize_sites()

    def _se_fusion_sites(self) -> List[str]:
        return ["ppm_input"]

    def _se_fold_plan(self) -> FoldPlan:
        return self._ppm_fold_plan(self.in_channels)


@MODELS.register_module()
class SEUPerHead(ScaleEqualizedHeadMixin, _PPMSitesMixin, UPerHead):
    """UPerNet head with scale equalizers after every upsampling that feeds a fusion.

    Scale Equalization for Multi-Level Feature Fusion (arXiv 2402.01149) on
    Unified Perceptual Parsing (arXiv 1807.10221). Same arguments as
    :class:`mmseg.models.decode_heads.UPerHead` plus the SE options of
    :class:`ScaleEqualizedHeadMixin`. Sites, in call order: ``ppm_i``;
    ``top_down_i`` (i = L-1 .. 1: ``resize(laterals[i])`` before its add to
    ``laterals[i-1]``); ``fpn_i`` (i = L-1 .. 1). With
    ``equalize_all_branches``: ``ppm_input``, ``lateral_i`` (i = L-2 .. 0),
    ``fpn_0``.

    Folding: the PPM and FPN equalizers fold into ``bottleneck`` and
    ``fpn_bottleneck``. A top-down equalizer's output is added to a lateral,
    not read by a conv; since bilinear resizing and the add are linear and
    preserve constants, level i-1 of the top-down path equals
    ``A * M + B`` where ``M`` is what the folded head computes when the
    lateral conv's output is scaled by ``alpha / A`` (through its norm's
    affine, exact for ReLU/LeakyReLU, A > 0) and ``(A, B)`` is folded into
    ``fpn_convs[i-1]``. Heads whose lateral convs cannot be scaled keep those
    equalizers (with a warning).
    """

    def _se_levels(self) -> int:
        return len(self.in_channels)

    def _se_resize_sites(self) -> List[Optional[str]]:
        top = self._se_levels() - 1
        return (self._ppm_resize_sites() + [f"top_down_{i}" for i in range(top, 0, -1)]
                + [f"fpn_{i}" for i in range(top, 0, -1)])

    def _se_fusion_sites(self) -> List[str]:
        top = self._se_levels() - 1
        return ["ppm_input"] + [f"lateral_{i - 1}" for i in range(top, 0, -1)] + ["fpn_0"]

    def _se_fold_plan(self) -> FoldPlan:
        n = self._se_levels()
        fpn = _segments([f"fpn_{i}" for i in range(n)], [self.channels] * n)
        return self._ppm_fold_plan(self.in_channels[-1]) + [(self.fpn_bottleneck, "conv", fpn)]

    def _se_fold_special(self) -> List[str]:
        top = self._se_levels() - 1
        sites = [f"top_down_{i}" for i in range(top, 0, -1)] + [f"lateral_{i}" for i in range(top)]
        sites = [s for s in sites if self._se_affine(s) is not None]
        if not sites:
            return []
        blockers = [f"lateral_convs.{i}" for i in range(top) if not _conv_module_output_scalable(self.lateral_convs[i])]
        blockers += [f"fpn_convs.{i}" for i in range(top) if not _foldable_conv(self.fpn_convs[i].conv)]
        if blockers:
            warnings.warn(f"{type(self).__name__}: top-down equalizers stay unfolded: {blockers} cannot absorb a "
                          f"scale (needs conv -> affine norm -> ReLU/LeakyReLU and a plain nn.Conv2d)", stacklevel=3)
            return []
        big_a, big_b = 1.0, 0.0  # laterals[top] (the PPM output) is not equalized
        for i in range(top, 0, -1):
            a, b = self._se_affine(f"top_down_{i}") or (1.0, 0.0)
            alpha, beta = self._se_affine(f"lateral_{i - 1}") or (1.0, 0.0)
            big_a, big_b = a * big_a, a * big_b + b + beta
            _scale_conv_module_output(self.lateral_convs[i - 1], alpha / big_a)
            conv = self.fpn_convs[i - 1].conv
            self._se_replace_conv(self.fpn_convs[i - 1], "conv",
                                  torch.full((conv.in_channels,), big_a, dtype=torch.float64),
                                  torch.full((conv.in_channels,), big_b, dtype=torch.float64))
        return sites


# ---------------------------------------------------------------------------------------------------------
# ASPP / DeepLabV3+
# ---------------------------------------------------------------------------------------------------------

class _ASPPSitesMixin:
    """``cat([resize(image_pool(x))] + aspp_i(x)) -> bottleneck``, shared by both ASPP heads."""

    def _aspp_fold_plan(self) -> FoldPlan:
        n = len(self.aspp_modules)
        segs = _segments(["image_pool"] + [f"aspp_{i}" for i in range(n)], [self.channels] * (n + 1))
        return [(self.bottleneck, "conv", segs)]


@MODELS.register_module()
class SEASPPHead(ScaleEqualizedHeadMixin, ResolutionAwareDilationsMixin, _ASPPSitesMixin, ASPPHead):
    """DeepLabV3 ASPP head with a scale equalizer after the image-pool upsampling.

    Scale Equalization for Multi-Level Feature Fusion (arXiv 2402.01149) on
    DeepLabV3 (arXiv 1706.05587). Same arguments as
    :class:`mmseg.models.decode_heads.ASPPHead` plus the SE options of
    :class:`ScaleEqualizedHeadMixin`; ``dilations='auto'`` (with
    ``crop_size``, ``output_stride``) is resolved by
    :class:`kim_plugins.mmseg.ra_aspp_heads.ResolutionAwareDilationsMixin`
    (arXiv 2307.14179). Sites: ``image_pool``; with
    ``equalize_all_branches``: ``aspp_i``.
    """

    def _se_resize_sites(self) -> List[Optional[str]]:
        return ["image_pool"]

    def _se_fusion_sites(self) -> List[str]:
        return [f"aspp_{i}" for i in range(len(self.aspp_modules))]

    def _se_fold_plan(self) -> FoldPlan:
        return self._aspp_fold_plan()


@MODELS.register_module()
class SEDepthwiseSeparableASPPHead(ScaleEqualizedHeadMixin, ResolutionAwareDilationsMixin, _ASPPSitesMixin,
                                   DepthwiseSeparableASPPHead):
    """DeepLabV3+ head with scale equalizers after the image-pool and the decoder upsampling.

    Scale Equalization for Multi-Level Feature Fusion (arXiv 2402.01149) on
    DeepLabV3+ (arXiv 1802.02611). Same arguments as
    :class:`mmseg.models.decode_heads.DepthwiseSeparableASPPHead` plus the SE
    options of :class:`ScaleEqualizedHeadMixin` and ``dilations='auto'`` of
    :class:`kim_plugins.mmseg.ra_aspp_heads.ResolutionAwareDilationsMixin`.
    Sites: ``image_pool``; ``aspp_to_c1`` (the ASPP output resized to the c1
    size, only with ``c1_in_channels > 0``); with ``equalize_all_branches``:
    ``aspp_i`` and ``c1``. The decoder equalizers fold into the first
    depthwise conv of ``sep_bottleneck`` (per channel, border corrected).
    """

    def _se_resize_sites(self) -> List[Optional[str]]:
        return ["image_pool"] + (["aspp_to_c1"] if self.c1_bottleneck is not None else [])

    def _se_fusion_sites(self) -> List[str]:
        return [f"aspp_{i}" for i in range(len(self.aspp_modules))] + (
            ["c1"] if self.c1_bottleneck is not None else [])

    def _se_fold_plan(self) -> FoldPlan:
        plan = self._aspp_fold_plan()
        if self.c1_bottleneck is not None:
            segs = _segments(["aspp_to_c1", "c1"], [self.channels, self.c1_bottleneck.conv.out_channels])
            plan.append((self.sep_bottleneck[0].depthwise_conv, "conv", segs))
        return plan


# ---------------------------------------------------------------------------------------------------------
# FCN (HRNet, resize_concat)
# ---------------------------------------------------------------------------------------------------------

@MODELS.register_module()
class SEFCNHead(ScaleEqualizedHeadMixin, FCNHead):
    """FCN head with scale equalizers on the fusion of ``input_transform='resize_concat'``.

    Scale Equalization for Multi-Level Feature Fusion (arXiv 2402.01149) on
    FCN (arXiv 1411.4038) as used with HRNet. Same arguments as
    :class:`mmseg.models.decode_heads.FCNHead` plus the SE options of
    :class:`ScaleEqualizedHeadMixin`. With ``input_transform='resize_concat'``
    ``BaseDecodeHead._transform_inputs`` resizes every selected level to the
    first one's size, inputs[0] included (a same-size no-op), and concatenates
    them: the upsampled ones, inputs[1:], are equalized (``input_i``), and by
    default (``equalize_all_branches``) also ``input_0``. Any other
    ``input_transform`` (FCNHead's default ``None``) upsamples nothing: the
    head then has no equalizer and computes exactly ``FCNHead``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        channels = kwargs.get("in_channels")
        super().__init__(*args, **kwargs)
        self.se_level_channels = tuple(channels) if isinstance(channels, (list, tuple)) else ()

    def _se_no_upsampling_reason(self) -> str:
        return f"input_transform={self.input_transform!r}; only 'resize_concat' upsamples"

    def _se_resize_sites(self) -> List[Optional[str]]:
        if self.input_transform != "resize_concat":
            return []
        return [None] + [f"input_{i}" for i in range(1, len(self.in_index))]

    def _se_fusion_sites(self) -> List[str]:
        return ["input_0"]

    def _se_fold_plan(self) -> FoldPlan:
        sites = [f"input_{i}" for i in range(len(self.in_index))]
        segs = _segments(sites, self.se_level_channels)
        plan: FoldPlan = []
        if self.num_convs > 0:
            plan.append((self.convs[0], "conv", segs))
        if self.concat_input:  # conv_cat reads cat([x, convs(x)]); with num_convs=0 that is cat([x, x])
            second = _segments(sites, self.se_level_channels, self.in_channels) if self.num_convs == 0 else []
            plan.append((self.conv_cat, "conv", segs + second))
        elif self.num_convs == 0:
            plan.append((self, "conv_seg", segs))  # x -> dropout (identity in eval) -> conv_seg
        return plan
