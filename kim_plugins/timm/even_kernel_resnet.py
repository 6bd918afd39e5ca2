"""Even-kernel ResNets for timm: the dead-pixel paper's fix as model names.

Bum Jun Kim, Hyeyeon Choi, Hyeonah Jang, et al., Sang Woo Kim, "Dead Pixel Test
Using Effective Receptive Field" (Pattern Recognition Letters); authors' code
``kmbmjn/deadpixeltest_code`` (``my_model.py``): every stride-2 kernel ``k``
becomes ``k + 1`` (stem 7x7 -> 8x8, the stride-2 3x3 of each stage's first
block -> 4x4, the 1x1 shortcut -> 2x2) and the stem max-pool 3 -> 4, so every
input pixel is covered by the same number of windows
(:mod:`kim_plugins.layers.dead_pixel`).

Registered names (``import kim_plugins`` before ``timm.create_model``):
``resnet18_even``, ``resnet34_even``, ``resnet50_even``, ``resnet101_even``
(the code's ``my_resnet*_f`` models, trained from scratch). They take every
timm ``ResNet`` argument plus ``even_maxpool`` (default True, [code]).

Pretrained plain weights load zero-padded (the code's ``my_resnet*_pad``
models): ``timm.create_model('resnet50_even', pretrained=True,
pretrained_cfg_overlay=dict(hf_hub_id='timm/resnet50.a1_in1k'))``; the padded
convolutions then compute exactly what the plain ones did, and only the max-pool
differs until fine-tuning. For an existing model use
:func:`kim_plugins.layers.dead_pixel.even_kernel_convert`.
"""
from typing import Any, Dict

import torch
import torch.nn.functional as F

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from timm.models.resnet import _cfg as _resnet_cfg

from kim_plugins.layers.dead_pixel import even_kernel_convert

__all__ = ["EvenKernelResNet", "checkpoint_filter_fn"]


class EvenKernelResNet(ResNet):
    """timm ``ResNet`` whose stride-2 kernels are multiples of 2 (dead-pixel paper).

    Built exactly as :class:`timm.models.resnet.ResNet`, then converted by
    :func:`~kim_plugins.layers.dead_pixel.even_kernel_convert` with fresh
    Kaiming-normal (fan-out) weights for the enlarged kernels, timm's own
    ResNet init.

    Args:
        *args: ``ResNet`` arguments (``block``, ``layers``, ...).
        even_maxpool: Also enlarge the stem max-pool 3 -> 4 ([code] does).
        **kwargs: ``ResNet`` keyword arguments.
    """

    def __init__(self, *args: Any, even_maxpool: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.even_maxpool = bool(even_maxpool)
        even_kernel_convert(self, maxpool=self.even_maxpool, init="fresh")


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: EvenKernelResNet) -> Dict[str, torch.Tensor]:
    """Zero-pad plain ResNet conv weights (right and bottom) to the even kernels, as the authors' code does."""
    own = model.state_dict()
    out = {}
    for k, v in state_dict.items():
        target = own.get(k)
        if target is not None and v.dim() == 4 and target.dim() == 4 and v.shape[:2] == target.shape[:2] \
                and v.shape[2:] != target.shape[2:]:
            dh, dw = target.shape[2] - v.shape[2], target.shape[3] - v.shape[3]
            if dh < 0 or dw < 0:
                raise ValueError(f"{k}: checkpoint kernel {tuple(v.shape[2:])} is larger than the model's "
                                 f"{tuple(target.shape[2:])}")
            v = F.pad(v, (0, dw, 0, dh))
        out[k] = v
    return out


def _create_even_resnet(variant: str, pretrained: bool = False, **kwargs: Any) -> EvenKernelResNet:
    return build_model_with_cfg(EvenKernelResNet, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                **kwargs)


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return _resnet_cfg(license=None, notes=(
        "Dead Pixel Test Using Effective Receptive Field (Pattern Recognition Letters). No even-kernel "
        "weights are published; plain timm ResNet weights load zero-padded "
        "(pretrained_cfg_overlay=dict(hf_hub_id=...)).",), **kwargs)


default_cfgs = generate_default_cfgs({
    "resnet18_even": _cfg(),
    "resnet34_even": _cfg(),
    "resnet50_even": _cfg(),
    "resnet101_even": _cfg(),
})


@register_model
def resnet18_even(pretrained: bool = False, **kwargs: Any) -> EvenKernelResNet:
    """ResNet-18 with even stride-2 kernels (8x8 stem, 4x4 max-pool, 4x4 and 2x2 downsampling)."""
    model_args = dict(block=BasicBlock, layers=(2, 2, 2, 2))
    return _create_even_resnet("resnet18_even", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet34_even(pretrained: bool = False, **kwargs: Any) -> EvenKernelResNet:
    """ResNet-34 with even stride-2 kernels (8x8 stem, 4x4 max-pool, 4x4 and 2x2 downsampling)."""
    model_args = dict(block=BasicBlock, layers=(3, 4, 6, 3))
    return _create_even_resnet("resnet34_even", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet50_even(pretrained: bool = False, **kwargs: Any) -> EvenKernelResNet:
    """ResNet-50 with even stride-2 kernels (8x8 stem, 4x4 max-pool, 4x4 and 2x2 downsampling)."""
    model_args = dict(block=Bottleneck, layers=(3, 4, 6, 3))
    return _create_even_resnet("resnet50_even", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet101_even(pretrained: bool = False, **kwargs: Any) -> EvenKernelResNet:
    """ResNet-101 with even stride-2 kernels (8x8 stem, 4x4 max-pool, 4x4 and 2x2 downsampling)."""
    model_args = dict(block=Bottleneck, layers=(3, 4, 23, 3))
    return _create_even_resnet("resnet101_even", pretrained, **dict(model_args, **kwargs))
