"""L2 regularisation of BatchNorm gammas by category.

Paper: Bum Jun Kim, Hyeyeon Choi, Hyeonah Jang et al., "Guidelines for the
Regularization of Gammas in Batch Normalization for Deep Residual Networks"
(ACM TIST 2024).

[paper] The gammas of a residual network fall into four categories; L2 on the
applicable ones improved accuracy by 1–4 %, L2 on the others cost 1–3 %. The
two arguments are (1) variance control, which makes a residual block behave
like an identity mapping, and (2) stable optimisation through the effective
learning rate. The category rules themselves were not in any public text we
found, so the mechanism here takes the rules as data:

- :func:`classify_bn_gammas` sorts every affine BatchNorm of a ResNet into
  ``branch_last`` (the last BN of a residual branch), ``branch_inner`` (the
  other BNs of a branch), ``shortcut`` (BNs of the projection shortcut,
  ``downsample``) and ``outside`` (stem, final pre-activation norm, anything
  not in a residual block).
- A multiplier per category (``gamma_decay_mult``) scales the weight decay of
  that category's gammas; :func:`gamma_weight_decay` maps parameters to
  their decay, shared by the mmengine constructor and the timm param groups.

Default multipliers [decision, from the abstract's two arguments]:

| category | mult | why |
|---|---|---|
| ``branch_last`` | 1 | its gamma scales the branch output: decay pulls the block toward identity (argument 1) |
| ``branch_inner`` | 1 | followed by conv + BN, a scale-invariant path: decay raises the effective learning rate (argument 2) |
| ``shortcut`` | 0 | added to the output unnormalised: no scale-invariant path and not the branch |
| ``outside`` | 0 | stem / final norm: feed the identity path or the classifier, not a scale-invariant path |

A user holding the paper sets ``gamma_decay_mult`` to its rules. BN betas
are not gammas and keep the caller's bias/norm rule.

Blocks are found by name (timm/mmseg ``layer<i>.<j>``, timm ResNetV2
``stages.<i>.blocks.<j>``), with a structural fallback: any module with a
``downsample`` attribute (the residual-block convention of torchvision,
timm and mmseg) that holds BatchNorms. Inside a block, BNs under
``downsample`` are ``shortcut``; of the others, the last one registered is
``branch_last`` (timm/mmseg register a branch in forward order).

Nothing here imports timm or mmseg.
"""
from __future__ import annotations

import re
from collections import Counter, OrderedDict
from typing import Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "GAMMA_CATEGORIES",
    "DEFAULT_GAMMA_DECAY_MULT",
    "classify_bn_gammas",
    "count_gamma_categories",
    "resolve_gamma_decay_mult",
    "gamma_weight_decay",
]

GAMMA_CATEGORIES = ("branch_last", "branch_inner", "shortcut", "outside")
DEFAULT_GAMMA_DECAY_MULT: Dict[str, float] = {"branch_last": 1.0, "branch_inner": 1.0,
                                              "shortcut": 0.0, "outside": 0.0}

_BLOCK_NAME = re.compile(r"^(?:.*\.)?(?:layer\d+\.\d+|stages\.\d+\.blocks\.\d+)$")
_SHORTCUT_NAMES = ("downsample", "shortcut")


def _is_block(name: str, module: nn.Module) -> bool:
    if _BLOCK_NAME.match(name):
        return True
    return hasattr(module, "downsample") and any(isinstance(m, _BatchNorm) for m in module.modules())


def classify_bn_gammas(model: nn.Module) -> "OrderedDict[str, str]":
    """Category of every affine BatchNorm of ``model``: BN module name -> category.

    Args:
        model: A ResNet-like network (timm ``ResNet``/``ResNetV2``, mmseg/mmcv
            ``ResNet*``, torchvision ``resnet*``, or anything with residual
            blocks that have a ``downsample`` attribute).

    Returns:
        Ordered ``{bn_name: category}``, categories from :data:`GAMMA_CATEGORIES`;
        the gamma is ``<bn_name>.weight``.

    Raises:
        ValueError: The model has affine BatchNorms but no residual block.
    """
    bns = [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm) and m.affine]
    blocks: List[str] = []
    for name, module in model.named_modules():
        if name and _is_block(name, module) and not any(name.startswith(b + ".") for b in blocks):
            blocks.append(name)
    if bns and not blocks:
        raise ValueError(f"{type(model).__name__} has BatchNorms but no residual block (modules named "
                         f"layer<i>.<j> / stages.<i>.blocks.<j>, or with a 'downsample' attribute); "
                         f"classify_bn_gammas needs a residual network")
    out: "OrderedDict[str, str]" = OrderedDict((n, "outside") for n, _ in bns)
    for block in blocks:
        inside = [n for n, _ in bns if n.startswith(block + ".")]
        branch = []
        for n in inside:
            rel = n[len(block) + 1:].split(".")
            if any(part in _SHORTCUT_NAMES for part in rel[:-1]) or rel[0] in _SHORTCUT_NAMES:
                out[n] = "shortcut"
            else:
                branch.append(n)
        for n in branch:
            out[n] = "branch_inner"
        if branch:
            out[branch[-1]] = "branch_last"
    return out


def count_gamma_categories(model: nn.Module) -> Dict[str, int]:
    """Number of gammas per category (every category present, 0 where none)."""
    counts = Counter(classify_bn_gammas(model).values())
    return {c: counts.get(c, 0) for c in GAMMA_CATEGORIES}


def resolve_gamma_decay_mult(gamma_decay_mult: Optional[Mapping[str, float]] = None) -> Dict[str, float]:
    """The defaults overridden by ``gamma_decay_mult``.

    Raises:
        ValueError: An unknown category or a negative multiplier.
    """
    mult = dict(DEFAULT_GAMMA_DECAY_MULT)
    for key, value in (gamma_decay_mult or {}).items():
        if key not in GAMMA_CATEGORIES:
            raise ValueError(f"unknown gamma category {key!r}; choose from {GAMMA_CATEGORIES}")
        if not float(value) >= 0:
            raise ValueError(f"gamma_decay_mult[{key!r}] must be >= 0, got {value}")
        mult[key] = float(value)
    return mult


def gamma_weight_decay(model: nn.Module, weight_decay: float,
                       gamma_decay_mult: Optional[Mapping[str, float]] = None
                       ) -> "OrderedDict[str, Tuple[torch.nn.Parameter, str, float]]":
    """Every BN gamma with its category and weight decay ``weight_decay * mult[category]``.

    Args:
        model: See :func:`classify_bn_gammas`.
        weight_decay: The optimizer's base weight decay.
        gamma_decay_mult: Multiplier per category (defaults:
            :data:`DEFAULT_GAMMA_DECAY_MULT`).

    Returns:
        ``{'<bn>.weight': (parameter, category, decay)}`` for gammas that require grad.
    """
    mult = resolve_gamma_decay_mult(gamma_decay_mult)
    modules = dict(model.named_modules())
    out: "OrderedDict[str, Tuple[torch.nn.Parameter, str, float]]" = OrderedDict()
    for bn_name, category in classify_bn_gammas(model).items():
        gamma = modules[bn_name].weight
        if gamma is not None and gamma.requires_grad:
            out[f"{bn_name}.weight" if bn_name else "weight"] = (gamma, category, weight_decay * mult[category])
    return out

