"""Stochastic-average-pooling (SAP) ResNets for timm.

"Stochastic Subsampling With Average Pooling", Bum Jun Kim and Sang Woo Kim
(arXiv 2409.16630): SAP replaces a network's average pooling with a
dropout-like stochastic subsampling in training and the exact plain pooling in
evaluation (see :mod:`kim_plugins.layers.stochastic_pool`).

Registered names (``import kim_plugins`` before ``timm.create_model``):

- ``resnet18_sap``, ``resnet50_sap``: timm's ``resnet18`` / ``resnet50`` with
  SAP global average pooling.
- ``resnet18d_sap``, ``resnet50d_sap``: timm's ``resnet18d`` / ``resnet50d``
  with SAP global pooling and SAP in the ``avg_down`` shortcut pooling.

They take every ``ResNet`` argument plus ``sap_keep_prob`` (default 0.5, the
paper's best), ``sap_global_pool`` and ``sap_downsample``. SAP adds no
parameters or buffers: a plain timm ``resnet50`` / ``resnet50d`` state dict
loads unchanged, e.g. ``pretrained=True,
pretrained_cfg_overlay=dict(hf_hub_id='timm/resnet50d.ra2_in1k')``.
"""
from typing import Any, Dict, Optional

import torch.nn as nn

from timm.layers import register_notrace_module
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from timm.models.resnet import _cfg as _resnet_cfg

from kim_plugins.layers.stochastic_pool import (STOCHASTIC_POOL_TYPES, StochasticAvgPool2dSame,
                                                check_keep_prob, convert_to_stochastic_pooling)

__all__ = ["SAPResNet"]

for _cls in STOCHASTIC_POOL_TYPES + (StochasticAvgPool2dSame,):
    register_notrace_module(_cls)  # leaves for timm's FX feature extraction (``feature_cls='fx'``)

_AVG_POOL_TYPES = ("avg", "fast", "fastavg")


class SAPResNet(ResNet):
    """timm ``ResNet`` with stochastic average pooling (arXiv 2409.16630).

    The model is built exactly as :class:`timm.models.resnet.ResNet` and its
    average pools are then swapped for their SAP versions: the global pool
    (``global_pool.pool``) and, for ``avg_down=True`` (ResNet-D), the shortcut
    pools ``layer*.*.downsample.0``. Evaluation is bit-identical to the plain
    ResNet with the same weights. :meth:`reset_classifier` keeps the global
    pool stochastic.

    Args:
        *args: ``ResNet`` arguments (``block``, ``layers``, ...).
        sap_keep_prob: Fraction of each pooling window kept in training, in (0, 1].
        sap_global_pool: Make the global average pooling stochastic.
        sap_downsample: Make the ``avg_down`` shortcut pooling stochastic
            (no effect without ``avg_down``).
        **kwargs: ``ResNet`` keyword arguments.

    Raises:
        ValueError: ``sap_global_pool`` with a ``global_pool`` type that has no
            average pooling to replace (``'max'``, ``'avgmax'``, ``'catavgmax'``).
    """

    def __init__(self, *args: Any, sap_keep_prob: float = 0.5, sap_global_pool: bool = True,
                 sap_downsample: bool = True, **kwargs: Any) -> None:
        keep_prob = check_keep_prob(sap_keep_prob)  # fail before building the network
        super().__init__(*args, **kwargs)
        self.sap_keep_prob = keep_prob
        self.sap_global_pool = bool(sap_global_pool)
        self.sap_downsample = bool(sap_downsample)
        if self.sap_downsample:
            shortcut_pools = [name for name, m in self.named_modules()
                              if _is_shortcut_pool(name) and isinstance(m, nn.AvgPool2d)]
            if shortcut_pools:
                convert_to_stochastic_pooling(self, self.sap_keep_prob, include=shortcut_pools)
        self._make_global_pool_stochastic()

    def _check_global_pool_type(self, pool_type: str) -> None:
        if self.sap_global_pool and pool_type and pool_type.lower() not in _AVG_POOL_TYPES:
            raise ValueError(f"{type(self).__name__} with sap_global_pool=True needs an average global pool "
                             f"({', '.join(map(repr, _AVG_POOL_TYPES))}), got global_pool={pool_type!r}; "
                             f"use global_pool='avg' or sap_global_pool=False")

    def _make_global_pool_stochastic(self) -> None:
        self._check_global_pool_type(self.global_pool.pool_type)
        if self.sap_global_pool and self.global_pool.pool_type:
            convert_to_stochastic_pooling(self.global_pool, self.sap_keep_prob)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Reset the classifier head; the new global pool is stochastic again.

        Args:
            num_classes: Number of classes of the new classifier (0 for none).
            global_pool: Global pooling type, current pooling is kept if None.

        Raises:
            ValueError: A ``global_pool`` type without average pooling while
                ``sap_global_pool`` is set; the head is then left unchanged.
        """
        if global_pool is not None:
            self._check_global_pool_type(global_pool)  # before the head is replaced
        super().reset_classifier(num_classes, global_pool)
        self._make_global_pool_stochastic()


def _is_shortcut_pool(name: str) -> bool:
    """``layer<i>.<j>.downsample.0``: the ``avg_down`` pool of a ResNet-D shortcut (or its Identity)."""
    parts = name.split(".")
    return len(parts) == 4 and parts[0].startswith("layer") and parts[2] == "downsample" and parts[3] == "0"


def _create_sap_resnet(variant: str, pretrained: bool = False, **kwargs: Any) -> SAPResNet:
    return build_model_with_cfg(SAPResNet, variant, pretrained, **kwargs)


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return _resnet_cfg(license=None, paper_ids="arXiv:2409.16630", notes=(
        "No SAP-trained weights are published; plain timm weights of the same architecture "
        "load unchanged (pretrained_cfg_overlay=dict(hf_hub_id=...)).",), **kwargs)


default_cfgs = generate_default_cfgs({
    "resnet18_sap": _cfg(),
    "resnet50_sap": _cfg(),
    "resnet18d_sap": _cfg(first_conv="conv1.0"),
    "resnet50d_sap": _cfg(first_conv="conv1.0"),
})


@register_model
def resnet18_sap(pretrained: bool = False, **kwargs: Any) -> SAPResNet:
    """ResNet-18 with stochastic average global pooling."""
    model_args = dict(block=BasicBlock, layers=(2, 2, 2, 2))
    return _create_sap_resnet("resnet18_sap", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet50_sap(pretrained: bool = False, **kwargs: Any) -> SAPResNet:
    """ResNet-50 with stochastic average global pooling."""
    model_args = dict(block=Bottleneck, layers=(3, 4, 6, 3))
    return _create_sap_resnet("resnet50_sap", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet18d_sap(pretrained: bool = False, **kwargs: Any) -> SAPResNet:
    """ResNet-18-D with stochastic average global and shortcut pooling."""
    model_args = dict(block=BasicBlock, layers=(2, 2, 2, 2), stem_width=32, stem_type="deep", avg_down=True)
    return _create_sap_resnet("resnet18d_sap", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet50d_sap(pretrained: bool = False, **kwargs: Any) -> SAPResNet:
    """ResNet-50-D with stochastic average global and shortcut pooling."""
    model_args = dict(block=Bottleneck, layers=(3, 4, 6, 3), stem_width=32, stem_type="deep", avg_down=True)
    return _create_sap_resnet("resnet50d_sap", pretrained, **dict(model_args, **kwargs))
