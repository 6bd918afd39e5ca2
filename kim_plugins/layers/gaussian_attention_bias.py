"""Gaussian attention bias (GAB) for vision transformers.

Paper: Bum Jun Kim, Hyeyeon Choi, Hyeonah Jang, Sang Woo Kim, "Understanding
Gaussian Attention Bias of Vision Transformers Using Effective Receptive
Fields", BMVC 2023, arXiv:2305.04722.

In every transformer block, before the softmax, the attention logits get the
additive bias

    B[q, k] = a² · exp(-(dh² + dw²) / (2σ²)),

where ``(dh, dw)`` is the offset between the query and the key patch on the
patch grid, in patch units (paper, Eq. 3), and ``σ`` and ``a`` are learnable,
initialised ``σ0 = 5``, ``a0 = 2`` (supplement §C: "used for all
experiments"; a fresh bias between a patch and itself is ``a0² = 4``) and
excluded from weight decay (supplement, Listing 1). As in the authors'
``train.py`` (``sigma_param``, ``amplitude_param``), σ and ``a`` are learnt
as raw parameters (``gab_sigma``, ``gab_amplitude``); only the σ → 0 division
is guarded: ``1 / (2 (σ² + ε))`` with ``ε`` the dtype's machine epsilon,
below the rounding of any σ of practical size.

Project decisions (see ``METHODS.md`` §3):

- ``param='log'`` is an option: σ is then stored as ``log σ`` (parameter
  ``gab_sigma_log``), so it can never cross zero. Same bias at init; the
  optimizer then steps in log σ. All parameter names start with ``gab_`` so
  optimizer rules (mmengine ``paramwise_cfg.custom_keys``, timm
  ``no_weight_decay``) find them.
- Prefix tokens (class, register) get zero bias in their rows and columns.
- The grid is passed in by the caller (from the patch embedding), never
  guessed from the token count, so other image sizes and
  ``dynamic_img_size`` work.
- The bias is passed as the float ``attn_mask`` of
  :func:`torch.nn.functional.scaled_dot_product_attention`, which adds it to
  the logits and keeps the fused kernel (:func:`attention_with_bias`). One
  exception, on CPU only: when the bias itself needs a gradient (training σ
  and a), torch's SDPA has no fused CPU kernel for that and falls back to its
  generic math path; :func:`attention_with_bias` (separate q, k, v) and
  :func:`packed_attention_with_bias` (timm's packed qkv projection, fewer
  copies) then use an exact hand-written forward/backward instead, which
  computes the same values and gradients (tested against SDPA) faster than
  that fallback.

This file needs only torch.
"""

import math
import warnings
from typing import Dict, Optional, Tuple, Union

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .plugin_state import KeepsStateWhenAbsent

__all__ = ["GAB_GRANULARITIES", "GAB_PARAMS", "GaussianAttentionBias", "grid_distance_sq", "gaussian_attention_bias",
           "attention_with_bias", "packed_attention_with_bias", "FLEX_MIN_TOKENS", "flex_attention_available",
           "use_flex_gaussian_attention", "gaussian_score_mod", "flex_gaussian_attention", "SDPA_MASK_ALIGNMENT",
           "sdpa_mask_layout"]

#: ``'block'``: one (σ, a) per block, shared over heads (paper default);
#: ``'head'``: one (σ, a) per head of each block; ``'network'``: one (σ, a)
#: for the whole network (the model shares one module over all blocks).
GAB_GRANULARITIES = ("block", "head", "network")

#: How σ is learnt: ``'raw'``: σ itself (parameter ``gab_sigma``, the authors'
#: code); ``'log'``: ``log σ`` (parameter ``gab_sigma_log``, a project option).
GAB_PARAMS = ("raw", "log")

_CACHE_SIZE = 4  # eval-time biases kept per module (one per recent grid size)

#: Row alignment (elements) of a float ``attn_mask`` that SDPA's memory-efficient CUDA kernel takes as it is:
#: ``preprocess_mask`` in torch's aten/src/ATen/native/transformers/attention.cpp pads (copies) any mask whose
#: strides, but the last, are not multiples of 8 — every GAB bias of a ViT (197 tokens at 224 px), on every call.
SDPA_MASK_ALIGNMENT = 8
#: devices whose eval-cached bias is stored by :func:`sdpa_mask_layout` (CPU SDPA neither pads nor needs it)
_SDPA_LAYOUT_DEVICES = ("cuda",)


def sdpa_mask_layout(bias: torch.Tensor, dtype: torch.dtype, alignment: int = SDPA_MASK_ALIGNMENT) -> torch.Tensor:
    """``bias.to(dtype)`` stored with its rows padded to a multiple of ``alignment``, viewed back to ``bias``'s shape.

    What SDPA would otherwise do to a cached eval bias on every call, done
    once: CUDA autocast casts every floating SDPA argument, the mask
    included, to its lower precision (``scaled_dot_product_attention`` is a
    ``lower_precision_fp`` op in aten/src/ATen/autocast_mode.cpp, and the
    cast of a tensor that is no leaf needing a gradient is not cached), and
    the memory-efficient kernel pads an unaligned mask (:data:`SDPA_MASK_ALIGNMENT`).
    Same values as ``bias.to(dtype)``.
    """
    t = bias.shape[-1]
    buf = bias.new_zeros(*bias.shape[:-1], -(-t // alignment) * alignment, dtype=dtype)
    view = buf[..., :t]
    view.copy_(bias)
    return view


def _sdpa_mask_dtype(param: torch.Tensor) -> torch.dtype:
    # the dtype SDPA computes in for this module's bias: the autocast dtype when CUDA autocast is on
    if param.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return param.dtype


@torch.jit.unused  # TorchScript never calls it: every caller checks torch.jit.is_scripting() first
def _is_tracing() -> bool:
    """A graph is being captured (torch.compile, torch.export, torch.fx symbolic tracing, torch.jit.trace).

    There the module computes the plain formula with plain torch ops: no
    Python-side caches (keyed on data pointers and versions a fake or
    symbolic tensor does not have) and no hand-written autograd functions.
    """
    return (torch.compiler.is_compiling() or torch.fx._symbolic_trace.is_fx_symbolic_tracing()
            or torch.jit.is_tracing())


def _to_grid(grid_size: Union[int, Tuple[int, int]], what: str = "grid_size") -> Tuple[int, int]:
    if isinstance(grid_size, int):
        grid = (grid_size, grid_size)
    else:
        grid = tuple(int(g) for g in grid_size)
    if len(grid) != 2 or min(grid) < 1:
        raise ValueError(f"{what} must be a positive int or a (height, width) pair, got {grid_size!r}")
    return grid  # type: ignore[return-value]


def grid_distance_sq(grid_size: Tuple[int, int], device: Optional[torch.device] = None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Squared distance ``dh² + dw²`` between every pair of patches of a grid.

    Patches are numbered row-major (``index = h * W + w``), the order in which
    timm's ``PatchEmbed`` flattens its output.

    Args:
        grid_size: ``(H, W)`` of the patch grid.
        device: Device of the result.
        dtype: Floating dtype of the result.

    Returns:
        ``(H*W, H*W)`` tensor.
    """
    h, w = grid_size[0], grid_size[1]
    rows = torch.arange(h, device=device, dtype=dtype).repeat_interleave(w)
    cols = torch.arange(w, device=device, dtype=dtype).repeat(h)
    dh = rows[:, None] - rows[None, :]
    dw = cols[:, None] - cols[None, :]
    return dh * dh + dw * dw


def _machine_eps(dtype: torch.dtype) -> float:
    """``torch.finfo(dtype).eps`` of a floating dtype, spelled out (TorchScript has no ``finfo``)."""
    if dtype == torch.float64:
        return 2.220446049250313e-16
    if dtype == torch.float32:
        return 1.1920928955078125e-07
    if dtype == torch.bfloat16:
        return 0.0078125
    return 0.0009765625  # float16


def _inv_two_var(sigma: torch.Tensor, log_sigma: bool) -> torch.Tensor:
    """``1 / (2σ²)`` from the σ parameter: ``0.5 · exp(-2 log σ)``, or ``0.5 / (σ² + ε)`` (σ → 0 guarded)."""
    if log_sigma:
        return 0.5 * torch.exp(-2.0 * sigma)
    return 0.5 / (sigma * sigma + _machine_eps(sigma.dtype))


# a graph node under torch.fx symbolic tracing (the guard reads the dtype, which a tracing proxy does not have)
torch.fx.wrap("_inv_two_var")


def gaussian_attention_bias(sigma: torch.Tensor, amplitude: torch.Tensor, grid_size: Tuple[int, int],
                            num_prefix_tokens: int = 0, param: str = "raw") -> torch.Tensor:
    """The GAB logit bias ``a² · exp(-(dh² + dw²) / (2σ²))`` for a patch grid.

    Args:
        sigma: ``(P,)`` values of σ (``param='raw'``) or of ``log σ``
            (``param='log'``); ``P`` = 1 or number of heads.
        amplitude: ``(P,)`` values of ``a``.
        grid_size: ``(H, W)`` of the patch grid.
        num_prefix_tokens: Tokens placed before the patch tokens (class,
            register); their rows and columns of the bias are zero.
        param: ``'raw'`` or ``'log'``, see :data:`GAB_PARAMS`.

    Returns:
        ``(1, P, T, T)`` bias with ``T = num_prefix_tokens + H * W``, ready to
        broadcast over ``(batch, heads, T, T)`` attention logits.
    """
    d2 = grid_distance_sq(grid_size, device=sigma.device, dtype=sigma.dtype)
    inv_two_var = _inv_two_var(sigma, param == "log")
    amp_sq = amplitude * amplitude
    bias = amp_sq[:, None, None] * torch.exp(-d2[None] * inv_two_var[:, None, None])
    if num_prefix_tokens > 0:
        bias = nn.functional.pad(bias, [num_prefix_tokens, 0, num_prefix_tokens, 0])
    return bias.unsqueeze(0)


class _GaussianAttentionBiasFn(torch.autograd.Function):
    """:func:`gaussian_attention_bias` on a precomputed distance matrix, with a hand-written backward.

    With ``c = 1 / (2σ²)`` and ``G = exp(-c d²)`` the gradients are the closed
    forms ``d/da = 2a Σ g ⊙ G`` and ``d/dθ = -a² (dc/dθ) Σ g ⊙ G ⊙ d²`` for
    the σ parameter θ: ``-dc/dθ = 4σc²`` for θ = σ (``σ² + ε`` in ``c``),
    ``2c`` for θ = log σ. A few whole-matrix operations instead of autograd's
    chain, the cheaper path while training.
    """

    @staticmethod
    def forward(ctx, sigma: torch.Tensor, amplitude: torch.Tensor, d2: torch.Tensor,
                num_prefix_tokens: int, log_sigma: bool) -> torch.Tensor:
        inv_two_var = _inv_two_var(sigma, log_sigma)
        gauss = torch.exp(d2[None] * (-inv_two_var)[:, None, None])
        bias = gauss * (amplitude * amplitude)[:, None, None]
        if num_prefix_tokens > 0:
            bias = nn.functional.pad(bias, [num_prefix_tokens, 0, num_prefix_tokens, 0])
        ctx.save_for_backward(sigma, amplitude, d2, gauss, inv_two_var)
        ctx.num_prefix_tokens = num_prefix_tokens
        ctx.log_sigma = log_sigma
        return bias.unsqueeze(0)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        sigma, amplitude, d2, gauss, c = ctx.saved_tensors
        p = ctx.num_prefix_tokens
        g = (grad[0, :, p:, p:] * gauss).flatten(1)  # (P, N*N)
        d_amplitude = 2.0 * amplitude * g.sum(1)
        weighted = (amplitude * amplitude) * torch.mv(g, d2.flatten())  # a² Σ g ⊙ G ⊙ d²
        # -dc/dθ; raw: 4σc², written (weighted·c)·(4σc) so σ = 0 gives 0, not 0·inf
        d_sigma = weighted * (2.0 * c) if ctx.log_sigma else (weighted * c) * (4.0 * sigma * c)
        return d_sigma, d_amplitude, None, None, None


def _biased_attention_forward(qkv: torch.Tensor, bias: torch.Tensor, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``softmax(q kᵀ · scale + bias) v`` on a contiguous ``(3, B, heads, N, head_dim)`` stack that may be overwritten.

    ``q`` is scaled in place (so the logits need no extra pass). Returns the
    attention probabilities (saved for the backward) and the output.
    """
    q, k, v = qkv.unbind(0)
    q.mul_(scale)
    probs = torch.matmul(q, k.transpose(-2, -1))
    probs.add_(bias)
    torch.softmax(probs, dim=-1, out=probs)  # row-wise kernel, in place: one N x N buffer fewer
    return probs, torch.matmul(probs, v)


def _biased_attention_backward(qkv: torch.Tensor, probs: torch.Tensor, d_out: torch.Tensor, scale: float,
                               bias_shape: Optional[torch.Size]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Exact gradients of :func:`_biased_attention_forward`.

    Args:
        qkv: The stack after the forward (``q`` pre-scaled).
        probs: The saved attention probabilities.
        d_out: Gradient of the output, ``(B, heads, N, head_dim)`` (any strides).
        scale: The logit scale.
        bias_shape: Shape to reduce the bias gradient to; ``None``: not wanted.

    Returns:
        ``(d_qkv, d_bias)``: ``d_qkv`` stacked like ``qkv`` (gradients of the
        unscaled ``q``, ``k``, ``v``).
    """
    q, k, v = qkv.unbind(0)
    d_out = d_out.contiguous()
    d_qkv = torch.empty_like(qkv)
    d_q, d_k, d_v = d_qkv.unbind(0)
    torch.matmul(probs.transpose(-2, -1), d_out, out=d_v)
    # d logits = P ⊙ (dP - rowsum(dP ⊙ P)): torch's fused softmax backward
    d_logits = torch._softmax_backward_data(torch.matmul(d_out, v.transpose(-2, -1)), probs, -1, probs.dtype)
    torch.matmul(d_logits, k, out=d_q)
    d_q.mul_(scale)
    torch.matmul(d_logits.transpose(-2, -1), q, out=d_k)  # q is pre-scaled: this is scale · d_logitsᵀ q
    d_bias = d_logits.sum_to_size(bias_shape) if bias_shape is not None else None
    return d_qkv, d_bias


class _AttentionWithLearnableBias(torch.autograd.Function):
    """``softmax(q kᵀ · scale + bias) v`` for separate ``q, k, v`` with an exact backward that includes d(bias).

    Same math as torch's SDPA math path; it saves the attention probabilities
    like that path does, but skips its fully-masked-row handling and fuses
    the elementwise steps in place.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                scale: float) -> torch.Tensor:
        qkv = torch.stack((q, k, v))  # one contiguous copy, which the forward may overwrite
        probs, out = _biased_attention_forward(qkv, bias, scale)
        ctx.save_for_backward(qkv, probs)
        ctx.scale = scale
        ctx.bias_shape = bias.shape
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out: torch.Tensor):
        qkv, probs = ctx.saved_tensors
        d_qkv, d_bias = _biased_attention_backward(qkv, probs, d_out, ctx.scale,
                                                   ctx.bias_shape if ctx.needs_input_grad[3] else None)
        return d_qkv[0], d_qkv[1], d_qkv[2], d_bias, None


class _PackedAttentionWithLearnableBias(torch.autograd.Function):
    """The same attention on timm's packed ``qkv`` projection ``(B, N, 3·C)``, returning ``(B, N, C)``.

    Taking the packed projection saves the copies that splitting it costs:
    one permuting copy in, one out, and the gradient goes back in the packed
    layout (no stack of three gradients, no permute).
    """

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, bias: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
        B, N, C3 = qkv.shape
        stacked = qkv.view(B, N, 3, num_heads, C3 // (3 * num_heads)).permute(2, 0, 3, 1, 4)
        stacked = stacked.clone(memory_format=torch.contiguous_format)  # a copy the forward may overwrite
        probs, out = _biased_attention_forward(stacked, bias, scale)
        ctx.save_for_backward(stacked, probs)
        ctx.scale = scale
        ctx.bias_shape = bias.shape
        return out.transpose(1, 2).reshape(B, N, C3 // 3)

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out: torch.Tensor):
        stacked, probs = ctx.saved_tensors
        _, B, H, N, D = stacked.shape
        d_out = d_out.reshape(B, N, H, D).transpose(1, 2)
        d_stacked, d_bias = _biased_attention_backward(stacked, probs, d_out, ctx.scale,
                                                       ctx.bias_shape if ctx.needs_input_grad[1] else None)
        return d_stacked.permute(1, 3, 0, 2, 4).reshape(B, N, 3 * H * D), d_bias, None, None


def _float32_bias_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_bias: torch.Tensor,
                            dropout_p: float, scale: float) -> torch.Tensor:
    """Attention with the logits, the float32 bias and the softmax in float32; ``q, k, v`` in half precision.

    Under ``torch.autocast`` (bf16 / fp16) SDPA would cast the float mask to
    the half dtype, so a bias of ~1 loses its low bits before it reaches the
    logits. Here ``q kᵀ`` is computed in float32, the bias is added in float32
    and the softmax runs in float32; the probabilities go back to ``v``'s
    dtype for the value product. Gradients flow to the bias in float32.
    """
    with torch.autocast(device_type=q.device.type, enabled=False):
        logits = torch.matmul(q.float() * scale, k.float().transpose(-2, -1)) + attn_bias.float()
        probs = torch.softmax(logits, dim=-1)
        if dropout_p > 0.0:
            probs = nn.functional.dropout(probs, p=dropout_p)
        return torch.matmul(probs.to(v.dtype), v)


@torch.jit.unused  # TorchScript never calls it: every caller checks torch.jit.is_scripting() first
def _needs_float32_bias(query: torch.Tensor, attn_bias: Optional[torch.Tensor]) -> bool:
    # a float32 (or wider) bias with half-precision q/k/v: autocast, or a half model with a float32 bias.
    # [decision] not on CUDA: there SDPA's fused kernels (memory-efficient, flex) accumulate the logits and the
    # softmax in float32 and only the bias itself is rounded to the half dtype; an explicit float32 attention
    # would store the (B, heads, N, N) float32 logits and give up the fused kernel.
    if torch.fx._symbolic_trace.is_fx_symbolic_tracing():
        return False  # proxies carry no dtype/device to branch on: the traced graph keeps SDPA
    return (attn_bias is not None and attn_bias.is_floating_point() and query.device.type != "cuda"
            and query.dtype in (torch.float16, torch.bfloat16) and attn_bias.dtype in (torch.float32, torch.float64))


def _use_hand_written(query: torch.Tensor, attn_bias: Optional[torch.Tensor], dropout_p: float) -> bool:
    # the one case torch has no fused kernel for: CPU, float bias that needs a gradient, no dropout;
    # ``query`` is q or the packed qkv projection (only its device and dtype are read); never in a captured graph
    return (not _is_tracing() and attn_bias is not None and dropout_p == 0.0 and attn_bias.requires_grad
            and torch.is_grad_enabled() and query.device.type == "cpu" and attn_bias.is_floating_point()
            and attn_bias.dtype == query.dtype)


def attention_with_bias(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_bias: Optional[torch.Tensor],
                        dropout_p: float = 0.0, scale: Optional[float] = None) -> torch.Tensor:
    """``scaled_dot_product_attention(q, k, v, attn_mask=attn_bias)`` that stays fast when the bias is learnt.

    Calls :func:`torch.nn.functional.scaled_dot_product_attention` (fused
    kernels, float ``attn_mask`` added to the logits) except in the one case
    where torch has no fused kernel: CPU, gradient wanted for a float
    ``attn_bias``, no dropout. There it runs an exact hand-written
    attention (same values and gradients, faster than torch's math
    fallback on CPU).

    Args:
        q, k, v: ``(B, heads, N, head_dim)``.
        attn_bias: Float bias broadcastable to ``(B, heads, N, N)``, or ``None``.
        dropout_p: Attention dropout probability (0 in eval).
        scale: Logit scale; default ``head_dim ** -0.5``.
    """
    if not torch.jit.is_scripting() and _use_hand_written(q, attn_bias, dropout_p):
        return _AttentionWithLearnableBias.apply(q, k, v, attn_bias, q.shape[-1] ** -0.5 if scale is None else scale)
    if not torch.jit.is_scripting() and _needs_float32_bias(q, attn_bias):
        return _float32_bias_attention(q, k, v, attn_bias, dropout_p, q.shape[-1] ** -0.5 if scale is None else scale)
    return nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=dropout_p,
                                                      scale=scale)


def packed_attention_with_bias(qkv: torch.Tensor, num_heads: int, attn_bias: Optional[torch.Tensor],
                               dropout_p: float = 0.0, scale: Optional[float] = None) -> torch.Tensor:
    """:func:`attention_with_bias` on timm's packed ``qkv`` projection, returning the merged heads.

    Equivalent to splitting ``qkv`` as timm's ``Attention`` does
    (``reshape(B, N, 3, heads, head_dim).permute(2, 0, 3, 1, 4)``), calling
    :func:`attention_with_bias` and merging the heads back to ``(B, N, C)``;
    in the hand-written (CPU, learnt bias) case it works on the packed
    layout directly, which saves three tensor copies per call.

    Args:
        qkv: ``(B, N, 3 · C)`` output of the qkv projection.
        num_heads: Number of heads; ``C`` must be divisible by it.
        attn_bias: Float bias broadcastable to ``(B, heads, N, N)``, or ``None``.
        dropout_p: Attention dropout probability (0 in eval).
        scale: Logit scale; default ``head_dim ** -0.5``.

    Returns:
        ``(B, N, C)``.
    """
    B, N, C3 = qkv.shape
    if (torch.jit.is_scripting() or not _is_tracing()) and C3 % (3 * num_heads) != 0:
        raise ValueError(f"qkv width {C3} is not 3 x num_heads ({num_heads}) x head_dim")
    head_dim = C3 // (3 * num_heads)
    if scale is None:
        scale = head_dim ** -0.5
    if not torch.jit.is_scripting() and _use_hand_written(qkv, attn_bias, dropout_p):
        return _PackedAttentionWithLearnableBias.apply(qkv, attn_bias, num_heads, scale)
    q, k, v = qkv.reshape(B, N, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    if not torch.jit.is_scripting() and _needs_float32_bias(qkv, attn_bias):
        x = _float32_bias_attention(q, k, v, attn_bias, dropout_p, scale)
    else:
        x = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=dropout_p,
                                                       scale=scale)
    return x.transpose(1, 2).reshape(B, N, C3 // 3)


#: Token count from which ``flex=None`` (auto) computes the bias inside the attention kernel on CUDA
#: instead of materialising it [decision: 2048 tokens = a 45x45 grid, e.g. ViT-B/16 from 720 px; below it the
#: per-block bias (heads·T² floats) is small next to the activations and SDPA's fused kernels are faster].
FLEX_MIN_TOKENS = 2048


def flex_attention_available() -> bool:
    """Whether ``torch.nn.attention.flex_attention`` exists in the installed torch (2.5 and later)."""
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def use_flex_gaussian_attention(num_tokens: int, device: torch.device, dropout_p: float = 0.0,
                                flex: Optional[bool] = None, min_tokens: int = FLEX_MIN_TOKENS) -> bool:
    """Whether :func:`flex_gaussian_attention` (bias never materialised) serves this call.

    Args:
        num_tokens: Tokens per image (prefix + patches).
        device: Device of the attention inputs.
        dropout_p: Attention dropout of this call (flex attention has none).
        flex: ``True``: always (an error where it cannot run); ``False``: never; ``None`` (default):
            on CUDA from ``min_tokens`` tokens, when torch has flex attention and there is no dropout.
        min_tokens: The automatic threshold.

    Raises:
        RuntimeError: ``flex=True`` but torch has no flex attention, or ``dropout_p > 0``.
    """
    if flex is None:
        return (device.type == "cuda" and num_tokens >= min_tokens and dropout_p == 0.0
                and flex_attention_available())
    if flex and not flex_attention_available():
        raise RuntimeError(f"flex=True needs torch.nn.attention.flex_attention (torch >= 2.5); this torch is "
                           f"{torch.__version__}: use flex=None or False")
    if flex and dropout_p > 0.0:
        raise RuntimeError(f"flex=True cannot apply attention dropout (attn_drop={dropout_p}): use flex=None, "
                           f"which materialises the bias when dropout is on, or attn_drop_rate=0")
    return bool(flex)


def gaussian_score_mod(sigma: torch.Tensor, amplitude: torch.Tensor, grid_size: Tuple[int, int],
                       num_prefix_tokens: int = 0):
    """``score_mod`` for flex attention adding ``a² · exp(-(dh² + dw²) / (2σ²))`` to each logit.

    The offset ``(dh, dw)`` comes from the query and key indices (row-major
    patch grid after ``num_prefix_tokens`` prefix tokens, whose rows and
    columns get zero bias), so the ``(T, T)`` bias is never stored.
    Gradients reach ``sigma`` and ``amplitude`` through flex attention's
    captured-tensor support.

    Args:
        sigma: ``(P,)`` σ in patch units (``P`` = 1 or number of heads), as the module computes it.
        amplitude: ``(P,)`` amplitude ``a``.
        grid_size: ``(H, W)`` of the patch grid.
        num_prefix_tokens: Class/register tokens before the patch tokens.

    Returns:
        ``score_mod(score, b, h, q_idx, kv_idx)``.
    """
    width = int(grid_size[1])
    neg_inv_two_var = -_inv_two_var(sigma, False)  # σ → 0 guarded as in the materialised bias
    amp_sq = amplitude * amplitude
    per_head = sigma.numel() > 1
    p = int(num_prefix_tokens)

    def score_mod(score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
                  kv_idx: torch.Tensor) -> torch.Tensor:
        hi = h if per_head else 0
        qp, kp = q_idx - p, kv_idx - p
        dh = (qp // width - kp // width).to(neg_inv_two_var.dtype)
        dw = (qp % width - kp % width).to(neg_inv_two_var.dtype)
        bias = amp_sq[hi] * torch.exp((dh * dh + dw * dw) * neg_inv_two_var[hi])
        if p > 0:
            bias = torch.where((qp >= 0) & (kp >= 0), bias, torch.zeros_like(bias))
        return score + bias.to(score.dtype)

    return score_mod


_COMPILED_FLEX = None


def _flex_kernel(device: torch.device):
    # CUDA: the compiled (fused, never materialising) kernel; elsewhere torch's eager reference implementation
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention
    if device.type != "cuda":
        return flex_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


def flex_gaussian_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor,
                            amplitude: torch.Tensor, grid_size: Tuple[int, int], num_prefix_tokens: int = 0,
                            scale: Optional[float] = None) -> torch.Tensor:
    """``softmax(q kᵀ · scale + B) v`` with the Gaussian bias ``B`` computed inside the attention kernel.

    Same result as ``attention_with_bias(q, k, v, gaussian bias)`` without the
    ``(heads, T, T)`` bias in memory (nor its gradient): on CUDA through the
    compiled :func:`torch.nn.attention.flex_attention` kernel. On CPU torch's
    flex attention runs an unfused reference (for tests; it has no backward
    for ``q, k, v`` there).

    Args:
        q, k, v: ``(B, heads, T, head_dim)`` with ``T = num_prefix_tokens + H * W``.
        sigma, amplitude: ``(P,)`` σ and ``a`` (``P`` = 1 or heads).
        grid_size: ``(H, W)`` of the patch grid.
        num_prefix_tokens: Prefix tokens (zero bias).
        scale: Logit scale; default ``head_dim ** -0.5``.

    Raises:
        ValueError: ``T`` does not match the grid and prefix, or ``P`` is neither 1 nor ``heads``.
    """
    grid = _to_grid(grid_size)
    tokens = num_prefix_tokens + grid[0] * grid[1]
    if q.shape[-2] != tokens or k.shape[-2] != tokens:
        raise ValueError(f"flex Gaussian attention: {q.shape[-2]} query / {k.shape[-2]} key tokens, but the grid "
                         f"{grid} with {num_prefix_tokens} prefix tokens has {tokens}")
    if sigma.numel() not in (1, q.shape[1]) or amplitude.numel() != sigma.numel():
        raise ValueError(f"sigma ({sigma.numel()}) and amplitude ({amplitude.numel()}) need 1 or heads "
                         f"({q.shape[1]}) values each")
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32  # the bias in float32+ under autocast
    mod = gaussian_score_mod(sigma.reshape(-1).to(dtype), amplitude.reshape(-1).to(dtype), grid, num_prefix_tokens)
    return _flex_kernel(q.device)(q, k, v, score_mod=mod, scale=scale)


class GaussianAttentionBias(KeepsStateWhenAbsent, nn.Module):
    """Learnable Gaussian attention bias of one block (or of the whole network).

    From "Understanding Gaussian Attention Bias of Vision Transformers Using
    Effective Receptive Fields" (Kim et al., BMVC 2023, arXiv:2305.04722).
    ``forward(grid_size)`` returns ``a² · exp(-(dh² + dw²) / (2σ²))`` with zero
    rows and columns for the prefix tokens, shape ``(1, P, T, T)``, to be added
    to the attention logits (the float ``attn_mask`` of
    ``scaled_dot_product_attention``).

    In eval mode, when no gradient for ``σ``/``a`` is requested, the bias is
    cached per grid size; the cache is dropped on ``train()``/``eval()``,
    device/dtype moves, ``load_state_dict`` and whenever a parameter is
    changed in place (optimizer step, ``copy_``), so a stale bias is never
    returned. Changes through ``param.data`` bypass version tracking: call
    :meth:`clear_cache` after such edits. On CUDA the cached bias is kept in
    the dtype SDPA computes in (the autocast dtype under autocast) and in
    the row-aligned layout of :func:`sdpa_mask_layout`.

    A state dict without any entry of this module (a checkpoint of the plain
    host) loads strictly: σ and a keep their current values, and a log line
    says so (:class:`~kim_plugins.layers.plugin_state.KeepsStateWhenAbsent`).

    Args:
        grid_size: Default ``(H, W)`` patch grid, used when ``forward`` is
            called without one. ``None``: the grid must always be passed.
        num_heads: Number of attention heads of the block.
        granularity: ``'block'`` (one σ, a shared over heads; the paper's
            default), ``'head'`` (one σ, a per head) or ``'network'`` (one
            σ, a; the model shares this module over all its blocks).
        sigma_init: Initial σ in patch units (supplement §C: 5). Must be > 0.
        amplitude_init: Initial ``a`` (supplement §C: 2); the bias scales
            with ``a²``.
            ``0`` warns: σ and a then get exactly zero gradients and never train.
        num_prefix_tokens: Class/register tokens before the patch tokens.
        param: ``'raw'`` (learn σ itself, parameter ``gab_sigma``; the
            authors' code) or ``'log'`` (learn ``log σ``, parameter
            ``gab_sigma_log``; a project option). ``a`` is learnt as is
            (``gab_amplitude``) in both.

    Raises:
        ValueError: Unknown granularity or param, ``sigma_init`` <= 0, non-finite
            ``amplitude_init``, ``num_heads`` < 1 or ``num_prefix_tokens`` < 0.
    """

    def __init__(
            self,
            grid_size: Optional[Union[int, Tuple[int, int]]],
            num_heads: int,
            granularity: str = "block",
            sigma_init: float = 5.0,
            amplitude_init: float = 2.0,
            num_prefix_tokens: int = 0,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            param: str = "raw",
    ) -> None:
        super().__init__()
        if granularity not in GAB_GRANULARITIES:
            raise ValueError(f"unknown GAB granularity {granularity!r}; use one of {GAB_GRANULARITIES}")
        if param not in GAB_PARAMS:
            raise ValueError(f"unknown GAB param {param!r}; use one of {GAB_PARAMS}")
        if not (isinstance(sigma_init, (int, float)) and math.isfinite(sigma_init) and sigma_init > 0):
            raise ValueError(f"sigma_init must be a finite number > 0 (a standard deviation), got {sigma_init!r}")
        if not (isinstance(amplitude_init, (int, float)) and math.isfinite(amplitude_init)):
            raise ValueError(f"amplitude_init must be a finite number, got {amplitude_init!r}")
        if amplitude_init == 0:
            warnings.warn("GaussianAttentionBias(amplitude_init=0) (timm models: gab_amplitude_init=0): the bias "
                          "a²·exp(-d²/2σ²) and the gradients of σ and a (∝ a², 2a) are exactly 0, so σ and a never "
                          "leave their initial values and the model stays its plain host; use a nonzero "
                          "amplitude_init (supplement §C: 2) unless that is the point (an ablation)", UserWarning,
                          stacklevel=2)
        if not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"num_heads must be an int >= 1, got {num_heads!r}")
        if not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must be an int >= 0, got {num_prefix_tokens!r}")
        self.grid_size: Optional[Tuple[int, int]] = None if grid_size is None else _to_grid(grid_size)
        self.num_heads = num_heads
        self.granularity = granularity
        self.sigma_init = float(sigma_init)
        self.amplitude_init = float(amplitude_init)
        self.num_prefix_tokens = num_prefix_tokens
        self.param = param
        num_params = num_heads if granularity == "head" else 1
        dd = {"device": device, "dtype": dtype}
        # exactly one of gab_sigma / gab_sigma_log is a parameter, the other is None
        sigma = nn.Parameter(torch.empty(num_params, **dd))
        self.register_parameter("gab_sigma", sigma if param == "raw" else None)
        self.register_parameter("gab_sigma_log", sigma if param == "log" else None)
        self.gab_amplitude = nn.Parameter(torch.empty(num_params, **dd))
        self._bias_cache: Dict[Tuple, torch.Tensor] = {}
        self._distance_cache: Dict[Tuple, torch.Tensor] = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Set ``σ = sigma_init`` and ``a = amplitude_init``."""
        with torch.no_grad():
            self._sigma_parameter().fill_(math.log(self.sigma_init) if self.param == "log" else self.sigma_init)
            self.gab_amplitude.fill_(self.amplitude_init)
        self.clear_cache()

    def _sigma_parameter(self) -> torch.Tensor:
        """The σ parameter as learnt: ``gab_sigma`` (``param='raw'``) or ``gab_sigma_log`` (``'log'``)."""
        if self.gab_sigma is not None:
            return self.gab_sigma
        assert self.gab_sigma_log is not None
        return self.gab_sigma_log

    @property
    def sigma(self) -> torch.Tensor:
        """Current σ (patch units), differentiable: ``|gab_sigma|`` or ``exp(gab_sigma_log)``."""
        sigma = self._sigma_parameter()
        return sigma.exp() if self.param == "log" else sigma.abs()

    @torch.jit.unused
    def clear_cache(self) -> None:
        """Drop the cached eval-time biases."""
        self._bias_cache = {}

    def compute_bias(self, grid_size: Tuple[int, int]) -> torch.Tensor:
        """The bias for ``grid_size``, recomputed from the current σ, a (differentiable, never cached)."""
        if torch.jit.is_scripting() or _is_tracing():
            return gaussian_attention_bias(self._sigma_parameter(), self.gab_amplitude, grid_size,
                                           self.num_prefix_tokens, self.param)
        return _GaussianAttentionBiasFn.apply(self._sigma_parameter(), self.gab_amplitude, self._distance(grid_size),
                                              self.num_prefix_tokens, self.param == "log")

    @torch.jit.unused
    def _distance(self, grid: Tuple[int, int]) -> torch.Tensor:
        # the squared-distance matrix depends only on the grid: kept for the recent grids
        p = self.gab_amplitude
        key = (tuple(grid), p.device, p.dtype)
        d2 = self._distance_cache.get(key)
        if d2 is None:
            d2 = grid_distance_sq(key[0], device=p.device, dtype=p.dtype)
            while len(self._distance_cache) >= _CACHE_SIZE:
                self._distance_cache.pop(next(iter(self._distance_cache)))
            self._distance_cache[key] = d2
        return d2

    def forward(self, grid_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """Bias ``(1, P, T, T)`` for the patch grid ``grid_size`` (default: ``self.grid_size``)."""
        if grid_size is None:
            grid = self.grid_size
            if grid is None:
                raise RuntimeError("GaussianAttentionBias needs the patch grid: pass grid_size=(H, W) "
                                   "from the patch embedding, or construct it with a default grid_size")
        else:
            grid = grid_size
        if not torch.jit.is_scripting() and self._may_cache():
            return self._cached_bias(grid)
        return self.compute_bias(grid)

    @torch.jit.unused
    def _may_cache(self) -> bool:
        # Only in eval, only when no gradient reaches σ/a from this call, never in a captured graph.
        if self.training or _is_tracing():
            return False
        wants_grad = torch.is_grad_enabled() and (self._sigma_parameter().requires_grad
                                                  or self.gab_amplitude.requires_grad)
        return not wants_grad

    @torch.jit.unused
    def _cached_bias(self, grid: Tuple[int, int]) -> torch.Tensor:
        p, a = self._sigma_parameter(), self.gab_amplitude
        key = (tuple(grid), p.device, p.dtype, p._version, a._version, p.data_ptr(), a.data_ptr(),
               torch.is_inference_mode_enabled(), _sdpa_mask_dtype(p))
        bias = self._bias_cache.get(key)
        if bias is None:
            with torch.no_grad():
                bias = self.compute_bias(tuple(grid))
                if p.device.type in _SDPA_LAYOUT_DEVICES:  # cast and aligned once, not by SDPA in every call
                    bias = sdpa_mask_layout(bias, key[-1])
            # entries of older parameter versions can never be hit again
            self._bias_cache = {k: v for k, v in self._bias_cache.items() if k[1:-1] == key[1:-1]}
            while len(self._bias_cache) >= _CACHE_SIZE:
                self._bias_cache.pop(next(iter(self._bias_cache)))
            self._bias_cache[key] = bias
        return bias

    #: ``None``: :meth:`attention` computes the bias inside a flex-attention kernel on CUDA from
    #: ``flex_min_tokens`` tokens; ``True``/``False``: always/never (set on the module or the class).
    flex: Optional[bool] = None
    flex_min_tokens: int = FLEX_MIN_TOKENS

    @torch.jit.unused
    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  grid_size: Optional[Tuple[int, int]] = None, dropout_p: float = 0.0,
                  scale: Optional[float] = None) -> torch.Tensor:
        """``softmax(q kᵀ · scale + bias) v`` with this module's bias, materialised or not.

        From ``flex_min_tokens`` tokens on CUDA (or always with ``flex=True``)
        the bias is computed inside the kernel (:func:`flex_gaussian_attention`);
        otherwise it is materialised (:meth:`forward`, cached in eval) and
        passed to :func:`attention_with_bias`. Same values and gradients.

        Args:
            q, k, v: ``(B, heads, T, head_dim)``.
            grid_size: ``(H, W)`` patch grid (default: ``self.grid_size``).
            dropout_p: Attention dropout probability.
            scale: Logit scale; default ``head_dim ** -0.5``.
        """
        if use_flex_gaussian_attention(q.shape[-2], q.device, dropout_p, self.flex, self.flex_min_tokens):
            grid = self.grid_size if grid_size is None else grid_size
            if grid is None:
                raise RuntimeError("GaussianAttentionBias.attention needs the patch grid: pass grid_size=(H, W)")
            return flex_gaussian_attention(q, k, v, self.sigma, self.gab_amplitude, grid, self.num_prefix_tokens,
                                           scale)
        return attention_with_bias(q, k, v, self(grid_size), dropout_p=dropout_p, scale=scale)

    def train(self, mode: bool = True) -> "GaussianAttentionBias":
        self.clear_cache()
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):  # .to(), .cuda(), .half(), ...
        self.clear_cache()
        self._distance_cache = {}
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self.clear_cache()
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return (f"grid_size={self.grid_size}, num_heads={self.num_heads}, granularity={self.granularity!r}, "
                f"sigma_init={self.sigma_init}, amplitude_init={self.amplitude_init}, "
                f"num_prefix_tokens={self.num_prefix_tokens}, param={self.param!r}")
