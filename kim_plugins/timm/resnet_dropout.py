"""Pre-activation ResNets with the dropout placement of "How to Use Dropout Correctly on Residual Networks with BN".

Bum Jun Kim, Hyeyeon Choi, Hyeonah Jang et al. The guideline and the head's
variance argument are in :mod:`kim_plugins.layers.dropout_placement`.

Registered names (``import kim_plugins`` before ``timm.create_model``):

- ``resnetv2_50_dropout``, ``resnetv2_101_dropout``: timm's ``resnetv2_50`` /
  ``resnetv2_101`` (pre-activation, BatchNorm, the authors' experimental
  models) with one dropout per residual branch between its last BN + ReLU
  (``norm3``) and its last conv (``conv3``), and dropout on the final feature
  map before global average pooling.

A dropout has no parameter, so a plain ``resnetv2_50`` state dict loads
unchanged (``pretrained=True, pretrained_cfg_overlay=dict(hf_hub_id=
'timm/resnetv2_50.a1h_in1k')``).

:func:`apply_dropout_placement` applies the same placement to an existing
timm ``ResNet`` or ``ResNetV2`` in place. Where the dropouts go:

| block | slot (a module timm already calls at that point) |
|---|---|
| ResNetV2 ``PreActBottleneck`` | ``norm3.drop`` (inside BN + act, before ``conv3``) |
| ResNetV2 ``PreActBasic`` | ``norm2.drop`` (before ``conv2``) |
| ResNet ``Bottleneck`` | ``drop_block`` (after ``bn2``, before ``act2`` and ``conv3``) |
| ResNet ``BasicBlock`` | ``drop_block`` (after ``bn1``, before ``act1`` and ``conv2``) |
| head, ``'before_pool'`` | ``global_pool.pool`` becomes ``Sequential(Dropout, pool)`` |
| head, ``'after_pool'`` | timm's own: ``ResNet.drop_rate`` / ``ClassifierHead.drop`` |

In a post-activation ResNet the last BN of the branch follows its last conv,
so "after the last BN, before the last weight layer" has no literal spot;
the dropout goes after the BN + ReLU that precede the last conv [decision].
Inverted dropout commutes with ReLU, so a slot between a BN and its ReLU is
the same function as one after the ReLU.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch.nn as nn
from timm.layers import BatchNormAct2d, create_conv2d
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from timm.models.resnetv2 import PreActBasic, PreActBottleneck, ResNetV2
from timm.models.resnetv2 import _cfg as _resnetv2_cfg

from kim_plugins.layers.dropout_placement import HEAD_PLACEMENTS, check_drop_rate

__all__ = ["DropoutResNetV2", "apply_dropout_placement", "branch_dropout_slots"]

#: Default drop probability of each residual branch [decision: the paper's value was not available].
DEFAULT_BLOCK_DROP_RATE = 0.1
#: Default drop probability before global pooling [code: the authors' head experiments, F.dropout(p=0.2)].
DEFAULT_HEAD_DROP_RATE = 0.2


def _chain(existing: nn.Module, dropout: nn.Dropout) -> nn.Module:
    """``dropout`` alone where the slot is an Identity, else ``Sequential(existing, dropout)``."""
    return dropout if isinstance(existing, nn.Identity) else nn.Sequential(existing, dropout)


def branch_dropout_slots(model: nn.Module) -> Dict[str, str]:
    """Block name -> attribute path of its dropout slot, for every residual block of ``model``.

    Raises:
        TypeError: The model has no block this placement knows.
    """
    slots = {}
    for name, m in model.named_modules():
        if isinstance(m, PreActBottleneck):
            slots[name] = "norm3.drop"
        elif isinstance(m, PreActBasic):
            slots[name] = "norm2.drop"
        elif isinstance(m, (Bottleneck, BasicBlock)):
            slots[name] = "drop_block"
    if not slots:
        raise TypeError(f"{type(model).__name__} has no timm ResNet / ResNetV2 residual block "
                        f"(Bottleneck, BasicBlock, PreActBottleneck, PreActBasic)")
    return slots


def _set_branch_dropout(model: nn.Module, p: float) -> None:
    for block_name, slot in branch_dropout_slots(model).items():
        block = model.get_submodule(block_name)
        owner_name, attr = slot.rsplit(".", 1) if "." in slot else ("", slot)
        owner = block.get_submodule(owner_name) if owner_name else block
        if not hasattr(owner, attr):
            raise TypeError(f"{block_name}.{owner_name or ''} ({type(owner).__name__}) has no '{attr}' slot for "
                            f"dropout; use BatchNormAct2d/GroupNormAct norm layers (timm's norm_act)")
        setattr(owner, attr, _chain(getattr(owner, attr), nn.Dropout(p)))


def _global_pool(model: nn.Module) -> nn.Module:
    pool = getattr(model, "global_pool", None)
    if pool is None and hasattr(model, "head"):
        pool = getattr(model.head, "global_pool", None)
    if pool is None or not hasattr(pool, "pool"):
        raise TypeError(f"{type(model).__name__} has no timm global pool (global_pool / head.global_pool)")
    return pool


def _set_head_dropout(model: nn.Module, p: float, placement: str) -> None:
    if placement == "before_pool":
        pool = _global_pool(model)
        if not getattr(pool, "pool_type", "avg"):
            raise ValueError("head dropout 'before_pool' needs a global pool; the model has global_pool=''")
        pool.pool = nn.Sequential(nn.Dropout(p), pool.pool)
    elif isinstance(model, ResNet):
        model.drop_rate = p
    else:
        model.head.drop = nn.Dropout(p)


def apply_dropout_placement(model: nn.Module, block_drop_rate: float = DEFAULT_BLOCK_DROP_RATE,
                            head_drop_rate: float = DEFAULT_HEAD_DROP_RATE,
                            head_placement: str = "before_pool") -> nn.Module:
    """Insert the guideline's dropouts into a timm ``ResNet`` / ``ResNetV2`` in place.

    No parameter or buffer is added (state dicts are unchanged) and in
    ``eval()`` the model computes exactly what it did before.
    ``reset_classifier`` rebuilds timm's pool: call this again after it (the
    registered ``*_dropout`` models do that themselves).

    Args:
        model: A timm ``ResNet`` or ``ResNetV2``.
        block_drop_rate: Drop probability in each residual branch (0 = none)
            [decision, 0.1].
        head_drop_rate: Drop probability of the head dropout (0 = none) [code, 0.2].
        head_placement: ``'before_pool'`` [paper] (element-wise on the final
            feature map) or ``'after_pool'`` (timm's usual ``drop_rate`` spot).

    Returns:
        ``model``.

    Raises:
        ValueError: A rate outside [0, 1) or an unknown ``head_placement``.
        TypeError: Not a timm ResNet/ResNetV2 (no block or pool slot found).
    """
    block_p = check_drop_rate(block_drop_rate, "block_drop_rate")
    head_p = check_drop_rate(head_drop_rate, "head_drop_rate")
    if head_placement not in HEAD_PLACEMENTS:
        raise ValueError(f"head_placement must be one of {HEAD_PLACEMENTS}, got {head_placement!r}")
    if not isinstance(model, (ResNet, ResNetV2)):
        raise TypeError(f"apply_dropout_placement takes a timm ResNet or ResNetV2, got {type(model).__name__}")
    if block_p > 0:
        _set_branch_dropout(model, block_p)
    if head_p > 0:
        _set_head_dropout(model, head_p, head_placement)
    return model


class DropoutResNetV2(ResNetV2):
    """timm ``ResNetV2`` (pre-activation) with the paper's dropout placement.

    Args:
        *args: ``ResNetV2`` arguments.
        block_drop_rate: Dropout between the last BN + ReLU and the last conv of
            every residual branch [decision, 0.1].
        head_drop_rate: Head dropout probability [code, 0.2].
        head_dropout_placement: ``'before_pool'`` [paper] or ``'after_pool'``.
        **kwargs: ``ResNetV2`` keyword arguments (``drop_rate``, timm's
            after-pooling dropout, stays available and defaults to 0).
    """

    def __init__(self, *args: Any, block_drop_rate: float = DEFAULT_BLOCK_DROP_RATE,
                 head_drop_rate: float = DEFAULT_HEAD_DROP_RATE, head_dropout_placement: str = "before_pool",
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.block_drop_rate = block_drop_rate
        self.head_drop_rate = head_drop_rate
        self.head_dropout_placement = head_dropout_placement
        apply_dropout_placement(self, block_drop_rate, head_drop_rate, head_dropout_placement)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Reset the classifier; the head dropout is put back in its place."""
        super().reset_classifier(num_classes, global_pool)
        if self.head_drop_rate == 0 or not self.head.global_pool.pool_type:
            return
        if self.head_dropout_placement == "before_pool":
            missing = not isinstance(self.head.global_pool.pool, nn.Sequential)
        else:
            missing = not isinstance(self.head.drop, nn.Dropout)
        if missing:  # timm rebuilt the pool / head
            _set_head_dropout(self, self.head_drop_rate, self.head_dropout_placement)


def _create_dropout_resnetv2(variant: str, pretrained: bool = False, **kwargs: Any) -> DropoutResNetV2:
    return build_model_with_cfg(DropoutResNetV2, variant, pretrained,
                                feature_cfg=dict(flatten_sequential=True), **kwargs)


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return _resnetv2_cfg(license=None, notes=(
        "No dropout-trained weights are published; plain timm resnetv2 weights of the same "
        "architecture load unchanged (pretrained_cfg_overlay=dict(hf_hub_id=...)).",), **kwargs)


default_cfgs = generate_default_cfgs({
    "resnetv2_50_dropout": _cfg(),
    "resnetv2_101_dropout": _cfg(),
})


@register_model
def resnetv2_50_dropout(pretrained: bool = False, **kwargs: Any) -> DropoutResNetV2:
    """ResNetV2-50 (timm ``resnetv2_50``) with dropout before each branch's last conv and before pooling."""
    model_args = dict(layers=[3, 4, 6, 3], conv_layer=create_conv2d, norm_layer=BatchNormAct2d)
    return _create_dropout_resnetv2("resnetv2_50_dropout", pretrained, **dict(model_args, **kwargs))


@register_model
def resnetv2_101_dropout(pretrained: bool = False, **kwargs: Any) -> DropoutResNetV2:
    """ResNetV2-101 (timm ``resnetv2_101``) with dropout before each branch's last conv and before pooling."""
    model_args = dict(layers=[3, 4, 23, 3], conv_layer=create_conv2d, norm_layer=BatchNormAct2d)
    return _create_dropout_resnetv2("resnetv2_101_dropout", pretrained, **dict(model_args, **kwargs))
