"""Temperature-free InfoNCE as an mmseg loss (``MODELS``: ``TemperatureFreeInfoNCELoss``).

The math is :mod:`kim_plugins.layers.temperature_free_infonce`; this adds
mmseg's loss conventions (``loss_weight``, ``loss_name`` starting with
``loss_`` so the runner back-propagates it)::

    loss_cfg = dict(type='TemperatureFreeInfoNCELoss', loss_weight=1.0)
    loss = MODELS.build(loss_cfg)(z1, z2)      # z1, z2: (N, D) embeddings of two views
"""
from __future__ import annotations

from typing import Optional

import torch
from mmseg.registry import MODELS

from kim_plugins.layers.temperature_free_infonce import DEFAULT_EPS, TemperatureFreeInfoNCE

__all__ = ["TemperatureFreeInfoNCELoss"]


@MODELS.register_module()
class TemperatureFreeInfoNCELoss(TemperatureFreeInfoNCE):
    """Temperature-free InfoNCE loss (logit ``2 artanh(s)``), called as ``loss(z1, z2)``.

    Args:
        loss_weight: Multiplier of the loss.
        eps: Clamp margin ``s -> ±(1 - eps)`` before ``artanh`` [decision, 1e-6].
        symmetric: SimCLR's 2N-anchor form (default) or the N-anchor cross-view form.
        temperature: None (the paper's method) or ``tau`` for the usual InfoNCE baseline.
        loss_name: Name of the loss item; must start with ``loss_`` to be optimised.
    """

    def __init__(self, loss_weight: float = 1.0, eps: float = DEFAULT_EPS, symmetric: bool = True,
                 temperature: Optional[float] = None, loss_name: str = "loss_infonce") -> None:
        super().__init__(eps=eps, symmetric=symmetric, temperature=temperature)
        self.loss_weight = float(loss_weight)
        self._loss_name = loss_name

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return self.loss_weight * super().forward(z1, z2)

    @property
    def loss_name(self) -> str:
        """Name of the loss item in the runner's log (``loss_`` prefix = optimised)."""
        return self._loss_name
