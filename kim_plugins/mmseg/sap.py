"""Stochastic average pooling (SAP) for mmseg: a ResNetV1d backbone, a head switch, a weight converter.

"Stochastic Subsampling With Average Pooling", Bum Jun Kim and Sang Woo Kim
(arXiv 2409.16630). The math lives in :mod:`kim_plugins.layers.stochastic_pool`;
this module only adapts it to mmseg's registries:

- ``ResNetV1dSAP`` (backbone): mmseg's ``ResNetV1d`` whose ``avg_down``
  shortcut pools (``layer*.0.downsample.0``) are SAP pools. In the D8 layout
  (strides (1, 2, 1, 1)) only stage 2's shortcut pool pools; the others are
  kernel-1 pools, which SAP leaves exactly as they are.
- ``SAPEncoderDecoder`` (segmentor): mmseg's ``EncoderDecoder`` that turns the
  average pooling of its heads (PSP's pyramid bins, ASPP's image pool, ...)
  into SAP when it is built. It is the one config switch::

      model = dict(type='SAPEncoderDecoder', sap_keep_prob=0.5)

  Evaluation stays bit-identical to the plain model.
- :func:`timm_resnet_to_mmseg`: key converter from timm ResNet / ResNet-D
  weights (e.g. ``resnet50d``) to mmseg's ``ResNet`` / ``ResNetV1d`` layout;
  mmseg publishes no V1d weights (``tools/convert_timm_resnet.py`` is its CLI).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from mmengine.logging import print_log
from mmseg.models.backbones import ResNetV1d
from mmseg.models.segmentors import EncoderDecoder
from mmseg.registry import MODELS

from kim_plugins.layers.stochastic_pool import (STOCHASTIC_POOL_TYPES, check_keep_prob,
                                                convert_to_stochastic_pooling)

__all__ = ["ResNetV1dSAP", "SAPEncoderDecoder", "timm_resnet_to_mmseg"]


@MODELS.register_module()
class ResNetV1dSAP(ResNetV1d):
    """mmseg ``ResNetV1d`` with stochastic average pooling in its shortcuts.

    Every argument of :class:`mmseg.models.backbones.ResNetV1d`, plus
    ``sap_keep_prob``. The shortcut pools ``layer*.0.downsample.0`` become
    :class:`~kim_plugins.layers.stochastic_pool.StochasticAvgPool2d`; no
    parameter or buffer is added, so ``ResNetV1d`` checkpoints load unchanged,
    and evaluation is bit-identical to ``ResNetV1d``.

    Args:
        sap_keep_prob: Fraction of each pooling window kept in training, in (0, 1].
        **kwargs: ``ResNetV1d`` arguments.
    """

    def __init__(self, sap_keep_prob: float = 0.5, **kwargs) -> None:
        keep_prob = check_keep_prob(sap_keep_prob)
        super().__init__(**kwargs)
        self.sap_keep_prob = keep_prob
        convert_to_stochastic_pooling(self, keep_prob, include="layer*.0.downsample.0")


@MODELS.register_module()
class SAPEncoderDecoder(EncoderDecoder):
    """mmseg ``EncoderDecoder`` whose head average pooling is stochastic (SAP).

    Built exactly as :class:`mmseg.models.segmentors.EncoderDecoder` (every
    argument unchanged); then every average pool inside the submodules named by
    ``sap_modules`` is converted with
    :func:`~kim_plugins.layers.stochastic_pool.convert_to_stochastic_pooling`:
    PSP's pyramid pooling bins (``decode_head.psp_modules.*.0``) and the ASPP
    image pool (``decode_head.image_pool.0``) by default. Switch an existing
    config with ``model = dict(type='SAPEncoderDecoder')``. Pools already
    stochastic (e.g. of ``ResNetV1dSAP``) keep their own ``keep_prob``.

    Args:
        sap_keep_prob: Fraction of each pooling window kept in training, in (0, 1].
        sap_modules: Names of the segmentor's submodules whose average pools
            become stochastic; absent ones (no auxiliary head) are skipped. Add
            ``'backbone'`` to convert a plain backbone's pools too.
        **kwargs: ``EncoderDecoder`` arguments.

    Raises:
        ValueError: None of ``sap_modules`` holds an average pool (the switch
            would otherwise do nothing), or a name is not a submodule name.
    """

    def __init__(self, *args, sap_keep_prob: float = 0.5,
                 sap_modules: Sequence[str] = ("decode_head", "auxiliary_head"), **kwargs) -> None:
        keep_prob = check_keep_prob(sap_keep_prob)
        if isinstance(sap_modules, str):
            sap_modules = (sap_modules,)
        super().__init__(*args, **kwargs)
        self.sap_keep_prob = keep_prob
        self.sap_modules = tuple(sap_modules)
        known = ("backbone", "neck", "decode_head", "auxiliary_head")
        bad = [m for m in self.sap_modules if m not in known]
        if bad:
            raise ValueError(f"sap_modules {bad} are not segmentor parts; choose from {known}")
        converted = []
        for part in self.sap_modules:
            module = getattr(self, part, None)
            if module is None:
                continue
            convert_to_stochastic_pooling(module, keep_prob)
            converted += [f"{part}.{n}" for n, m in module.named_modules() if isinstance(m, STOCHASTIC_POOL_TYPES)]
        if not converted:
            raise ValueError(f"SAPEncoderDecoder found no average pooling in {list(self.sap_modules)} "
                             f"(decode head {type(self.decode_head).__name__}); SAP needs a head with "
                             f"average pooling (PSPHead, ASPPHead, ...) or 'backbone' in sap_modules")
        print_log(f"SAP (keep_prob={keep_prob}) in {converted}", logger="current")


# --------------------------------------------------------------------------- weights

_DEEP_STEM = {"conv1.0.": "stem.0.", "conv1.1.": "stem.1.", "conv1.3.": "stem.3.",
              "conv1.4.": "stem.4.", "conv1.6.": "stem.6.", "bn1.": "stem.7."}


def timm_resnet_to_mmseg(state_dict: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """Rename a timm ResNet state dict to mmseg's ResNet backbone layout.

    timm's deep stem (``resnet*d``: ``conv1.{0,1,3,4,6}``, ``bn1``) becomes
    mmseg's ``stem.{0,1,3,4,6,7}`` (``ResNetV1d`` / ``ResNetV1c``); a 7x7
    stem (``resnet50``: ``conv1``, ``bn1``) keeps its names (mmseg ``ResNet``).
    Stage keys (``layer*.*.{conv,bn}{1,2,3}``, ``downsample.{1,2}``) are the same
    in both libraries. The classifier ``fc.*`` is dropped.

    Args:
        state_dict: A timm ``ResNet`` state dict (e.g. ``resnet50d``); a
            ``{'state_dict': ...}`` checkpoint is accepted too.

    Returns:
        The mmseg backbone state dict (no ``backbone.`` prefix, as
        ``init_cfg=dict(type='Pretrained', checkpoint=...)`` expects).

    Raises:
        KeyError: A key that is neither stem, stage nor classifier (not a timm
            ResNet with the plain or deep stem).
        ValueError: A tiered deep stem (``resnet*t``), which mmseg cannot build.
    """
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]
    deep = any(k.startswith("conv1.0.") for k in state_dict)
    if deep and "conv1.3.weight" in state_dict and \
            state_dict["conv1.0.weight"].shape[0] != state_dict["conv1.3.weight"].shape[0]:
        raise ValueError(f"timm_resnet_to_mmseg: a tiered deep stem (widths {state_dict['conv1.0.weight'].shape[0]}, "
                         f"{state_dict['conv1.3.weight'].shape[0]}, e.g. resnet*t) has no mmseg equivalent; "
                         f"mmseg's deep stem uses stem_channels // 2 for both first convs (timm resnet*d)")
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for key, value in state_dict.items():
        if key.startswith("fc."):
            continue
        new: Optional[str] = None
        if key.startswith("layer"):
            new = key
        elif deep:
            for src, dst in _DEEP_STEM.items():
                if key.startswith(src):
                    new = dst + key[len(src):]
                    break
        elif key.startswith(("conv1.", "bn1.")):
            new = key
        if new is None:
            raise KeyError(f"timm_resnet_to_mmseg: unexpected key {key!r}; expected a timm ResNet "
                           f"(conv1/bn1 stem or the 'deep' conv1.0-conv1.6 stem, layer1-4, fc)")
        out[new] = value
    return out
