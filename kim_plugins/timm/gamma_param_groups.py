"""Optimizer param groups for timm models with L2 on BatchNorm gammas by category.

"Guidelines for the Regularization of Gammas in Batch Normalization for Deep
Residual Networks" (Kim, Choi, Jang et al., ACM TIST 2024); the categories and
the default multipliers are in :mod:`kim_plugins.layers.bn_gamma_decay`.

timm's own ``param_groups_weight_decay`` (what ``create_optimizer_v2`` uses
with ``weight_decay > 0``) puts every 1-D parameter, gammas included, in a
no-decay group. :func:`bn_gamma_param_groups` keeps that rule for biases,
betas and other 1-D parameters, and gives each gamma category its own group
with ``weight_decay * gamma_decay_mult[category]``::

    groups = bn_gamma_param_groups(model, weight_decay=5e-4)
    optimizer = timm.optim.create_optimizer_v2(groups, 'sgd', lr=0.1, momentum=0.9, weight_decay=5e-4)
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch.nn as nn

from kim_plugins.layers.bn_gamma_decay import GAMMA_CATEGORIES, gamma_weight_decay

__all__ = ["bn_gamma_param_groups"]


def bn_gamma_param_groups(model: nn.Module, weight_decay: float,
                          gamma_decay_mult: Optional[Mapping[str, float]] = None,
                          no_weight_decay_list: Sequence[str] = ()) -> List[Dict[str, Any]]:
    """Param groups: weights with decay, 1-D params without, and one group per gamma category.

    Args:
        model: A timm ResNet / ResNetV2 (or any model
            :func:`~kim_plugins.layers.bn_gamma_decay.classify_bn_gammas` reads).
        weight_decay: Base weight decay.
        gamma_decay_mult: Multiplier per category (defaults [decision]:
            branch_last 1, branch_inner 1, shortcut 0, outside 0).
        no_weight_decay_list: More parameter names without decay (the model's
            ``no_weight_decay()`` is added, as timm does).

    Returns:
        Groups ``{'params', 'weight_decay'}``; gamma groups also carry
        ``'gamma_category'``. Empty groups are left out.
    """
    gammas = {id(p): (category, decay) for p, category, decay in gamma_weight_decay(
        model, weight_decay, gamma_decay_mult).values()}
    skip = set(no_weight_decay_list)
    if hasattr(model, "no_weight_decay"):
        skip |= set(model.no_weight_decay())
    decay, no_decay = [], []
    by_category: Dict[str, List[nn.Parameter]] = {c: [] for c in GAMMA_CATEGORIES}
    category_decay: Dict[str, float] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in gammas:
            category, category_decay[gammas[id(param)][0]] = gammas[id(param)]
            by_category[category].append(param)
        elif param.ndim <= 1 or name.endswith(".bias") or name in skip:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [dict(params=no_decay, weight_decay=0.0), dict(params=decay, weight_decay=weight_decay)]
    groups += [dict(params=params, weight_decay=category_decay[c], gamma_category=c)
               for c, params in by_category.items() if params]
    return [g for g in groups if g["params"]]
