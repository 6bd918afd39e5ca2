"""Gaussian attention bias (GAB) on mmseg's Swin Transformer: the paper's ADE20K / COCO backbone.

"Understanding Gaussian Attention Bias of Vision Transformers Using Effective
Receptive Fields", Kim et al., BMVC 2023, arXiv:2305.04722. The paper's
segmentation results use Swin-S + UPerNet; every window attention adds, on top
of Swin's relative position bias, ``a² · exp(-(dh² + dw²) / (2σ²))`` of the
in-window offsets ``(dh, dw)`` of query and key, one learnable ``(σ, a)`` per
block (init σ0 = 5, a0 = 2, supplement §C). The bias module is
:class:`~kim_plugins.layers.gaussian_attention_bias.GaussianAttentionBias`,
the one the timm ViT and Swin models use.

``SwinTransformerGAB`` is mmseg's ``SwinTransformer`` with that bias: same
arguments, same parameter names, so every ``SwinTransformer`` config and
pretrained checkpoint works (σ and a keep their init when the checkpoint
lacks them). Config switch::

    model = dict(backbone=dict(type='SwinTransformerGAB'))
    optim_wrapper = dict(paramwise_cfg=dict(custom_keys={
        'gab_sigma': dict(decay_mult=0.), 'gab_amplitude': dict(decay_mult=0.)}))
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from mmseg.models.backbones import SwinTransformer
from mmseg.models.backbones.swin import WindowMSA
from mmseg.registry import MODELS

from kim_plugins.layers.gaussian_attention_bias import GAB_PARAMS, GaussianAttentionBias

__all__ = ["GabWindowMSA", "SwinTransformerGAB"]


class GabWindowMSA(WindowMSA):
    """mmseg ``WindowMSA`` whose logits get the Gaussian of the in-window offsets after the relative position bias.

    Same arguments as :class:`mmseg.models.backbones.swin.WindowMSA`, plus
    the bias's ``gab_sigma_init``, ``gab_amplitude_init``, ``gab_param``. One
    ``(σ, a)`` for the block, shared over heads (the paper's default).
    """

    def __init__(self, embed_dims: int, num_heads: int, window_size: Sequence[int], qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, attn_drop_rate: float = 0., proj_drop_rate: float = 0.,
                 init_cfg: Optional[dict] = None, gab_sigma_init: float = 5.0, gab_amplitude_init: float = 2.0,
                 gab_param: str = "raw") -> None:
        super().__init__(embed_dims, num_heads, window_size, qkv_bias=qkv_bias, qk_scale=qk_scale,
                         attn_drop_rate=attn_drop_rate, proj_drop_rate=proj_drop_rate, init_cfg=init_cfg)
        self.gab = GaussianAttentionBias(None, num_heads, "block", gab_sigma_init, gab_amplitude_init,
                                         param=gab_param)

    @classmethod
    def from_window_msa(cls, attn: WindowMSA, **gab_kwargs) -> "GabWindowMSA":
        """The same attention (arguments and parameter values of ``attn``) with a Gaussian attention bias."""
        new = cls(attn.embed_dims, attn.num_heads, attn.window_size, qkv_bias=attn.qkv.bias is not None,
                  qk_scale=attn.scale, attn_drop_rate=attn.attn_drop.p, proj_drop_rate=attn.proj_drop.p,
                  **gab_kwargs).to(attn.qkv.weight)
        missing, unexpected = new.load_state_dict(attn.state_dict(), strict=False)
        assert not unexpected and all(k.startswith("gab.") for k in missing), (missing, unexpected)
        return new

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        # One Gaussian for every window and head: it rides on mmseg's additive (num_windows, N, N) mask,
        # which WindowMSA adds to the logits right after the relative position bias (shifted windows keep
        # their -100 mask in the sum).
        bias = self.gab(self.window_size)[0]  # (1, N, N)
        return super().forward(x, mask=bias if mask is None else mask + bias)


@MODELS.register_module()
class SwinTransformerGAB(SwinTransformer):
    """mmseg ``SwinTransformer`` with a Gaussian attention bias in every window attention.

    From "Understanding Gaussian Attention Bias of Vision Transformers Using
    Effective Receptive Fields" (Kim et al., BMVC 2023, arXiv:2305.04722),
    whose ADE20K / COCO backbone is Swin-S. Every ``SwinTransformer``
    argument is accepted unchanged (``pretrained`` / ``init_cfg`` checkpoints
    included; σ and a keep their init when a checkpoint lacks them), plus:

    Args:
        gab_granularity: ``'block'`` only (one σ, a per block, shared over
            heads: the paper's default). Per-head σ, a: the timm names
            ``swin_*_gab_224`` (``gab_granularity='head'``) via ``TIMMBackbone``.
        gab_sigma_init: Initial σ in patch units (supplement §C: 5).
        gab_amplitude_init: Initial amplitude ``a`` (supplement §C: 2).
        gab_param: ``'raw'`` (learn σ, the authors' code; default) or
            ``'log'`` (learn log σ; project option).

    Parameters are ``stages.i.blocks.j.attn.w_msa.gab.gab_sigma`` and
    ``...gab.gab_amplitude``; exempt them from weight decay with
    ``paramwise_cfg.custom_keys`` ``'gab_sigma'``, ``'gab_amplitude'``.
    """

    def __init__(self, *args, gab_granularity: str = "block", gab_sigma_init: float = 5.0,
                 gab_amplitude_init: float = 2.0, gab_param: str = "raw", **kwargs) -> None:
        if gab_granularity != "block":
            raise ValueError(f"SwinTransformerGAB supports gab_granularity='block' only, got {gab_granularity!r}; "
                             "for per-head σ, a use TIMMBackbone with model_name='swin_*_gab_224', "
                             "gab_granularity='head'")
        if gab_param not in GAB_PARAMS:
            raise ValueError(f"unknown GAB param {gab_param!r}; use one of {GAB_PARAMS}")
        super().__init__(*args, **kwargs)
        gab_kwargs = dict(gab_sigma_init=gab_sigma_init, gab_amplitude_init=gab_amplitude_init, gab_param=gab_param)
        # mmseg's blocks build their WindowMSA themselves: swap each for the GAB one, keeping its weights
        for stage in self.stages:
            for block in stage.blocks:
                block.attn.w_msa = GabWindowMSA.from_window_msa(block.attn.w_msa, **gab_kwargs)
