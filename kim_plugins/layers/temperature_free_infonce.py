"""Temperature-free InfoNCE: the inverse hyperbolic tangent replaces temperature scaling.

Paper: Bum Jun Kim, Sang Woo Kim, "Temperature-Free Loss Function for
Contrastive Learning".

InfoNCE turns the cosine similarity ``s`` of two embeddings into a logit
``s / tau``; the temperature ``tau`` must be tuned. The paper replaces the
temperature scaling by the inverse hyperbolic tangent [paper]. The logit used
here is [inferred, METHODS.md §7]::

    logit(s) = 2 * artanh(s) = log((1 + s) / (1 - s))

which maps (-1, 1) onto the whole real line, so no scale has to be chosen.

Numerics (artanh(±1) = ±inf):

- ``s`` is clamped to ``[-(1 - eps), 1 - eps]`` before ``artanh``
  (``eps = 1e-6`` [decision]: float32 resolves it, the largest logit is
  ``2 artanh(1 - 1e-6) = 14.5``). The clamp passes no gradient at ``|s| = 1``
  instead of an infinite one.
- Self-pairs (an embedding with itself, ``s = 1``) are replaced by 0 *before*
  ``artanh`` and masked to ``-inf`` after: masking after ``artanh`` alone would
  still propagate ``0 * inf = nan`` into the gradient.
- Similarities and logits are computed in float32 (float64 stays float64),
  also under fp16/bf16 autocast.

The loss is the SimCLR form (NT-Xent) [decision, the common InfoNCE set-up of
the paper's benchmarks]: for ``N`` pairs ``(z1[i], z2[i])`` each of the ``2N``
embeddings is an anchor whose positive is its partner and whose negatives are
the other ``2N - 2`` embeddings; the loss is the mean cross-entropy over the
``2N`` anchors. ``symmetric=False`` is the one-directional alternative (anchors
``z1``, candidates ``z2``: an ``N x N`` cross-entropy, as in MoCo/CLIP).

Nothing here imports timm or mmseg.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "artanh_logits",
    "temperature_logits",
    "contrastive_logits",
    "info_nce_loss",
    "temperature_free_info_nce_loss",
    "TemperatureFreeInfoNCE",
]

DEFAULT_EPS = 1e-6


def artanh_logits(similarity: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """The temperature-free logit ``2 artanh(s)`` of cosine similarities.

    Args:
        similarity: Cosine similarities in [-1, 1], any shape.
        eps: ``s`` is clamped to ``[-(1 - eps), 1 - eps]`` first, in (0, 1).

    Returns:
        ``2 * artanh(clamp(s))``, same shape and dtype.

    Raises:
        ValueError: ``eps`` outside (0, 1).
    """
    if not 0.0 < eps < 1.0:
        raise ValueError(f"eps must be in (0, 1), got {eps}; the default is {DEFAULT_EPS}")
    bound = 1.0 - eps
    return 2.0 * torch.atanh(similarity.clamp(-bound, bound))


def temperature_logits(similarity: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE's usual logit ``s / tau``.

    Args:
        similarity: Cosine similarities, any shape.
        temperature: ``tau`` > 0.

    Returns:
        ``s / tau``.

    Raises:
        ValueError: ``temperature`` <= 0.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return similarity / temperature


def _check_views(z1: torch.Tensor, z2: torch.Tensor) -> None:
    if z1.ndim != 2 or z2.ndim != 2:
        raise ValueError(f"InfoNCE takes two (N, D) embedding batches, got shapes {tuple(z1.shape)} and "
                         f"{tuple(z2.shape)}; flatten the embeddings to (N, D) first")
    if z1.shape != z2.shape:
        raise ValueError(f"the two views must have the same shape (row i of each is a positive pair), got "
                         f"{tuple(z1.shape)} and {tuple(z2.shape)}")
    if z1.shape[0] < 2:
        raise ValueError(f"InfoNCE needs a batch of at least 2 pairs (the other pairs are the negatives), got "
                         f"N={z1.shape[0]}; use a larger batch")


def contrastive_logits(z1: torch.Tensor, z2: torch.Tensor,
                       logit_fn: Callable[[torch.Tensor], torch.Tensor],
                       symmetric: bool = True) -> torch.Tensor:
    """Logits of every anchor against every candidate, self-pairs masked to ``-inf``.

    Args:
        z1: First view's embeddings, (N, D); normalised here.
        z2: Second view's embeddings, (N, D); row i is the positive of ``z1[i]``.
        logit_fn: Similarity -> logit (e.g. :func:`artanh_logits`).
        symmetric: SimCLR's 2N x 2N form (True) or the N x N cross-view form.

    Returns:
        (2N, 2N) logits (rows: anchors ``[z1; z2]``) with ``-inf`` on the
        diagonal, or (N, N) cross-view logits; float32 or float64.

    Raises:
        ValueError: Shapes that are not two equal (N, D) with N >= 2.
    """
    _check_views(z1, z2)
    dtype = torch.float64 if torch.float64 in (z1.dtype, z2.dtype) else torch.float32
    with torch.autocast(z1.device.type, enabled=False):
        a = F.normalize(z1.to(dtype), dim=1)
        b = F.normalize(z2.to(dtype), dim=1)
        if not symmetric:
            return logit_fn(a @ b.t())
        z = torch.cat([a, b], dim=0)
        sim = z @ z.t()
        self_pair = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
        logits = logit_fn(sim.masked_fill(self_pair, 0.0))  # masked before the logit: artanh(1) = inf
        return logits.masked_fill(self_pair, float("-inf"))


def _positive_index(n: int, symmetric: bool, device: torch.device) -> torch.Tensor:
    idx = torch.arange(n, device=device)
    return torch.cat([idx + n, idx]) if symmetric else idx


def info_nce_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: Optional[float] = None,
                  eps: float = DEFAULT_EPS, symmetric: bool = True) -> torch.Tensor:
    """InfoNCE of two views, temperature-free (``temperature=None``) or with ``s / tau``.

    Args:
        z1: First view's embeddings, (N, D).
        z2: Second view's embeddings, (N, D); row i is the positive of ``z1[i]``.
        temperature: None for the temperature-free logit ``2 artanh(s)``, else
            InfoNCE's ``s / tau``.
        eps: Clamp margin of the temperature-free logit.
        symmetric: SimCLR's 2N-anchor form (True) or the N-anchor cross-view form.

    Returns:
        Scalar mean cross-entropy over the anchors (float32 or float64).
    """
    if temperature is None:
        def logit_fn(s: torch.Tensor) -> torch.Tensor:
            return artanh_logits(s, eps)
    else:
        def logit_fn(s: torch.Tensor) -> torch.Tensor:
            return temperature_logits(s, temperature)
    logits = contrastive_logits(z1, z2, logit_fn, symmetric=symmetric)
    return F.cross_entropy(logits, _positive_index(z1.shape[0], symmetric, logits.device))


def temperature_free_info_nce_loss(z1: torch.Tensor, z2: torch.Tensor, eps: float = DEFAULT_EPS,
                                   symmetric: bool = True) -> torch.Tensor:
    """Temperature-free InfoNCE (logit ``2 artanh(s)``); see :func:`info_nce_loss`."""
    return info_nce_loss(z1, z2, temperature=None, eps=eps, symmetric=symmetric)


class TemperatureFreeInfoNCE(nn.Module):
    """Temperature-free InfoNCE loss, ``loss(z1, z2)`` on two views' (N, D) embeddings.

    Args:
        eps: Similarities are clamped to ``±(1 - eps)`` before ``artanh``
            [decision, 1e-6].
        symmetric: SimCLR's 2N-anchor NT-Xent form [decision, default] or the
            N-anchor cross-view form.
        temperature: None (default, the paper's method) or a float to get the
            usual InfoNCE with ``s / tau`` from the same module (baselines).
    """

    def __init__(self, eps: float = DEFAULT_EPS, symmetric: bool = True,
                 temperature: Optional[float] = None) -> None:
        super().__init__()
        artanh_logits(torch.zeros(()), eps)  # validates eps
        if temperature is not None:
            temperature_logits(torch.zeros(()), temperature)  # validates temperature
        self.eps = float(eps)
        self.symmetric = bool(symmetric)
        self.temperature = temperature

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return info_nce_loss(z1, z2, temperature=self.temperature, eps=self.eps, symmetric=self.symmetric)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, symmetric={self.symmetric}, temperature={self.temperature}"
