"""L2 on BatchNorm gammas by category as an mmengine optimizer-wrapper constructor.

"Guidelines for the Regularization of Gammas in Batch Normalization for Deep
Residual Networks" (Kim, Choi, Jang et al., ACM TIST 2024). The categories and
default multipliers are in :mod:`kim_plugins.layers.bn_gamma_decay`; this
constructor applies them on top of mmengine's ``DefaultOptimWrapperConstructor``::

    optim_wrapper = dict(
        type='OptimWrapper',
        optimizer=dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=5e-4),
        constructor='BNGammaDecayOptimWrapperConstructor',
        paramwise_cfg=dict(gamma_decay_mult=dict(branch_last=1.0, branch_inner=1.0,
                                                 shortcut=0.0, outside=0.0)))

Every other ``paramwise_cfg`` key (``custom_keys``, ``norm_decay_mult``,
``bias_decay_mult``, ...) works as in mmengine; the gamma rule is applied
last, so for gammas it wins over ``norm_decay_mult`` and ``custom_keys``
(betas keep those rules).
"""
from __future__ import annotations

from typing import List, Optional, Union

import torch.nn as nn
from mmengine.logging import print_log
from mmengine.optim import DefaultOptimWrapperConstructor
from mmseg.registry import OPTIM_WRAPPER_CONSTRUCTORS

from kim_plugins.layers.bn_gamma_decay import GAMMA_CATEGORIES, gamma_weight_decay, resolve_gamma_decay_mult

__all__ = ["BNGammaDecayOptimWrapperConstructor"]


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class BNGammaDecayOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """mmengine's default constructor plus a weight-decay multiplier per BN-gamma category.

    Args:
        optim_wrapper_cfg: As ``DefaultOptimWrapperConstructor``; the optimizer
            needs a ``weight_decay``.
        paramwise_cfg: As ``DefaultOptimWrapperConstructor``, plus
            ``gamma_decay_mult``: ``{category: mult}`` over the defaults
            (branch_last 1, branch_inner 1, shortcut 0, outside 0 [decision]).

    Raises:
        ValueError: No base ``weight_decay``, or a bad ``gamma_decay_mult``.
    """

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg: Optional[dict] = None) -> None:
        paramwise_cfg = dict(paramwise_cfg or {})
        # kept in paramwise_cfg (mmengine ignores the key) so the per-parameter path always runs
        paramwise_cfg["gamma_decay_mult"] = resolve_gamma_decay_mult(paramwise_cfg.get("gamma_decay_mult"))
        super().__init__(optim_wrapper_cfg, paramwise_cfg)
        if self.base_wd is None:
            raise ValueError("BNGammaDecayOptimWrapperConstructor needs optimizer weight_decay (the base that "
                             "gamma_decay_mult scales)")
        self.gamma_decay_mult = paramwise_cfg["gamma_decay_mult"]

    def add_params(self, params: List[dict], module: nn.Module, prefix: str = "",
                   is_dcn_module: Optional[Union[int, float]] = None) -> None:
        start = len(params)
        super().add_params(params, module, prefix, is_dcn_module)
        if prefix:
            return  # a recursive call: the top-level call rewrites the gamma groups once
        gammas = {id(p): (name, category, decay) for name, (p, category, decay) in
                  gamma_weight_decay(module, self.base_wd, self.gamma_decay_mult).items()}
        counts = {c: 0 for c in GAMMA_CATEGORIES}
        for group in params[start:]:
            hit = gammas.get(id(group["params"][0])) if len(group["params"]) == 1 else None
            if hit is not None:
                group["weight_decay"] = hit[2]
                counts[hit[1]] += 1
        print_log(f"BN gamma weight decay: {counts} gammas per category, multipliers {self.gamma_decay_mult} "
                  f"of weight_decay={self.base_wd}", logger="current")
