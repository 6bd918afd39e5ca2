"""Gaussian-attention-bias (GAB) and PreLayerNorm (PLN) vision transformers for timm.

Papers:

* GAB: "Understanding Gaussian Attention Bias of Vision Transformers Using
  Effective Receptive Fields", Kim et al., BMVC 2023, arXiv:2305.04722.
  Every block adds ``a² · exp(-(dh² + dw²) / (2σ²))`` to its attention
  logits (learnable σ, a). See :mod:`kim_plugins.layers.gaussian_attention_bias`.
* PLN: "Improved Robustness of Vision Transformer via PreLayerNorm in Patch
  Embedding", Kim and Kim, arXiv:2111.08413. ``z0 = [x_cls ; LN(x_p E)] + E_pos``:
  a LayerNorm on the projected patch tokens before the positional embedding
  is added. timm's ``VisionTransformer(embed_norm_layer=...)`` puts the norm
  at exactly that spot (``PatchEmbed.norm``, after the projection and before
  ``_pos_embed``; the class token is concatenated later, untouched), so the
  PLN models are plain ``VisionTransformer`` s with ``embed_norm_layer='layernorm'``
  and :class:`PreLayerNormPatchEmbed`, whose projection has no bias by default
  ([decision]: only then is ``LN(α·x E) = LN(x E)``, so that the model is
  invariant to the scale α > 0 of the normalised image, the paper's point;
  ``pln_patch_bias=True`` keeps timm's bias).

The GAB bias is passed to timm's attention as the float ``attn_mask`` of
``scaled_dot_product_attention``, so the fused kernel is kept. The patch grid
comes from the patch embedding of each call, so other ``img_size`` values and
``dynamic_img_size=True`` work.

Registered names (``import kim_plugins`` first)::

    vit_{tiny,small,base}_patch16_gab_224          VisionTransformer + GAB
    vit_relpos_{small,medium,base}_patch16_gab_224 VisionTransformerRelPos + GAB (the paper's hosts)
    vit_{tiny,small,base}_patch16_pln_224          VisionTransformer + PreLayerNorm
    vit_small_patch16_gab_pln_224                  both

A plain timm checkpoint of the host loads strictly into each of them by every
route (``load_state_dict``, ``create_model(checkpoint_path=...)``,
``pretrained=True, pretrained_cfg_overlay=dict(file='plain_vit.pth')``); the
new parameters (σ, a, the PLN norm) keep their initial values and a log line
says so (:class:`~kim_plugins.layers.plugin_state.KeepsStateWhenAbsent`). A bias-free PLN projection drops the
checkpoint's ``patch_embed.proj.bias`` (logged).
"""

import logging
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, Type, Union

import torch
import torch.nn as nn

from timm.data import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.layers import (Attention, LayerNorm, PatchEmbed, maybe_add_mask, register_notrace_function, register_notrace_module,
                         resolve_self_attn_mask)
from timm.models import build_model_with_cfg, checkpoint, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import Block, VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as _vit_filter_fn
from timm.models.vision_transformer_relpos import RelPosAttention, RelPosBlock, VisionTransformerRelPos
from timm.models.vision_transformer_relpos import checkpoint_filter_fn as _relpos_filter_fn

from ..layers.gaussian_attention_bias import (GAB_GRANULARITIES, GaussianAttentionBias, attention_with_bias,
                                              packed_attention_with_bias, use_flex_gaussian_attention)
from ..layers.plugin_state import KeepsStateWhenAbsent

__all__ = [
    "GabAttention",
    "GabBlock",
    "GabRelPosAttention",
    "GabRelPosBlock",
    "GabVisionTransformer",
    "GabVisionTransformerRelPos",
    "PatchEmbedLayerNorm",
    "PreLayerNormPatchEmbed",
    "checkpoint_filter_fn",
]

_logger = logging.getLogger(__name__)

# FX tracing with timm's lists (timm's FX features, torchvision's create_feature_extractor as timm calls it): the
# bias module and the attention calls stay whole, so the traced graph keeps the eval-time bias cache and picks the
# attention path per call; traced without those lists, they reduce to plain torch ops.
register_notrace_module(GaussianAttentionBias)
register_notrace_function(attention_with_bias)
register_notrace_function(packed_attention_with_bias)


def _with_gab_bias(bias: torch.Tensor, attn_mask: Optional[torch.Tensor], is_causal: bool) -> torch.Tensor:
    """Additive float mask = GAB bias + the caller's mask (bool or float) and causal mask."""
    if attn_mask is None and not is_causal:
        return bias
    extra = resolve_self_attn_mask(bias.shape[-1], bias, attn_mask, is_causal)
    return maybe_add_mask(bias, extra)


# a graph node under torch.fx: the model's attn_mask / is_causal inputs are symbolic there, chosen at run time
torch.fx.wrap("_with_gab_bias")


def _make_gab_layer(num_prefix_tokens: int, granularity: str, sigma_init: float,
                    amplitude_init: float, param: str = "raw") -> Callable[..., GaussianAttentionBias]:
    """Validated constructor of the per-block (or shared) bias module; the grid is always passed per call."""
    if granularity not in GAB_GRANULARITIES:
        raise ValueError(f"unknown gab_granularity {granularity!r}; use one of {GAB_GRANULARITIES}")
    # construct once to validate sigma/amplitude early, with a clear message
    GaussianAttentionBias(None, 1, granularity, sigma_init, amplitude_init, num_prefix_tokens, device="meta",
                          param=param)
    return partial(GaussianAttentionBias, None, granularity=granularity, sigma_init=sigma_init,
                   amplitude_init=amplitude_init, num_prefix_tokens=num_prefix_tokens, param=param)


def _check_gab_kwargs(kwargs: Dict[str, Any], allowed_block: Type[nn.Module]) -> None:
    block_fn = kwargs.pop("block_fn", allowed_block)
    if block_fn is not allowed_block:
        raise ValueError(f"GAB models build their own {allowed_block.__name__} subclass; "
                         f"block_fn={block_fn!r} is not supported")
    attn_layer = kwargs.pop("attn_layer", Attention)
    if attn_layer not in (Attention, "", "attn"):
        raise ValueError(f"GAB models use their own Attention subclass; attn_layer={attn_layer!r} is not supported")
    if kwargs.get("patch_drop_rate", 0.0):
        raise ValueError(f"patch_drop_rate={kwargs['patch_drop_rate']} drops patch tokens, so the Gaussian "
                         "attention bias no longer matches the token positions; use patch_drop_rate=0")


class GabAttention(Attention):
    """timm ``Attention`` whose float ``attn_mask`` may be a learnt bias.

    Identical to :class:`timm.layers.Attention` except that the fused path
    calls :func:`~kim_plugins.layers.gaussian_attention_bias.attention_with_bias`:
    ``scaled_dot_product_attention`` everywhere, but an exact faster
    replacement of torch's math fallback on CPU when the mask needs a gradient.
    """

    def forward(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        B, N, C = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        plain_qk = isinstance(self.q_norm, nn.Identity) and isinstance(self.k_norm, nn.Identity)
        if not torch.jit.is_scripting() and self.fused_attn and not is_causal and plain_qk:
            # packed path: no split of the qkv projection (saves copies on CPU while σ, a are trained)
            x = packed_attention_with_bias(self.qkv(x), self.num_heads, attn_mask,
                                           dropout_p=self.attn_drop.p if self.training else 0., scale=self.scale)
            return self._merged_heads_out(x, gate)
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)

        if self.fused_attn and not is_causal:
            x = attention_with_bias(q, k, v, attn_mask, dropout_p=self.attn_drop.p if self.training else 0.)
        else:
            q = q * self.scale
            attn = q @ k.transpose(-2, -1)
            attn_bias = resolve_self_attn_mask(N, attn, attn_mask, is_causal)
            attn = maybe_add_mask(attn, attn_bias)
            attn = attn.softmax(dim=-1)
            attn = self.attn_drop(attn)
            x = attn @ v
        return self._merged_heads_out(x.transpose(1, 2).reshape(B, N, self.attn_dim), gate)

    @torch.jit.unused
    def forward_gaussian(self, x: torch.Tensor, gab: GaussianAttentionBias, feat_size: Tuple[int, int]) -> torch.Tensor:
        """The same attention with ``gab``'s bias applied by :meth:`GaussianAttentionBias.attention`.

        That computes the bias inside a flex-attention kernel instead of
        materialising the ``(heads, T, T)`` bias (high resolutions on CUDA).
        """
        B, N, C = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = gab.attention(q, k, v, feat_size, dropout_p=self.attn_drop.p if self.training else 0., scale=self.scale)
        return self._merged_heads_out(x.transpose(1, 2).reshape(B, N, self.attn_dim), gate)

    def _merged_heads_out(self, x: torch.Tensor, gate: Optional[torch.Tensor]) -> torch.Tensor:
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


class GabBlock(Block):
    """timm ViT ``Block`` whose attention logits get a Gaussian attention bias.

    Same constructor as :class:`timm.models.vision_transformer.Block`, plus
    ``gab_layer`` (a constructor of :class:`GaussianAttentionBias` taking
    ``num_heads``; ``None`` when the model shares one bias over all blocks
    and passes it in ``attn_mask``). ``forward`` needs ``feat_size``, the
    ``(H, W)`` patch grid of this call.
    """

    def __init__(self, dim: int, num_heads: int, gab_layer: Optional[Callable[..., GaussianAttentionBias]] = None,
                 **kwargs: Any) -> None:
        super().__init__(dim, num_heads, **kwargs)
        dd = {"device": kwargs.get("device"), "dtype": kwargs.get("dtype")}
        self.gab = gab_layer(num_heads=num_heads, **dd) if gab_layer is not None else None

    def forward(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
            feat_size: Optional[Tuple[int, int]] = None,
    ) -> torch.Tensor:
        if (not torch.jit.is_scripting() and self.gab is not None and attn_mask is None and not is_causal
                and self._flex_gab(x)):
            attn_out = self.attn.forward_gaussian(self.norm1(x), self.gab, feat_size)
        else:
            if self.gab is not None:
                attn_mask = _with_gab_bias(self.gab(feat_size), attn_mask, is_causal)
                is_causal = False
            attn_out = self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)
        x = x + self.drop_path1(self.ls1(attn_out))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x

    @torch.jit.unused
    def _flex_gab(self, x: torch.Tensor) -> bool:
        # the bias inside a flex-attention kernel (GaussianAttentionBias.flex / flex_min_tokens decide)
        if not isinstance(self.attn, GabAttention):
            return False
        dropout = self.attn.attn_drop.p if self.training else 0.
        return use_flex_gaussian_attention(x.shape[1], x.device, dropout, self.gab.flex, self.gab.flex_min_tokens)


class GabRelPosAttention(RelPosAttention):
    """timm ``RelPosAttention`` that also adds an external float ``attn_mask`` to the logits.

    The relative-position bias (per block or shared) and ``attn_mask`` are
    summed and passed as one float mask to ``scaled_dot_product_attention``
    (fused path), or added to the logits (manual path).
    """

    def forward(self, x: torch.Tensor, shared_rel_pos: Optional[torch.Tensor] = None,
                attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, N, C = x.shape
        if self.rel_pos is not None:
            attn_bias = self.rel_pos.get_bias()
        else:
            attn_bias = shared_rel_pos
        if attn_mask is not None:
            attn_bias = attn_mask if attn_bias is None else attn_bias + attn_mask

        plain_qk = isinstance(self.q_norm, nn.Identity) and isinstance(self.k_norm, nn.Identity)
        if not torch.jit.is_scripting() and self.fused_attn and plain_qk:
            # packed path, as in GabAttention
            x = packed_attention_with_bias(self.qkv(x), self.num_heads, attn_bias,
                                           dropout_p=self.attn_drop.p if self.training else 0., scale=self.scale)
            return self.proj_drop(self.proj(x))
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q = self.q_norm(q)
        k = self.k_norm(k)

        if self.fused_attn:
            x = attention_with_bias(q, k, v, attn_bias, dropout_p=self.attn_drop.p if self.training else 0.)
        else:
            q = q * self.scale
            attn = q @ k.transpose(-2, -1)
            attn = maybe_add_mask(attn, attn_bias)
            attn = attn.softmax(dim=-1)
            attn = self.attn_drop(attn)
            x = attn @ v

        x = x.transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


class GabRelPosBlock(RelPosBlock):
    """timm ``RelPosBlock`` whose attention logits get a Gaussian attention bias on top of the relative-position bias.

    Same constructor as :class:`timm.models.vision_transformer_relpos.RelPosBlock`,
    plus ``gab_layer`` (see :class:`GabBlock`).
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_ratio: float = 4.,
            qkv_bias: bool = False,
            qk_norm: bool = False,
            rel_pos_cls: Optional[Type[nn.Module]] = None,
            init_values: Optional[float] = None,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
            gab_layer: Optional[Callable[..., GaussianAttentionBias]] = None,
            device=None,
            dtype=None,
    ) -> None:
        dd = {"device": device, "dtype": dtype}
        super().__init__(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_norm=qk_norm,
                         rel_pos_cls=rel_pos_cls, init_values=init_values, proj_drop=proj_drop,
                         attn_drop=attn_drop, drop_path=drop_path, act_layer=act_layer, norm_layer=norm_layer, **dd)
        # same attention, with an attn_mask input (timm's RelPosAttention has none)
        self.attn = GabRelPosAttention(dim, num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm, rel_pos_cls=rel_pos_cls,
                                       attn_drop=attn_drop, proj_drop=proj_drop, norm_layer=norm_layer, **dd)
        self.gab = gab_layer(num_heads=num_heads, **dd) if gab_layer is not None else None

    def forward(self, x: torch.Tensor, shared_rel_pos: Optional[torch.Tensor] = None,
                attn_mask: Optional[torch.Tensor] = None,
                feat_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        if self.gab is not None:
            attn_mask = _with_gab_bias(self.gab(feat_size), attn_mask, False)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), shared_rel_pos=shared_rel_pos,
                                                   attn_mask=attn_mask)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


def _gab_no_weight_decay(model: nn.Module) -> Set[str]:
    return {name for name, _ in model.named_parameters() if name.rsplit(".", 1)[-1].startswith("gab_")}


def _reshape_intermediates(intermediates: List[torch.Tensor], num_prefix_tokens: int, reshape: bool,
                           feat_size: Tuple[int, int]) -> Tuple[List[torch.Tensor], Optional[List[torch.Tensor]]]:
    """Split prefix tokens off and optionally reshape NLC -> NCHW (as timm's ViTs do)."""
    prefix_tokens: Optional[List[torch.Tensor]] = None
    if num_prefix_tokens:
        prefix_tokens = [y[:, 0:num_prefix_tokens] for y in intermediates]
        intermediates = [y[:, num_prefix_tokens:] for y in intermediates]
    if reshape:
        H, W = feat_size
        intermediates = [y.reshape(y.shape[0], H, W, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
    return intermediates, prefix_tokens


class _GabHost:
    """What both GAB hosts share: the shared (``'network'``) bias, the σ/a optimiser groups, the block loop.

    Each host defines ``_prepare(x, attn_mask, is_causal)``: the embedded
    tokens, the patch grid and the two further arguments every block takes,
    ``blk(x, a, b, feat_size)`` (:class:`GabBlock`: ``attn_mask, is_causal``;
    :class:`GabRelPosBlock`: ``shared_rel_pos, attn_mask``). The loops below are
    written once for both and stay TorchScript- and FX-friendly (the types of
    ``a`` and ``b`` come from each host's ``_prepare``).
    """

    def _init_shared_gab(self, gab_layer: Callable[..., GaussianAttentionBias], gab_granularity: str,
                         num_prefix_tokens: int, kwargs: Dict[str, Any]) -> None:
        assert self.num_prefix_tokens == num_prefix_tokens
        dd = {"device": kwargs.get("device"), "dtype": kwargs.get("dtype")}
        shared = gab_granularity == "network"
        self.gab = gab_layer(num_heads=self.blocks[0].attn.num_heads, **dd) if shared else None
        self.gab_granularity = gab_granularity

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """timm's set plus the full names of every σ and a parameter."""
        return set(super().no_weight_decay()) | _gab_no_weight_decay(self)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Union[str, List]]:
        matcher = dict(super().group_matcher(coarse))
        matcher["stem"] = matcher["stem"] + r"|^gab\."  # shared ('network') bias goes with the embeddings
        return matcher

    def _features(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor], is_causal: bool) -> torch.Tensor:
        x, feat_size, a, b = self._prepare(x, attn_mask, is_causal)
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, a, b, feat_size)
            else:
                x = blk(x, a, b, feat_size)
        x = self.norm(x)
        return x

    def _intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]],
            return_prefix_tokens: bool,
            norm: bool,
            stop_early: bool,
            output_fmt: str,
            intermediates_only: bool,
            output_dict: bool,
            attn_mask: Optional[torch.Tensor],
            is_causal: bool,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]], Dict[str, Any]]:
        """timm's ``forward_intermediates`` of the host (the contract of timm's ``VisionTransformer``)."""
        assert output_fmt in ('NCHW', 'NLC'), 'Output format must be one of NCHW or NLC.'
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)

        x, feat_size, a, b = self._prepare(x, attn_mask, is_causal)
        if torch.jit.is_scripting() or not stop_early:  # can't slice blocks in torchscript
            blocks = self.blocks
        else:
            blocks = self.blocks[:max_index + 1]
        for i, blk in enumerate(blocks):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, a, b, feat_size)
            else:
                x = blk(x, a, b, feat_size)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)

        intermediates, prefix_tokens = _reshape_intermediates(
            intermediates, self.num_prefix_tokens, output_fmt == 'NCHW', feat_size)

        if output_dict:
            result_dict: Dict[str, Any] = {'image_intermediates': intermediates}
            if prefix_tokens is not None and return_prefix_tokens:
                result_dict['image_intermediates_prefix'] = prefix_tokens
            if not intermediates_only:
                result_dict['image_features'] = self.norm(x)
            return result_dict

        if not torch.jit.is_scripting() and return_prefix_tokens and prefix_tokens is not None:
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        x = self.norm(x)
        return x, intermediates


class GabVisionTransformer(_GabHost, VisionTransformer):
    """timm ``VisionTransformer`` with a Gaussian attention bias in every block.

    From "Understanding Gaussian Attention Bias of Vision Transformers Using
    Effective Receptive Fields" (Kim et al., BMVC 2023, arXiv:2305.04722).
    All :class:`~timm.models.vision_transformer.VisionTransformer` arguments
    are accepted (``block_fn`` is fixed to :class:`GabBlock`; ``patch_drop_rate``
    must be 0 because dropped tokens lose their grid position), plus:

    Args:
        gab_granularity: ``'block'`` (one σ, a per block, shared over heads;
            default), ``'head'`` (per head) or ``'network'`` (one σ, a for the
            whole model, module ``gab``).
        gab_sigma_init: Initial σ in patch units (supplement §C: 5).
        gab_amplitude_init: Initial amplitude ``a`` (supplement §C: 2).
        gab_param: ``'raw'`` (learn σ, the authors' code; default) or
            ``'log'`` (learn log σ; project option).
        **kwargs: ``VisionTransformer`` arguments.

    Parameters ``*.gab.gab_sigma`` (``*.gab.gab_sigma_log`` with
    ``gab_param='log'``) and ``*.gab.gab_amplitude`` are listed by
    :meth:`no_weight_decay`.
    """

    def __init__(self, gab_granularity: str = "block", gab_sigma_init: float = 5.0,
                 gab_amplitude_init: float = 2.0, gab_param: str = "raw", **kwargs: Any) -> None:
        _check_gab_kwargs(kwargs, Block)
        num_prefix_tokens = int(kwargs.get("class_token", True)) + int(kwargs.get("reg_tokens", 0))
        gab_layer = _make_gab_layer(num_prefix_tokens, gab_granularity, gab_sigma_init, gab_amplitude_init, gab_param)
        shared = gab_granularity == "network"
        super().__init__(block_fn=partial(GabBlock, gab_layer=None if shared else gab_layer),
                         attn_layer=GabAttention, **kwargs)
        self._init_shared_gab(gab_layer, gab_granularity, num_prefix_tokens, kwargs)

    def _prepare(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor], is_causal: bool
                 ) -> Tuple[torch.Tensor, Tuple[int, int], Optional[torch.Tensor], bool]:
        feat_size = self.patch_embed.dynamic_feat_size((x.shape[-2], x.shape[-1]))
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        if self.gab is not None:
            return x, feat_size, _with_gab_bias(self.gab(feat_size), attn_mask, is_causal), False
        return x, feat_size, attn_mask, is_causal

    def forward_features(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        return self._features(x, attn_mask, is_causal)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
            output_dict: bool = False,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]], Dict[str, Any]]:
        """Forward features that returns intermediates (same contract as timm's ``VisionTransformer``)."""
        return self._intermediates(x, indices, return_prefix_tokens, norm, stop_early, output_fmt,
                                   intermediates_only, output_dict, attn_mask, is_causal)


class GabVisionTransformerRelPos(_GabHost, VisionTransformerRelPos):
    """timm ``VisionTransformerRelPos`` with a Gaussian attention bias added on top of the relative-position bias.

    The paper's own hosts (Kim et al., BMVC 2023, arXiv:2305.04722). All
    :class:`~timm.models.vision_transformer_relpos.VisionTransformerRelPos`
    arguments are accepted (``block_fn`` is fixed to :class:`GabRelPosBlock`),
    plus ``gab_granularity``, ``gab_sigma_init``, ``gab_amplitude_init``, ``gab_param`` as in
    :class:`GabVisionTransformer`. Like its host, the model has a fixed input
    size (``img_size`` at construction or ``set_input_size``).
    """

    def __init__(self, gab_granularity: str = "block", gab_sigma_init: float = 5.0,
                 gab_amplitude_init: float = 2.0, gab_param: str = "raw", **kwargs: Any) -> None:
        _check_gab_kwargs(kwargs, RelPosBlock)
        num_prefix_tokens = int(kwargs.get("class_token", False))
        gab_layer = _make_gab_layer(num_prefix_tokens, gab_granularity, gab_sigma_init, gab_amplitude_init, gab_param)
        shared = gab_granularity == "network"
        super().__init__(block_fn=partial(GabRelPosBlock, gab_layer=None if shared else gab_layer), **kwargs)
        self._init_shared_gab(gab_layer, gab_granularity, num_prefix_tokens, kwargs)

    def _prepare(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor], is_causal: bool
                 ) -> Tuple[torch.Tensor, Tuple[int, int], Optional[torch.Tensor], Optional[torch.Tensor]]:
        # the host takes no attention mask: callers pass (None, False), the shared GAB bias is the block's mask
        feat_size = self.patch_embed.dynamic_feat_size((x.shape[-2], x.shape[-1]))
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        shared_rel_pos = self.shared_rel_pos.get_bias() if self.shared_rel_pos is not None else None
        shared_gab = self.gab(feat_size) if self.gab is not None else None
        return x, feat_size, shared_rel_pos, shared_gab

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._features(x, None, False)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward features that returns intermediates (same contract as timm's ``VisionTransformerRelPos``)."""
        return self._intermediates(x, indices, return_prefix_tokens, norm, stop_early, output_fmt,
                                   intermediates_only, False, None, False)


class PatchEmbedLayerNorm(KeepsStateWhenAbsent, LayerNorm):
    """The PLN norm: timm's ``LayerNorm`` (eps 1e-6) on the projected patch tokens (``PatchEmbed.norm``).

    "Improved Robustness of Vision Transformer via PreLayerNorm in Patch
    Embedding" (Kim and Kim, arXiv:2111.08413). Same module as
    ``embed_norm_layer='layernorm'``, except that a state dict without its
    weight and bias (a plain ViT checkpoint) loads strictly and leaves it at
    its initial values (weight 1, bias 0).
    """


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module,
                         host_filter_fn: Callable = _vit_filter_fn) -> Dict[str, torch.Tensor]:
    """Adapt a checkpoint of the plain timm host (or of the plugin model itself).

    Runs the host's own filter (position-embedding resampling, layouts). The
    plugin modules that the checkpoint lacks entirely (σ, a, the PLN norm)
    keep their freshly initialised values in the strict load that follows
    (:class:`~kim_plugins.layers.plugin_state.KeepsStateWhenAbsent`); any
    other missing key still fails it loudly.
    """
    return host_filter_fn(state_dict, model)


def _create(model_cls: Type[nn.Module], host_filter_fn: Callable, variant: str, pretrained: bool = False,
            **kwargs: Any) -> nn.Module:
    out_indices = kwargs.pop('out_indices', 3)
    return build_model_with_cfg(
        model_cls,
        variant,
        pretrained,
        pretrained_filter_fn=partial(checkpoint_filter_fn, host_filter_fn=host_filter_fn),
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


_create_gab_vit = partial(_create, GabVisionTransformer, _vit_filter_fn)
_create_gab_vit_relpos = partial(_create, GabVisionTransformerRelPos, _relpos_filter_fn)
_create_pln_vit = partial(_create, VisionTransformer, _vit_filter_fn)


def _cfg(url: str = '', **kwargs: Any) -> Dict[str, Any]:
    return {
        'url': url,
        'num_classes': 1000,
        'input_size': (3, 224, 224),
        'pool_size': None,
        'crop_pct': 0.9,
        'interpolation': 'bicubic',
        'fixed_input_size': True,
        'mean': IMAGENET_INCEPTION_MEAN,
        'std': IMAGENET_INCEPTION_STD,
        'first_conv': 'patch_embed.proj',
        'classifier': 'head',
        'license': 'apache-2.0',
        **kwargs,
    }


# No published weights: every name is '.untrained'. Fine-tune from a plain timm
# checkpoint with pretrained=True, pretrained_cfg_overlay=dict(file=...).
default_cfgs = generate_default_cfgs({
    'vit_tiny_patch16_gab_224.untrained': _cfg(),
    'vit_small_patch16_gab_224.untrained': _cfg(),
    'vit_base_patch16_gab_224.untrained': _cfg(),
    'vit_relpos_small_patch16_gab_224.untrained': _cfg(),
    'vit_relpos_medium_patch16_gab_224.untrained': _cfg(),
    'vit_relpos_base_patch16_gab_224.untrained': _cfg(),
    'vit_tiny_patch16_pln_224.untrained': _cfg(),
    'vit_small_patch16_pln_224.untrained': _cfg(),
    'vit_base_patch16_pln_224.untrained': _cfg(),
    'vit_small_patch16_gab_pln_224.untrained': _cfg(),
})

class PreLayerNormPatchEmbed(PatchEmbed):
    """timm ``PatchEmbed`` of a PreLayerNorm ViT: ``LN(x_p E)``, by default without a projection bias.

    From "Improved Robustness of Vision Transformer via PreLayerNorm in Patch
    Embedding" (Kim and Kim, arXiv:2111.08413): the norm normalises the
    projected patch tokens before the positional embedding is added, so that a
    change of the image's colour scale does not change the embedding.
    ``LN(α·y) = LN(y)`` for α > 0 holds for ``y = x_p E`` only if the projection
    adds no bias (``LN(α·x_p E + b) != LN(x_p E + b)``), so by default
    ([decision]) the projection is bias-free and the whole model satisfies
    ``model(α·x) == model(x)`` for a normalised image ``x`` (up to the norm's
    eps). ``patch_bias=True`` keeps timm's bias (the alternative reading).

    Args:
        *args: ``PatchEmbed`` arguments.
        bias: The host's projection bias flag (``VisionTransformer`` passes
            ``not pre_norm``); the projection has a bias only if this and
            ``patch_bias`` are both true.
        norm_layer: The norm after the projection (the PreLayerNorm); required.
        patch_bias: Keep a bias in the projection (default False).
        **kwargs: ``PatchEmbed`` keyword arguments.

    Loading a checkpoint that has ``proj.bias`` into a bias-free projection
    (a plain timm ViT) drops that entry with a log line, by every loading route.
    """

    def __init__(self, *args: Any, bias: bool = True, norm_layer: Optional[Callable] = None,
                 patch_bias: bool = False, **kwargs: Any) -> None:
        if norm_layer is None:
            raise ValueError("PreLayerNormPatchEmbed needs a norm_layer (the PreLayerNorm after the projection), "
                             "got None: pass embed_norm_layer='layernorm' (the PLN models' default), or use the "
                             "plain timm ViT for a model without it")
        # Built with the host's bias flag, so the projection's random init draws what the plain ViT's does (same
        # seed -> every shared parameter starts at the plain model's value); the bias is then removed.
        super().__init__(*args, bias=bias, norm_layer=norm_layer, **kwargs)
        if not patch_bias:
            self.proj.bias = None

    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        key = prefix + "proj.bias"
        if self.proj.bias is None and key in state_dict:
            state_dict.pop(key)
            _logger.info("%s: dropped from the checkpoint: the PreLayerNorm projection has no bias "
                         "(pln_patch_bias=False)", key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _pln_args(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Model arguments of a PLN name: :class:`PatchEmbedLayerNorm` (timm's LayerNorm, eps 1e-6) inside :class:`PreLayerNormPatchEmbed`.

    Pops ``pln_patch_bias`` (default False, see :class:`PreLayerNormPatchEmbed`)
    and ``embed_norm_layer`` from ``kwargs``.

    ``timm.create_model`` removes every keyword whose value is None before it
    calls the model function (timm's rule for all models, the plain hosts
    included), so ``create_model(name, embed_norm_layer=None)`` builds the
    default PLN model; a direct call with None, or any other false value by
    either route, is an error.

    Raises:
        ValueError: a false ``embed_norm_layer`` (None, '', False: that would
            be a plain ViT) or an ``embed_layer`` (the PLN models set their own).
    """
    patch_bias = bool(kwargs.pop("pln_patch_bias", False))
    norm = kwargs.pop("embed_norm_layer", PatchEmbedLayerNorm)
    if not norm:  # None reaches here from a direct call; timm.create_model prunes None-valued kwargs first
        raise ValueError(f"embed_norm_layer={norm!r} removes the PreLayerNorm of a PLN model: keep the default "
                         "(PatchEmbedLayerNorm), pass another norm, or create the plain timm ViT (e.g. "
                         "'vit_small_patch16_224') for a model without it")
    if "embed_layer" in kwargs:
        raise ValueError(f"embed_layer={kwargs['embed_layer']!r}: the PLN models use PreLayerNormPatchEmbed; "
                         f"choose the projection bias with pln_patch_bias and the norm with embed_norm_layer")
    return dict(embed_norm_layer=norm, embed_layer=partial(PreLayerNormPatchEmbed, patch_bias=patch_bias))


@register_model
def vit_tiny_patch16_gab_224(pretrained: bool = False, **kwargs: Any) -> GabVisionTransformer:
    """ViT-Ti/16 (timm ``vit_tiny_patch16_224``) with Gaussian attention bias."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return _create_gab_vit('vit_tiny_patch16_gab_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vit_small_patch16_gab_224(pretrained: bool = False, **kwargs: Any) -> GabVisionTransformer:
    """ViT-S/16 (timm ``vit_small_patch16_224``) with Gaussian attention bias."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_gab_vit('vit_small_patch16_gab_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vit_base_patch16_gab_224(pretrained: bool = False, **kwargs: Any) -> GabVisionTransformer:
    """ViT-B/16 (timm ``vit_base_patch16_224``) with Gaussian attention bias."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_gab_vit('vit_base_patch16_gab_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vit_relpos_small_patch16_gab_224(pretrained: bool = False, **kwargs: Any) -> GabVisionTransformerRelPos:
    """ViT-S/16 RelPos (timm ``vit_relpos_small_patch16_224``) with Gaussian attention bias."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, qkv_bias=False, fc_norm=True)
    return _create_gab_vit_relpos('vit_relpos_small_patch16_gab_224', pretrained=pretrained,
                                  **dict(model_args, **kwargs))


@register_model
def vit_relpos_medium_patch16_gab_224(pretrained: bool = False, **kwargs: Any) -> GabVisionTransformerRelPos:
    """ViT-M/16 RelPos (timm ``vit_relpos_medium_patch16_224``) with Gaussian attention bias."""
    model_args = dict(patch_size=16, embed_dim=512, depth=12, num_heads=8, qkv_bias=False, fc_norm=True)
    return _create_gab_vit_relpos('vit_relpos_medium_patch16_gab_224', pretrained=pretrained,
                                  **dict(model_args, **kwargs))


@register_model
def vit_relpos_base_patch16_gab_224(pretrained: bool = False, **kwargs: Any) -> GabVisionTransformerRelPos:
    """ViT-B/16 RelPos (timm ``vit_relpos_base_patch16_224``) with Gaussian attention bias (the paper's 81.48 % model)."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, qkv_bias=False, fc_norm=True)
    return _create_gab_vit_relpos('vit_relpos_base_patch16_gab_224', pretrained=pretrained,
                                  **dict(model_args, **kwargs))


@register_model
def vit_tiny_patch16_pln_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-Ti/16 (timm ``vit_tiny_patch16_224``) with PreLayerNorm patch embedding."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, **_pln_args(kwargs))
    return _create_pln_vit('vit_tiny_patch16_pln_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vit_small_patch16_pln_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-S/16 (timm ``vit_small_patch16_224``) with PreLayerNorm patch embedding."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, **_pln_args(kwargs))
    return _create_pln_vit('vit_small_patch16_pln_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vit_base_patch16_pln_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-B/16 (timm ``vit_base_patch16_224``) with PreLayerNorm patch embedding."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, **_pln_args(kwargs))
    return _create_pln_vit('vit_base_patch16_pln_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vit_small_patch16_gab_pln_224(pretrained: bool = False, **kwargs: Any) -> GabVisionTransformer:
    """ViT-S/16 with both Gaussian attention bias and PreLayerNorm patch embedding."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, **_pln_args(kwargs))
    return _create_gab_vit('vit_small_patch16_gab_pln_224', pretrained=pretrained, **dict(model_args, **kwargs))
