"""NaN-safe monocular depth training for mmseg: a SILog loss, a log-space head, a non-finite-loss hook.

"Analysis of NaN Divergence in Training Monocular Depth Estimation Model",
Bum Jun Kim, Hyeonah Jang, Sang Woo Kim. The math is
:mod:`kim_plugins.layers.nan_safe_depth`; this module adapts it to mmseg 1.2.2's
depth estimation (``DepthEstimator``, ``VPDDepthHead``, ``SiLogLoss``):

- ``StableSiLogLoss`` (``MODELS``): drop-in for ``SiLogLoss`` (same arguments
  plus ``sqrt_mode``, ``sqrt_eps``, ``variance_focus``, ``min_valid_pixels``,
  ``loss_name``).
- ``StableVPDDepthHead`` (``MODELS``): ``VPDDepthHead`` with ``log_space=True``
  predicting ``log(max_depth) + logsigmoid(x)`` in training instead of
  ``log(clamp(sigmoid(x) * max_depth))`` inside the loss.
- ``NonFiniteLossHook`` (``HOOKS``): stops a run at the first non-finite loss
  and reports the iteration, the loss terms and the valid-pixel counts.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.hooks import Hook
from mmseg.models.decode_heads import VPDDepthHead
from mmseg.models.utils import resize
from mmseg.registry import HOOKS, MODELS

from kim_plugins.layers.nan_safe_depth import StableSiLogLoss as _StableSiLogLoss
from kim_plugins.layers.nan_safe_depth import log_depth_from_logits

__all__ = ["StableSiLogLoss", "StableVPDDepthHead", "NonFiniteLossHook"]


@MODELS.register_module()
class StableSiLogLoss(_StableSiLogLoss):
    """NaN-safe SILog loss, a drop-in for mmseg's ``SiLogLoss``.

    Args:
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.
        loss_weight: Multiplier of the loss.
        eps: Validity threshold (``target > eps``) and log clamp, as ``SiLogLoss``.
        loss_name: Name of the loss item (``loss_`` prefix = optimised).
        sqrt_mode: ``'eps'`` (default, ``sqrt(D + sqrt_eps)``), ``'none'`` (``D``)
            or ``'plain'`` (``SiLogLoss``'s ``sqrt(D)``).
        sqrt_eps: Offset inside the guarded sqrt.
        variance_focus: ``lambda`` of ``E[d^2] - lambda E[d]^2`` (``SiLogLoss``: 0.5).
        min_valid_pixels: Samples with fewer valid pixels contribute 0.
    """

    def __init__(self, reduction: str = "mean", loss_weight: float = 1.0, eps: float = 1e-6,
                 loss_name: str = "loss_silog", sqrt_mode: str = "eps", sqrt_eps: float = 1e-6,
                 variance_focus: float = 0.5, min_valid_pixels: int = 2) -> None:
        super().__init__(reduction=reduction, loss_weight=loss_weight, eps=eps, sqrt_mode=sqrt_mode,
                         sqrt_eps=sqrt_eps, variance_focus=variance_focus, min_valid_pixels=min_valid_pixels)
        self._loss_name = loss_name

    @property
    def loss_name(self) -> str:
        """Name of the loss item in the runner's log."""
        return self._loss_name


@MODELS.register_module()
class StableVPDDepthHead(VPDDepthHead):
    """``VPDDepthHead`` whose training output is the log depth ``log(max_depth) + logsigmoid(x)``.

    mmseg's head predicts ``sigmoid(x) * max_depth`` and ``SiLogLoss`` takes
    ``log(clamp(., eps))`` of it: once ``sigmoid(x) * max_depth < eps`` a
    pixel's gradient is exactly 0 and it stays stuck. With ``log_space=True``
    :meth:`forward` returns the log depth (finite, gradient ``1 - sigmoid(x)``)
    and the losses receive it with ``pred_is_log=True``; :meth:`predict_by_feat`
    returns ``exp`` of it, i.e. the same depth as ``VPDDepthHead`` with the same
    weights. Bilinear resizing to the label size in training happens in log
    space [decision].

    Args:
        log_space: Log-space output (default) or exactly ``VPDDepthHead``.
        **kwargs: ``VPDDepthHead`` arguments.

    Raises:
        ValueError: ``log_space=True`` with a loss that cannot take log depth
            (mmseg's ``SiLogLoss``): use ``StableSiLogLoss``.
    """

    def __init__(self, log_space: bool = True, loss_decode: dict = dict(type="StableSiLogLoss"), **kwargs) -> None:
        super().__init__(loss_decode=loss_decode, **kwargs)
        self.log_space = bool(log_space)
        if self.log_space:
            losses = self.loss_decode if isinstance(self.loss_decode, nn.ModuleList) else [self.loss_decode]
            bad = [type(loss).__name__ for loss in losses if not getattr(loss, "accepts_log_depth", False)]
            if bad:
                raise ValueError(f"StableVPDDepthHead(log_space=True) passes log depth to its losses, but {bad} "
                                 f"take depth; use loss_decode=dict(type='StableSiLogLoss') or log_space=False")

    def _logits(self, x: Sequence[torch.Tensor]) -> torch.Tensor:
        """``VPDDepthHead.forward`` up to the sigmoid (same layers, same order)."""
        x = [x[0], x[1], torch.cat([x[2], F.interpolate(x[3], scale_factor=2)], dim=1)]
        x = torch.cat([self.conv1(x[0]), self.conv2(x[1]), x[2]], dim=1)
        x = self.conv_aggregation(x)
        x = x[:, :, :x.size(2) - self.fmap_border[0], :x.size(3) - self.fmap_border[1]].contiguous()
        return self.depth_pred_layer(self.decoder(x))

    def forward(self, x: Sequence[torch.Tensor]) -> torch.Tensor:
        """Log depth with ``log_space=True``, else depth (as ``VPDDepthHead``)."""
        out = self._logits(x)
        if self.log_space:
            return log_depth_from_logits(out, self.max_depth)
        return torch.sigmoid(out) * self.max_depth

    def predict_by_feat(self, seg_logits: torch.Tensor, batch_img_metas: List[dict]) -> torch.Tensor:
        """Depth at the input size: ``exp`` of the log depth before the resize."""
        depth = torch.exp(seg_logits) if self.log_space else seg_logits
        return super().predict_by_feat(depth, batch_img_metas)

    def loss_by_feat(self, pred_depth_map: torch.Tensor, batch_data_samples) -> Dict[str, torch.Tensor]:
        if not self.log_space:
            return super().loss_by_feat(pred_depth_map, batch_data_samples)
        gt = self._stack_batch_gt(batch_data_samples)
        pred = resize(input=pred_depth_map, size=gt.shape[2:], mode="bilinear", align_corners=self.align_corners)
        losses: Dict[str, torch.Tensor] = {}
        for loss_decode in (self.loss_decode if isinstance(self.loss_decode, nn.ModuleList) else [self.loss_decode]):
            value = loss_decode(pred, gt, pred_is_log=True)
            name = loss_decode.loss_name
            losses[name] = losses[name] + value if name in losses else value
        return losses


@HOOKS.register_module()
class NonFiniteLossHook(Hook):
    """Stop training at the first non-finite loss, saying where and why.

    After every training iteration the logged loss terms (``outputs`` of
    ``train_step``) are checked; at the first nan/inf the run stops with a
    ``RuntimeError`` naming the iteration, every non-finite term, and the
    valid depth-pixel counts of the batch (ground truth ``> 0`` and finite,
    per sample) and of each NaN-safe loss's last call. The counts are
    what usually explains a depth NaN (a crop with 0 or 1 valid pixel).

    Args:
        keys: Only check log entries containing one of these substrings
            (default: every entry whose name contains ``'loss'``).
    """

    priority = "VERY_HIGH"

    def __init__(self, keys: Sequence[str] = ("loss",)) -> None:
        self.keys = tuple(keys)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs: Optional[dict] = None) -> None:
        if not outputs:
            return
        bad = {k: _as_float(v) for k, v in outputs.items()
               if any(s in k for s in self.keys) and not math.isfinite(_as_float(v))}
        if not bad:
            return
        lines = [f"non-finite loss at iteration {runner.iter + 1} (batch {batch_idx}): "
                 + ", ".join(f"{k}={v}" for k, v in bad.items())]
        counts = _gt_valid_counts(data_batch)
        if counts is not None:
            lines.append(f"valid ground-truth depth pixels per sample (gt > 0, finite): {counts}")
        model = getattr(runner.model, "module", runner.model)
        for name, module in model.named_modules():
            if isinstance(module, _StableSiLogLoss) and module.last_num_valid is not None:
                lines.append(f"{name} ({module.loss_name}): valid pixels per sample {module.last_num_valid.tolist()}"
                             f", skipped so far {module.skipped_samples}")
        message = "; ".join(lines)
        runner.logger.error(message)
        raise RuntimeError(message + ". Fix: StableSiLogLoss (sqrt_mode='eps'), StableVPDDepthHead(log_space=True); "
                                     "see docs/nan_safe_depth.md")


def _as_float(value) -> float:
    return float(value.detach().float().mean()) if isinstance(value, torch.Tensor) else float(value)


def _gt_valid_counts(data_batch) -> Optional[List[int]]:
    samples = data_batch.get("data_samples") if isinstance(data_batch, dict) else None
    if not samples or not hasattr(samples[0], "gt_depth_map"):
        return None
    return [int(((s.gt_depth_map.data > 0) & torch.isfinite(s.gt_depth_map.data)).sum()) for s in samples]
