"""Where to put dropout in a residual network with BatchNorm, and what the head's placement does to the logits.

Paper: Bum Jun Kim, Hyeyeon Choi, Hyeonah Jang et al., "How to Use Dropout
Correctly on Residual Networks with Batch Normalization".

Guidelines [paper]:

- *Residual branch*: one dropout after the last BatchNorm (and its
  activation) and before the last weight layer of the branch. In a
  pre-activation bottleneck ``norm1 -> conv1 -> norm2 -> conv2 -> norm3 ->
  conv3`` that is between ``norm3`` (BN + ReLU) and ``conv3``; in a
  pre-activation basic block between ``norm2`` and ``conv2``.
- *Head*: dropout on the feature map *before* global average pooling, not on
  the pooled vector after it (the common practice, timm's ``drop_rate``).
  [code] The authors' head experiments use ``F.dropout(p=0.2)`` on the feature
  map before pooling.

Inverted dropout commutes with ReLU (a mask is >= 0: ``relu(m * x) = m *
relu(x)``), so a dropout placed between a BN and its ReLU is the same
function as one after the ReLU.

Why before pooling: for one sample with feature map ``x[c, s]`` (``S = H W``
positions), logit weights ``w[k, c]`` and drop probability ``p``, the variance
of logit ``k`` over dropout masks is (:func:`head_dropout_logit_variance`)::

    after pooling:   p / (1 - p) * sum_c w[k, c]^2 * (mean_s x[c, s])^2
    before pooling:  p / (1 - p) * sum_c w[k, c]^2 * sum_s x[c, s]^2 / S^2

For a nearly constant map the second is about ``1 / S`` of the first: the
pooled average of ``S`` independent masks is far less noisy than one mask per
channel.

Nothing here imports timm or mmseg.
"""
from __future__ import annotations

import torch

__all__ = ["HEAD_PLACEMENTS", "check_drop_rate", "head_dropout_logit_variance"]

HEAD_PLACEMENTS = ("before_pool", "after_pool")


def check_drop_rate(p: float, name: str = "drop rate") -> float:
    """Return ``p`` as a float after checking ``0 <= p < 1``.

    Raises:
        ValueError: ``p`` outside [0, 1).
    """
    if not 0.0 <= float(p) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {p}")
    return float(p)


def head_dropout_logit_variance(features: torch.Tensor, weight: torch.Tensor, p: float,
                                placement: str = "before_pool") -> torch.Tensor:
    """Closed-form variance over dropout masks of ``fc(avgpool(.))`` logits.

    Args:
        features: Feature maps entering the head, (N, C, H, W).
        weight: Classifier weight, (K, C) (a 1x1 conv weight is flattened).
        p: Drop probability in [0, 1).
        placement: ``'before_pool'`` (element-wise dropout on the map) or
            ``'after_pool'`` (dropout on the pooled (N, C) vector).

    Returns:
        (N, K) variances of the logits over masks, float64.

    Raises:
        ValueError: Unknown ``placement`` or bad ``p``.
    """
    p = check_drop_rate(p)
    if placement not in HEAD_PLACEMENTS:
        raise ValueError(f"placement must be one of {HEAD_PLACEMENTS}, got {placement!r}")
    x = features.double().flatten(2)                     # (N, C, S)
    w2 = weight.double().reshape(weight.shape[0], -1).pow(2)   # (K, C)
    if placement == "after_pool":
        per_channel = x.mean(dim=2).pow(2)               # (N, C)
    else:
        per_channel = x.pow(2).sum(dim=2) / x.shape[2] ** 2
    return p / (1.0 - p) * per_channel @ w2.t()
