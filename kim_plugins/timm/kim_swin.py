"""Swin Transformers with Gaussian attention bias (GAB) for timm: the paper's ADE20K / COCO hosts.

Paper: "Understanding Gaussian Attention Bias of Vision Transformers Using
Effective Receptive Fields", Kim et al., BMVC 2023, arXiv:2305.04722. Its
ADE20K and COCO results use Swin-S (window attention with Swin's relative
position bias) + UPerNet. Here every window attention adds, on top of the
relative position bias,

    B[q, k] = a² · exp(-(dh² + dw²) / (2σ²)),

with ``(dh, dw)`` the offset of query and key *inside the window*, in patch
units, and one learnable ``(σ, a)`` per block (init σ0 = 5, a0 = 2,
supplement §C). Shifted windows keep their mask: tokens of different regions
of a shifted window stay masked out, and within one region the in-window
offset is the true offset. The bias module is the ViTs' own
:class:`~kim_plugins.layers.gaussian_attention_bias.GaussianAttentionBias`.

Registered names (``import kim_plugins`` first)::

    swin_{tiny,small,base}_patch4_window7_gab_224   SwinTransformer + GAB

Every ``SwinTransformer`` argument is accepted (other ``img_size`` and
``window_size`` values, ``set_input_size``, ``dynamic_img_size``, features),
and a plain timm Swin checkpoint loads with only the σ, a parameters missing
(``pretrained=True, pretrained_cfg_overlay=dict(file='swin.pth')``); they
keep their init.
"""

from typing import Any, Callable, Dict, Optional, Set, Tuple, Union

import torch
import torch.nn as nn

from timm.layers import register_notrace_module
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.swin_transformer import SwinTransformer, WindowAttention
from timm.models.swin_transformer import _cfg as _swin_cfg
from timm.models.swin_transformer import checkpoint_filter_fn as _swin_filter_fn

from ..layers.gaussian_attention_bias import GaussianAttentionBias
from .kim_vit import _gab_no_weight_decay, _make_gab_layer

__all__ = ["GabWindowAttention", "GabSwinTransformer", "checkpoint_filter_fn"]

# FX feature extraction keeps the bias module whole (its eval cache and closed-form backward are Python)
register_notrace_module(GaussianAttentionBias)

#: Granularities a Swin host supports: one (σ, a) per block (the paper's) or per head.
SWIN_GAB_GRANULARITIES = ("block", "head")


class GabWindowAttention(WindowAttention):
    """timm ``WindowAttention`` whose relative position bias gets the Gaussian of the in-window offsets added.

    Same constructor as :class:`timm.models.swin_transformer.WindowAttention`
    plus ``gab_layer`` (a constructor of :class:`GaussianAttentionBias` taking
    ``num_heads``). The sum goes where timm puts the relative position bias:
    the float ``attn_mask`` of ``scaled_dot_product_attention`` (plus the
    shifted-window mask) on the fused path, the logits on the manual path.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: Optional[int] = None,
                 window_size: Union[int, Tuple[int, int]] = 7, qkv_bias: bool = True, attn_drop: float = 0.,
                 proj_drop: float = 0., gab_layer: Optional[Callable[..., GaussianAttentionBias]] = None,
                 device=None, dtype=None) -> None:
        super().__init__(dim, num_heads, head_dim=head_dim, window_size=window_size, qkv_bias=qkv_bias,
                         attn_drop=attn_drop, proj_drop=proj_drop, device=device, dtype=dtype)
        if gab_layer is None:
            raise ValueError("GabWindowAttention needs gab_layer, a constructor of GaussianAttentionBias")
        self.gab = gab_layer(num_heads=num_heads, device=device, dtype=dtype)

    @classmethod
    def from_window_attention(cls, attn: WindowAttention,
                              gab_layer: Callable[..., GaussianAttentionBias]) -> "GabWindowAttention":
        """The same attention (same arguments, same parameter values) with a Gaussian attention bias added."""
        weight = attn.qkv.weight
        new = cls(attn.dim, attn.num_heads, head_dim=attn.qkv.out_features // (3 * attn.num_heads),
                  window_size=attn.window_size, qkv_bias=attn.qkv.bias is not None, attn_drop=attn.attn_drop.p,
                  proj_drop=attn.proj_drop.p, gab_layer=gab_layer, device=weight.device, dtype=weight.dtype)
        new.fused_attn = attn.fused_attn
        missing, unexpected = new.load_state_dict(attn.state_dict(), strict=False)
        assert not unexpected and all(k.startswith("gab.") for k in missing), (missing, unexpected)
        return new

    def _get_rel_pos_bias(self) -> torch.Tensor:
        # timm's relative position bias (written out: TorchScript has no super()), then the Gaussian
        rel_pos = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        rel_pos = rel_pos.view(self.window_area, self.window_area, -1).permute(2, 0, 1).contiguous()
        return rel_pos.unsqueeze(0) + self.gab(self.window_size)  # contiguous, as timm's (SDPA is faster so)


class GabSwinTransformer(SwinTransformer):
    """timm ``SwinTransformer`` with a Gaussian attention bias in every window attention.

    From "Understanding Gaussian Attention Bias of Vision Transformers Using
    Effective Receptive Fields" (Kim et al., BMVC 2023, arXiv:2305.04722),
    whose ADE20K / COCO host is Swin-S. All
    :class:`~timm.models.swin_transformer.SwinTransformer` arguments are
    accepted, plus:

    Args:
        gab_granularity: ``'block'`` (one σ, a per block, shared over heads;
            the paper's default) or ``'head'`` (per head). ``'network'`` (one
            σ, a for a whole ViT) is not offered for Swin.
        gab_sigma_init: Initial σ in patch units (supplement §C: 5).
        gab_amplitude_init: Initial amplitude ``a`` (supplement §C: 2).
        gab_param: ``'raw'`` (learn σ, the authors' code; default) or
            ``'log'`` (learn log σ; project option).
        **kwargs: ``SwinTransformer`` arguments.

    Parameters ``layers.i.blocks.j.attn.gab.gab_sigma`` (``gab_sigma_log``)
    and ``...gab.gab_amplitude`` are listed by :meth:`no_weight_decay`.
    """

    def __init__(self, gab_granularity: str = "block", gab_sigma_init: float = 5.0,
                 gab_amplitude_init: float = 2.0, gab_param: str = "raw", **kwargs: Any) -> None:
        if gab_granularity not in SWIN_GAB_GRANULARITIES:
            raise ValueError(f"gab_granularity={gab_granularity!r} is not supported by the Swin GAB models; "
                             f"use one of {SWIN_GAB_GRANULARITIES}")
        gab_layer = _make_gab_layer(0, gab_granularity, gab_sigma_init, gab_amplitude_init, gab_param)
        super().__init__(**kwargs)
        # timm's blocks build their WindowAttention themselves: swap each for the GAB one, keeping its weights
        for stage in self.layers:
            for block in stage.blocks:
                block.attn = GabWindowAttention.from_window_attention(block.attn, gab_layer)
        self.gab_granularity = gab_granularity

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """timm's set (relative position bias tables) plus the full names of every σ and a parameter."""
        return set(super().no_weight_decay()) | _gab_no_weight_decay(self)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """timm's Swin checkpoint filter (layouts, table resizing), then σ and a that the checkpoint lacks keep their
    init. Only those: any other missing key stays missing, so a wrong checkpoint still fails loudly."""
    out = _swin_filter_fn(state_dict, model)
    for key, value in model.state_dict().items():
        if key not in out and ".gab.gab_" in key:
            out[key] = value
    return out


def _create_gab_swin(variant: str, pretrained: bool = False, **kwargs: Any) -> GabSwinTransformer:
    # as timm's _create_swin_transformer
    default_out_indices = tuple(i for i, _ in enumerate(kwargs.get('depths', (1, 1, 3, 1))))
    out_indices = kwargs.pop('out_indices', default_out_indices)
    return build_model_with_cfg(
        GabSwinTransformer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        **kwargs)


# No published weights: every name is '.untrained'. Fine-tune from a plain timm
# Swin checkpoint with pretrained=True, pretrained_cfg_overlay=dict(file=...).
default_cfgs = generate_default_cfgs({
    'swin_tiny_patch4_window7_gab_224.untrained': _swin_cfg(),
    'swin_small_patch4_window7_gab_224.untrained': _swin_cfg(),
    'swin_base_patch4_window7_gab_224.untrained': _swin_cfg(),
})


@register_model
def swin_tiny_patch4_window7_gab_224(pretrained: bool = False, **kwargs: Any) -> GabSwinTransformer:
    """Swin-T (timm ``swin_tiny_patch4_window7_224``) with Gaussian attention bias."""
    model_args = dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
    return _create_gab_swin('swin_tiny_patch4_window7_gab_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def swin_small_patch4_window7_gab_224(pretrained: bool = False, **kwargs: Any) -> GabSwinTransformer:
    """Swin-S (timm ``swin_small_patch4_window7_224``) with Gaussian attention bias (the paper's ADE20K/COCO host)."""
    model_args = dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
    return _create_gab_swin('swin_small_patch4_window7_gab_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def swin_base_patch4_window7_gab_224(pretrained: bool = False, **kwargs: Any) -> GabSwinTransformer:
    """Swin-B (timm ``swin_base_patch4_window7_224``) with Gaussian attention bias."""
    model_args = dict(patch_size=4, window_size=7, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
    return _create_gab_swin('swin_base_patch4_window7_gab_224', pretrained=pretrained, **dict(model_args, **kwargs))
