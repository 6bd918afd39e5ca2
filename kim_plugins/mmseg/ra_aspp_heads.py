"""Resolution-aware ASPP heads for mmseg: ``dilations='auto'``.

Paper: Bum Jun Kim, Hyeyeon Choi, Hyeonah Jang, Sang Woo Kim, "Resolution-Aware
Design of Atrous Rates for Semantic Segmentation Networks", arXiv 2307.14179.
The rule lives in :func:`kim_plugins.layers.atrous.resolution_aware_rates`
([decision], see there); this module only adapts it to mmseg.

Registered names (``mmseg.registry.MODELS``):

- ``RAASPPHead``: :class:`mmseg.models.decode_heads.ASPPHead` + ``dilations='auto'``.
- ``RADepthwiseSeparableASPPHead``: ``DepthwiseSeparableASPPHead`` (DeepLabV3+) + ``'auto'``.
- ``RAEncoderDecoder``: ``EncoderDecoder`` that resolves ``output_stride='infer'``
  (and a missing ``crop_size``) of its heads before building them.

Config example (the rest of the head config is unchanged)::

    decode_head=dict(type='RAASPPHead', dilations='auto', crop_size=crop_size,
                     output_stride=8, ...)

``output_stride`` is the stride of the feature map the head reads (8 for
ResNet-D8, 1 for UNet-S5-D16 + ASPP, whose head reads the full-resolution
decoder output). A head cannot see the backbone, so ``output_stride='infer'``
is resolved one level up, by one shared function
(:func:`infer_head_output_stride`, a dummy forward of backbone + neck at the
crop size, in eval mode and without gradients):

- at build time by ``model = dict(type='RAEncoderDecoder', ...)``, or
- on a config by :func:`resolve_auto_dilations` (used by ``tools/atrous_rates.py``).

A head given ``output_stride='infer'`` outside those two paths raises an error
naming them.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from mmengine.config import Config, ConfigDict
from mmengine.logging import print_log
from mmseg.models.decode_heads import ASPPHead, DepthwiseSeparableASPPHead
from mmseg.models.segmentors import EncoderDecoder
from mmseg.registry import MODELS

from kim_plugins.config.inspect import crop_size as config_crop_size
from kim_plugins.layers.atrous import (measure_output_stride, normalize_crop_size,
                                       resolve_dilations)
from kim_plugins.layers.module_modes import eval_mode

__all__ = [
    "DilationsTypeError",
    "ResolutionAwareDilationsMixin",
    "RAASPPHead",
    "RADepthwiseSeparableASPPHead",
    "RAEncoderDecoder",
    "infer_head_output_stride",
    "resolve_auto_dilations",
    "set_aspp_dilations",
]

_INFER = "infer"


class DilationsTypeError(ValueError, AssertionError):
    """``dilations`` is neither ``'auto'`` nor a list/tuple.

    A ``ValueError`` like every bad argument of kim_plugins, and the
    ``AssertionError`` that mmseg's ``ASPPHead`` raises for the same input, so
    the resolution-aware and scale-equalized heads reject it as their parent
    does (drop-in).
    """


class ResolutionAwareDilationsMixin:
    """Resolve ``dilations='auto'`` before an ASPP head's constructor runs.

    Put it first in the bases of any head whose parent takes ``dilations``
    (``ASPPHead`` and its subclasses assert a tuple)::

        @MODELS.register_module()
        class MyASPPHead(ResolutionAwareDilationsMixin, ASPPHead):
            ...

    The stable interface (keyword-only, shared by every resolution-aware head
    of kim_plugins, scale-equalizer heads included):

    Args:
        dilations: ``'auto'`` or an explicit tuple of ints (passed through
            unchanged; with ``crop_size`` and an int ``output_stride``, a rate
            that leaves a degenerate branch, above ``floor((F - 1) / 2)``,
            gets a ``DegenerateRateWarning`` with the rule's suggestion).
            Default: ASPPHead's ``(1, 6, 12, 18)``.
        crop_size: Training crop ``(H, W)`` or int; required for ``'auto'``.
        output_stride: Int stride of the feature map this head reads; required
            for ``'auto'``. ``'infer'`` is resolved by ``RAEncoderDecoder`` or
            :func:`resolve_auto_dilations` before the head is built.
        num_rates: Ladder length for ``'auto'`` (default 4, as mmseg's configs).
        kappa: Reach of the largest rate as a fraction of the feature size,
            in (0, 0.5] (an error otherwise).
        **kwargs: Everything else goes to the parent head unchanged.

    After construction: ``self.dilations`` (tuple), ``self.auto_dilations``
    (bool), ``self.crop_size``, ``self.output_stride``, ``self.num_rates``,
    ``self.kappa``. The chosen rates are logged to the current MMLogger.
    """

    def __init__(self, *args: Any, dilations: Union[str, Sequence[int]] = (1, 6, 12, 18),
                 crop_size: Optional[Union[int, Sequence[int]]] = None,
                 output_stride: Optional[Union[int, str]] = None, num_rates: int = 4,
                 kappa: float = 0.5, **kwargs: Any) -> None:
        name = type(self).__name__
        if output_stride == _INFER:
            raise ValueError(
                f"{name}: output_stride='infer' needs the backbone, which a head does not see. Build the "
                f"model with type='RAEncoderDecoder' (it measures the stride with a dummy forward of "
                f"backbone + neck) or resolve the config first with "
                f"kim_plugins.mmseg.ra_aspp_heads.resolve_auto_dilations(cfg); or pass the int stride.")
        auto = isinstance(dilations, str) and dilations == "auto"
        if not auto and not isinstance(dilations, (list, tuple)):
            raise DilationsTypeError(f"{name}: dilations must be 'auto' or a list/tuple of positive ints, got "
                                     f"{dilations!r} (e.g. dilations=(1, 12, 24, 36))")
        try:
            rates = resolve_dilations(dilations, crop_size=crop_size, output_stride=output_stride,
                                      num_rates=num_rates, kappa=kappa)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
        super().__init__(*args, dilations=rates, **kwargs)
        self.dilations = rates
        self.auto_dilations = auto
        self.crop_size = None if crop_size is None else normalize_crop_size(crop_size)
        self.output_stride = output_stride
        self.num_rates = num_rates
        self.kappa = kappa
        if auto:
            print_log(f"{name}: dilations='auto' -> {rates} (crop_size={self.crop_size}, "
                      f"output_stride={output_stride}, kappa={kappa}; arXiv 2307.14179)", logger="current")


@MODELS.register_module()
class RAASPPHead(ResolutionAwareDilationsMixin, ASPPHead):
    """DeepLabV3's ASPP head with resolution-aware ``dilations='auto'``.

    Same arguments as :class:`mmseg.models.decode_heads.ASPPHead`, plus
    ``crop_size``, ``output_stride``, ``num_rates``, ``kappa`` (see
    :class:`ResolutionAwareDilationsMixin`). With explicit dilations it is
    exactly an ``ASPPHead``.
    """


@MODELS.register_module()
class RADepthwiseSeparableASPPHead(ResolutionAwareDilationsMixin, DepthwiseSeparableASPPHead):
    """DeepLabV3+'s separable ASPP head with resolution-aware ``dilations='auto'``.

    Same arguments as :class:`mmseg.models.decode_heads.DepthwiseSeparableASPPHead`,
    plus those of :class:`ResolutionAwareDilationsMixin`. The stride is that of
    the ASPP input (``in_index``), not of the ``c1`` skip feature.
    """


def set_aspp_dilations(head: ASPPHead, dilations: Sequence[int]) -> Tuple[int, ...]:
    """Change the atrous rates of a built ASPP head in place, keeping its weights.

    A 3x3 convolution's weight does not depend on its dilation, so the rates
    of ``ASPPHead`` / ``DepthwiseSeparableASPPHead`` (and subclasses) can be
    changed without rebuilding; the ERF search of ``tools/atrous_rates.py``
    uses this to compare rates on one set of weights. mmseg builds a rate-1
    branch as a 1x1 convolution, so a branch cannot change to or from rate 1.

    Args:
        head: A built ASPP head.
        dilations: New rates, one per ASPP branch.

    Returns:
        The new rates (also stored in ``head.dilations``).

    Raises:
        ValueError: wrong number of rates, or a change to/from rate 1.
    """
    rates = resolve_dilations(tuple(dilations))
    branches = head.aspp_modules
    old = tuple(head.dilations)
    if len(rates) != len(branches):
        raise ValueError(f"{type(head).__name__} has {len(branches)} ASPP branches {old}, got {len(rates)} "
                         f"rates {rates}")
    for i, (o, n) in enumerate(zip(old, rates)):
        if (o == 1) != (n == 1):
            raise ValueError(f"branch {i} of {type(head).__name__} has rate {o} and cannot take rate {n} in place "
                             f"(mmseg builds rate 1 as a 1x1 conv): rebuild the head with dilations={rates}")
    for branch, n in zip(branches, rates):
        if n == 1:
            continue
        convs = [m for m in branch.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
        if len(convs) != 1:
            raise ValueError(f"unexpected ASPP branch {type(branch).__name__}: {len(convs)} 3x3 convs")
        convs[0].dilation = (n, n)
        convs[0].padding = (n, n)
    head.dilations = rates
    branches.dilations = rates
    return rates


def _select_head_input(feats: Sequence[torch.Tensor], head_cfg: Dict[str, Any]) -> torch.Tensor:
    """The feature map an mmseg decode head reads (its ``_transform_inputs`` size)."""
    in_index = head_cfg.get("in_index", -1)
    transform = head_cfg.get("input_transform", None)
    if isinstance(feats, torch.Tensor):
        feats = [feats]
    if isinstance(in_index, (list, tuple)):
        if transform is None:
            raise ValueError(f"head in_index={in_index} is a list but input_transform is None")
        in_index = in_index[0]  # 'resize_concat' resizes to the first selected level
    return feats[in_index]


def infer_head_output_stride(extract_feat: Callable[[torch.Tensor], Sequence[torch.Tensor]],
                             head_cfg: Dict[str, Any], crop_size: Union[int, Sequence[int]],
                             in_channels: int = 3, modules: Sequence[torch.nn.Module] = ()) -> int:
    """Stride of the feature map a head reads, by a dummy forward at the crop size.

    Args:
        extract_feat: Backbone (+ neck) forward: image batch -> list of features.
        head_cfg: The head's config (``in_index``, ``input_transform`` are read).
        crop_size: Training crop.
        in_channels: Image channels.
        modules: Modules put in eval mode for the dummy forward (so BatchNorm
            running statistics are not touched) and restored afterwards.

    Returns:
        The integer output stride.
    """
    with eval_mode(*modules):
        return measure_output_stride(lambda x: _select_head_input(extract_feat(x), head_cfg), crop_size,
                                     in_channels=in_channels)


def _needs_resolution(head_cfg: Any) -> bool:
    return (isinstance(head_cfg, dict) and head_cfg.get("dilations") == "auto"
            and (head_cfg.get("output_stride") == _INFER or head_cfg.get("crop_size") is None))


def _resolve_head_cfg(head_cfg: Dict[str, Any], extract_feat: Callable, default_crop: Any,
                      in_channels: int, modules: Sequence[torch.nn.Module]) -> Dict[str, Any]:
    head_cfg = copy.deepcopy(head_cfg)
    if head_cfg.get("crop_size") is None:
        if default_crop is None:
            raise ValueError(f"{head_cfg.get('type')}: dilations='auto' needs crop_size and none was found in "
                             f"the head, the data_preprocessor (size=) or the config (crop_size=)")
        head_cfg["crop_size"] = tuple(default_crop) if not isinstance(default_crop, int) else default_crop
    if head_cfg.get("output_stride") == _INFER:
        stride = infer_head_output_stride(extract_feat, head_cfg, head_cfg["crop_size"], in_channels, modules)
        print_log(f"{head_cfg.get('type')}: output_stride='infer' -> {stride} (dummy forward at crop_size="
                  f"{head_cfg['crop_size']})", logger="current")
        head_cfg["output_stride"] = stride
    return head_cfg


def _map_heads(cfg: Any, fn: Callable[[Dict[str, Any]], Dict[str, Any]]) -> Any:
    if isinstance(cfg, (list, tuple)):
        return type(cfg)(_map_heads(c, fn) for c in cfg)
    return fn(cfg) if _needs_resolution(cfg) else cfg


@MODELS.register_module()
class RAEncoderDecoder(EncoderDecoder):
    """``EncoderDecoder`` that resolves ``output_stride='infer'`` of its heads.

    Same arguments as :class:`mmseg.models.segmentors.EncoderDecoder`. Before
    each head with ``dilations='auto'`` is built, ``output_stride='infer'`` is
    replaced by the stride measured with a dummy forward of the already built
    backbone + neck at the head's ``crop_size`` (eval mode, no gradient, BN
    statistics untouched), and a missing ``crop_size`` is taken from the
    data preprocessor's ``size``. Heads with explicit values are untouched, so
    the model is otherwise exactly an ``EncoderDecoder``.
    """

    def _resolve(self, head_cfg: Any) -> Any:
        default_crop = getattr(self.data_preprocessor, "size", None)
        modules = [self.backbone] + ([self.neck] if self.with_neck else [])
        in_channels = getattr(self.backbone, "in_channels", 3)
        in_channels = in_channels if isinstance(in_channels, int) else 3
        return _map_heads(head_cfg, lambda c: _resolve_head_cfg(c, self.extract_feat, default_crop,
                                                                 in_channels, modules))

    def _init_decode_head(self, decode_head: Any) -> None:
        super()._init_decode_head(self._resolve(decode_head))

    def _init_auxiliary_head(self, auxiliary_head: Any) -> None:
        super()._init_auxiliary_head(self._resolve(auxiliary_head) if auxiliary_head is not None else None)


def resolve_auto_dilations(cfg: Union[Config, Dict[str, Any]]) -> Union[Config, Dict[str, Any]]:
    """Resolve ``output_stride='infer'`` / missing ``crop_size`` in a config.

    Builds the config's backbone (+ neck) once (no weights are loaded), runs a
    dummy forward at the crop size and returns a copy of ``cfg`` whose heads
    with ``dilations='auto'`` carry explicit ``crop_size`` and integer
    ``output_stride``. A missing ``crop_size`` is the config's training crop
    (:func:`kim_plugins.config.inspect.crop_size`: the data preprocessor's
    ``size``, then the config's ``crop_size``, then the train pipeline's crop).

    Args:
        cfg: An mmengine ``Config`` (or dict) with ``cfg.model``.

    Returns:
        The resolved copy (the input is not modified).
    """
    cfg = copy.deepcopy(cfg)
    model = cfg["model"]
    heads = [model.get("decode_head"), model.get("auxiliary_head")]
    flat: List[Any] = []
    for h in heads:
        flat.extend(h if isinstance(h, (list, tuple)) else [h])
    if not any(_needs_resolution(h) for h in flat):
        return cfg
    import mmseg.utils
    mmseg.utils.register_all_modules(init_default_scope=False)
    backbone_cfg = copy.deepcopy(model["backbone"])
    backbone_cfg.pop("init_cfg", None)
    if "pretrained" in backbone_cfg:
        backbone_cfg["pretrained"] = None
    backbone = MODELS.build(backbone_cfg)
    neck = MODELS.build(model["neck"]) if model.get("neck") is not None else None
    modules = [backbone] + ([neck] if neck is not None else [])

    def extract_feat(x: torch.Tensor) -> Sequence[torch.Tensor]:
        feats = backbone(x)
        return neck(feats) if neck is not None else feats

    default_crop = config_crop_size(cfg)
    in_channels = backbone_cfg.get("in_channels", 3)
    fn = lambda c: _resolve_head_cfg(c, extract_feat, default_crop, in_channels, modules)  # noqa: E731
    for key in ("decode_head", "auxiliary_head"):
        if model.get(key) is not None:
            resolved = _map_heads(model[key], fn)
            model[key] = ConfigDict(resolved) if isinstance(resolved, dict) else resolved
    return cfg
