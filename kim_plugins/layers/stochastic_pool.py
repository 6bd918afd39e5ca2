"""Stochastic average pooling (SAP).

From "Stochastic Subsampling With Average Pooling", Bum Jun Kim and Sang Woo
Kim (arXiv 2409.16630). Dropout's train/test inconsistency (variance shift)
hurts networks with BatchNorm; SAP puts dropout-like stochasticity into average
pooling instead, as a drop-in replacement for any existing average pooling
(global average pooling included), in 1D and 2D, best near keep probability
``p = 0.5`` with one random pattern shared across channels [paper].

The exact estimator is the project's reading of the paper ([decision], see
``docs/stochastic_pooling.md``):

* Training: in every pooling window with ``K`` valid positions, keep a uniformly
  random subset of ``k = max(1, floor(p * K + 0.5))`` of them, the same subset
  for every channel of a sample (independent across samples and windows), and
  average the kept values. ``K`` counts exactly the positions that the replaced
  op divides by: real positions only for ``count_include_pad=False`` (partial
  border windows of ``ceil_mode=True`` have a smaller ``K``), real and zero
  padded positions for ``count_include_pad=True`` and for timm's
  ``AvgPool2dSame`` (whose external zero padding is counted in the mean). The
  result is an unbiased estimate of the replaced op's output; with
  ``divisor_override=d`` the kept sum is scaled by ``K / (k * d)``.
* Evaluation: exactly the replaced op, bit-identical.
* No ``sqrt(p)`` rescaling is applied (the summaries of the paper mention one
  that the available text does not explain).

Everything is vectorised (one ``gather`` over a cached table of window
positions), runs on any device and dtype, and draws from the global torch
generator, so ``torch.manual_seed`` makes it deterministic. Errors for bad
shapes or arguments are torch's own: the first call for each input shape runs
the plain op, which raises exactly what ``torch.nn.functional`` raises.
"""
from __future__ import annotations

import fnmatch
import math
import numbers
from collections import OrderedDict
from functools import lru_cache
from typing import Callable, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "check_keep_prob",
    "num_kept",
    "stochastic_avg_pool2d",
    "stochastic_avg_pool1d",
    "stochastic_adaptive_avg_pool2d",
    "stochastic_adaptive_avg_pool1d",
    "StochasticAvgPool2d",
    "StochasticAvgPool2dSame",
    "StochasticAdaptiveAvgPool2d",
    "StochasticAvgPool1d",
    "StochasticAdaptiveAvgPool1d",
    "STOCHASTIC_POOL_TYPES",
    "convert_to_stochastic_pooling",
]

_Size2 = Union[int, Tuple[int, int]]
_OptSize2 = Union[Optional[int], Tuple[Optional[int], Optional[int]]]


# --------------------------------------------------------------------------- helpers


def check_keep_prob(keep_prob: float) -> float:
    """Return ``keep_prob`` as a float.

    Raises:
        TypeError: Not a real number (bools and strings are rejected).
        ValueError: Outside (0, 1] (NaN included).
    """
    if isinstance(keep_prob, bool) or not isinstance(keep_prob, numbers.Real):
        raise TypeError(f"keep_prob must be a real number in (0, 1], got {keep_prob!r} "
                        f"({type(keep_prob).__name__}); use e.g. keep_prob=0.5")
    p = float(keep_prob)
    if not 0.0 < p <= 1.0:  # also rejects NaN
        raise ValueError(f"keep_prob must be in (0, 1], got {keep_prob!r}; keep_prob is the fraction "
                         f"of each pooling window that is kept in training (the paper's best is 0.5, "
                         f"1.0 gives plain average pooling)")
    return p


def num_kept(window_size: Union[int, torch.Tensor], keep_prob: float) -> Union[int, torch.Tensor]:
    """Number of positions SAP keeps in a window: ``max(1, floor(p * K + 0.5))``.

    Args:
        window_size: ``K``, the number of valid positions of the window (an int
            or an integer tensor of window sizes).
        keep_prob: ``p`` in (0, 1].

    Returns:
        ``k`` with the type of ``window_size``. For ``p = 0.5``: ``K = 4 -> 2``,
        ``K = 9 -> 5``, ``K = 49 -> 25``.
    """
    p = check_keep_prob(keep_prob)
    if isinstance(window_size, torch.Tensor):
        k = torch.floor(window_size.to(torch.float64) * p + 0.5).to(torch.long)
        return k.clamp_min(1)
    return max(1, math.floor(p * int(window_size) + 0.5))


def _pair(v) -> Tuple:
    if isinstance(v, (tuple, list)):
        return tuple(v)
    return (v, v)


class _Windows(NamedTuple):
    """Per-dimension window table: for output index ``i`` and window offset ``j``."""

    pos: torch.Tensor      # (O, J) long: input index of the position (clamped into range)
    counted: torch.Tensor  # (O, J) bool: the position is one of the window's K positions
    real: torch.Tensor     # (O, J) bool: the position is a real input element (not zero padding)


def _pool_windows(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool,
                  count_include_pad: bool, pad_before: int = 0, pad_after: int = 0) -> _Windows:
    """Windows of ``avg_pool`` along one dimension, exactly as ATen builds them.

    ``pad_before``/``pad_after`` is external zero padding applied before the
    pooling (timm's ``AvgPool2dSame``); it is part of the pooled tensor, so it
    is counted like real positions and is never pooling padding.
    """
    padded = size + pad_before + pad_after
    # ATen pooling_output_shape (div_rtn is floor division)
    out = (padded + 2 * padding - (kernel - 1) - 1 + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= padded + padding:
        out -= 1
    start = torch.arange(out, dtype=torch.long) * stride - padding        # in padded coordinates
    end = torch.clamp(start + kernel, max=padded + padding)
    pos = start[:, None] + torch.arange(kernel, dtype=torch.long)[None, :]
    inside = pos < end[:, None]
    in_tensor = (pos >= 0) & (pos < padded)
    counted = inside if count_include_pad else inside & in_tensor
    real = inside & (pos >= pad_before) & (pos < pad_before + size)
    return _Windows((pos - pad_before).clamp(0, max(size - 1, 0)), counted, real)


def _adaptive_windows(size: int, out: int) -> _Windows:
    """Windows of ``adaptive_avg_pool`` along one dimension: ``[floor(iH/O), ceil((i+1)H/O))``."""
    i = torch.arange(out, dtype=torch.long)
    start = (i * size) // out
    end = -((-(i + 1) * size) // out)
    width = int((end - start).max()) if out > 0 else 1
    pos = start[:, None] + torch.arange(width, dtype=torch.long)[None, :]
    inside = pos < end[:, None]
    return _Windows(pos.clamp(0, max(size - 1, 0)), inside, inside)


class _Table(NamedTuple):
    """2D window table of one input size, on one device (cached)."""

    out_hw: Tuple[int, int]
    index: torch.Tensor    # (L, J) long: flat input index h * W + w of each candidate
    counted: torch.Tensor  # (L, J) bool
    real: torch.Tensor     # (L, J) bool
    kept: torch.Tensor     # (L,) long: k per window
    scale: torch.Tensor    # (L,) op-math dtype: K / (k * divisor), computed in float64
    k_max: int
    trivial: bool          # every window keeps all its positions: SAP == plain op


def _build_table(wh: _Windows, ww: _Windows, width: int, keep_prob: float,
                 divisor_override: Optional[int], device: torch.device, dtype: torch.dtype) -> _Table:
    oh, jh = wh.pos.shape
    ow, jw = ww.pos.shape
    index = (wh.pos[:, None, :, None] * width + ww.pos[None, :, None, :]).reshape(oh * ow, jh * jw)
    counted = (wh.counted[:, None, :, None] & ww.counted[None, :, None, :]).reshape(oh * ow, jh * jw)
    real = (wh.real[:, None, :, None] & ww.real[None, :, None, :]).reshape(oh * ow, jh * jw)
    size = counted.sum(-1)
    kept = num_kept(size, keep_prob)
    divisor = size.to(torch.float64) if divisor_override is None else float(divisor_override)
    scale = size.to(torch.float64) / (kept.to(torch.float64) * divisor)
    k_max = int(kept.max()) if kept.numel() else 1
    trivial = bool((kept == size).all())
    return _Table((oh, ow), index.to(device), counted.to(device), real.to(device), kept.to(device),
                  scale.to(dtype).to(device), k_max, trivial)


@lru_cache(maxsize=256)
def _avg_pool_table(hw: Tuple[int, int], kernel: Tuple[int, int], stride: Tuple[int, int],
                    padding: Tuple[int, int], ceil_mode: bool, count_include_pad: bool,
                    divisor_override: Optional[int], same_pad: Optional[Tuple[int, int, int, int]],
                    keep_prob: float, device: torch.device, dtype: torch.dtype) -> _Table:
    pl, pr, pt, pb = same_pad if same_pad is not None else (0, 0, 0, 0)
    wh = _pool_windows(hw[0], kernel[0], stride[0], padding[0], ceil_mode, count_include_pad, pt, pb)
    ww = _pool_windows(hw[1], kernel[1], stride[1], padding[1], ceil_mode, count_include_pad, pl, pr)
    return _build_table(wh, ww, hw[1], keep_prob, divisor_override, device, dtype)


@lru_cache(maxsize=256)
def _adaptive_table(hw: Tuple[int, int], out_hw: Tuple[int, int], keep_prob: float,
                    device: torch.device, dtype: torch.dtype) -> _Table:
    return _build_table(_adaptive_windows(hw[0], out_hw[0]), _adaptive_windows(hw[1], out_hw[1]),
                        hw[1], keep_prob, None, device, dtype)


def _opmath(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32 for half / bfloat16 (as torch's pooling), else the input's."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) or not dtype.is_floating_point \
        else dtype


_VALIDATED: "OrderedDict[tuple, None]" = OrderedDict()
_VALIDATED_MAX = 1024


def _hashable(v):
    return tuple(_hashable(e) for e in v) if isinstance(v, (tuple, list)) else v


def _validate(key: tuple, x: torch.Tensor, plain: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Raise exactly what torch's pooling raises for this input (checked once per shape)."""
    vkey = _hashable(key) + (tuple(x.shape), x.dtype, x.device)
    if vkey in _VALIDATED:
        _VALIDATED.move_to_end(vkey)
        return
    with torch.no_grad():
        plain(x)
    _VALIDATED[vkey] = None
    if len(_VALIDATED) > _VALIDATED_MAX:
        _VALIDATED.popitem(last=False)


def _sample(x: torch.Tensor, table: _Table) -> torch.Tensor:
    """The SAP estimate of a batched ``(N, C, H, W)`` input for one window table."""
    n, c = x.shape[:2]
    num_windows, num_cand = table.index.shape
    k = table.k_max
    # Uniform random subset of k_l of the K_l counted candidates of every (sample, window):
    # the k_l smallest of i.i.d. uniform keys. One draw per (sample, window), shared by channels.
    keys = torch.rand(n, num_windows, num_cand, device=x.device)
    keys.masked_fill_(~table.counted, 2.0)
    slot = keys.topk(k, dim=-1, largest=False, sorted=True).indices                # (N, L, k)
    index = table.index.expand(n, -1, -1).gather(-1, slot)                          # (N, L, k)
    live = table.real.expand(n, -1, -1).gather(-1, slot)
    live &= torch.arange(k, device=x.device) < table.kept[:, None]                  # rank < k_l
    picked = x.flatten(2).gather(-1, index.reshape(n, 1, num_windows * k).expand(n, c, -1))
    picked = torch.where(live[:, None], picked.view(n, c, num_windows, k), 0)     # 0 for padding / not kept
    # sum in the op-math dtype, then one scale per window
    out = (picked.sum(-1, dtype=table.scale.dtype) * table.scale).to(x.dtype)
    out = out.view(n, c, *table.out_hw)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def _batched(x: torch.Tensor, spatial_dims: int) -> Tuple[torch.Tensor, bool]:
    """Add the batch dim to an unbatched input (torch pooling accepts both)."""
    if x.dim() == spatial_dims + 1:
        return x.unsqueeze(0), True
    return x, False


def _stochastic_pool(input: torch.Tensor, p: float, training: bool, plain: Callable[[torch.Tensor], torch.Tensor],
                     spatial_dims: int, key: Callable[[], tuple],
                     make_table: Callable[[torch.Tensor], _Table]) -> torch.Tensor:
    """The course every stochastic pool takes: ``plain`` in eval or for ``p == 1``; else sample its table.

    ``key()`` describes the call for :func:`_validate`; ``make_table(x)`` builds
    the window table of the batched input (1-D pools use a ``(1, L)`` grid).
    """
    if not training or p == 1.0:
        return plain(input)
    _validate(key(), input, plain)
    x, unbatched = _batched(input, spatial_dims)
    table = make_table(x)
    if table.trivial:
        out = plain(x)
    elif spatial_dims == 2:
        out = _sample(x, table)
    else:
        out = _sample(x.unsqueeze(-2), table).squeeze(-2)
    return out.squeeze(0) if unbatched else out


# --------------------------------------------------------------------------- functional


def _same_pad(hw: Sequence[int], kernel: Tuple[int, int], stride: Tuple[int, int]) -> Tuple[int, int, int, int]:
    """timm's ``pad_same`` amounts (left, right, top, bottom) for dilation 1."""
    pads = []
    for size, k, s in zip(hw, kernel, stride):
        pads.append(max((-(size // -s) - 1) * s + k - size, 0))
    ph, pw = pads
    return pw // 2, pw - pw // 2, ph // 2, ph - ph // 2


def stochastic_avg_pool2d(input: torch.Tensor, kernel_size: _Size2, stride: Optional[_Size2] = None,
                          padding: _Size2 = 0, ceil_mode: bool = False, count_include_pad: bool = True,
                          divisor_override: Optional[int] = None, keep_prob: float = 0.5,
                          training: bool = True, same_padding: bool = False) -> torch.Tensor:
    """Stochastic ``F.avg_pool2d``: see the module docstring for the estimator.

    Args:
        input: ``(N, C, H, W)`` or ``(C, H, W)``.
        kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override:
            as in :func:`torch.nn.functional.avg_pool2d`.
        keep_prob: Fraction ``p`` in (0, 1] of each window that is kept in training.
        training: When False, this is exactly ``F.avg_pool2d`` (bit-identical).
        same_padding: Pad like timm's ``AvgPool2dSame`` (TensorFlow 'SAME', zero
            padding counted in the mean) before pooling with ``padding``.

    Returns:
        The pooled tensor, the shape ``F.avg_pool2d`` gives.
    """
    p = check_keep_prob(keep_prob)
    kernel = _pair(kernel_size)
    stride_t = kernel if (stride is None or (isinstance(stride, (tuple, list)) and len(stride) == 0)) \
        else _pair(stride)

    def plain(x: torch.Tensor) -> torch.Tensor:
        if same_padding:
            x = F.pad(x, _same_pad(x.shape[-2:], kernel, stride_t))
        return F.avg_pool2d(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)

    def table(x: torch.Tensor) -> _Table:
        hw = tuple(x.shape[-2:])
        return _avg_pool_table(hw, kernel, stride_t, _pair(padding), bool(ceil_mode), bool(count_include_pad),
                               divisor_override, _same_pad(hw, kernel, stride_t) if same_padding else None, p,
                               x.device, _opmath(x.dtype))

    return _stochastic_pool(input, p, training, plain, 2, lambda: (
        "avg2d", kernel, stride_t, padding, ceil_mode, count_include_pad, divisor_override, same_padding), table)


def stochastic_avg_pool1d(input: torch.Tensor, kernel_size: Union[int, Tuple[int]],
                          stride: Optional[Union[int, Tuple[int]]] = None, padding: Union[int, Tuple[int]] = 0,
                          ceil_mode: bool = False, count_include_pad: bool = True, keep_prob: float = 0.5,
                          training: bool = True) -> torch.Tensor:
    """Stochastic ``F.avg_pool1d`` on ``(N, C, L)`` or ``(C, L)``; see :func:`stochastic_avg_pool2d`."""
    p = check_keep_prob(keep_prob)

    def plain(x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool1d(x, kernel_size, stride, padding, ceil_mode, count_include_pad)

    def window() -> Tuple[int, int, int]:  # kernel, stride, padding as ints
        one = lambda v: v[0] if isinstance(v, (tuple, list)) else v  # noqa: E731
        k = one(kernel_size)
        s = k if stride is None or (isinstance(stride, (tuple, list)) and len(stride) == 0) else one(stride)
        return k, s, one(padding)

    def table(x: torch.Tensor) -> _Table:
        k, s, pad = window()
        return _avg_pool_table((1, x.shape[-1]), (1, k), (1, s), (0, pad), bool(ceil_mode),
                               bool(count_include_pad), None, None, p, x.device, _opmath(x.dtype))

    return _stochastic_pool(input, p, training, plain, 1, lambda: ("avg1d", *window(), ceil_mode, count_include_pad),
                            table)


def _adaptive_out(output_size, hw: Sequence[int]) -> Tuple[int, ...]:
    sizes = _pair(output_size) if len(hw) == 2 else (
        output_size[0] if isinstance(output_size, (tuple, list)) else output_size,)
    return tuple(int(h) if o is None else int(o) for o, h in zip(sizes, hw))


def stochastic_adaptive_avg_pool2d(input: torch.Tensor, output_size: _OptSize2, keep_prob: float = 0.5,
                                   training: bool = True) -> torch.Tensor:
    """Stochastic ``F.adaptive_avg_pool2d`` (global pooling is ``output_size=1``).

    Args:
        input: ``(N, C, H, W)`` or ``(C, H, W)``.
        output_size: As in :func:`torch.nn.functional.adaptive_avg_pool2d`
            (``None`` keeps that input size).
        keep_prob: Fraction ``p`` in (0, 1] of each window that is kept in training.
        training: When False, this is exactly ``F.adaptive_avg_pool2d``.
    """
    p = check_keep_prob(keep_prob)

    def plain(x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, output_size)

    def table(x: torch.Tensor) -> _Table:
        hw = tuple(x.shape[-2:])
        return _adaptive_table(hw, _adaptive_out(output_size, hw), p, x.device, _opmath(x.dtype))

    return _stochastic_pool(input, p, training, plain, 2, lambda: ("adaptive2d", output_size), table)


def stochastic_adaptive_avg_pool1d(input: torch.Tensor, output_size: Union[int, Tuple[int]],
                                   keep_prob: float = 0.5, training: bool = True) -> torch.Tensor:
    """Stochastic ``F.adaptive_avg_pool1d`` on ``(N, C, L)`` or ``(C, L)``."""
    p = check_keep_prob(keep_prob)

    def plain(x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool1d(x, output_size)

    def table(x: torch.Tensor) -> _Table:
        return _adaptive_table((1, x.shape[-1]), (1,) + _adaptive_out(output_size, x.shape[-1:]), p, x.device,
                               _opmath(x.dtype))

    return _stochastic_pool(input, p, training, plain, 1, lambda: ("adaptive1d", output_size), table)


# --------------------------------------------------------------------------- modules


def _timm_class(name: str) -> Optional[type]:
    """A class from ``timm.layers`` if timm is installed (the layer itself never needs timm)."""
    try:
        import timm.layers as tl
    except ImportError:
        return None
    if name == "FastAdaptiveAvgPool":
        from timm.layers.adaptive_avgmax_pool import FastAdaptiveAvgPool
        return FastAdaptiveAvgPool
    return getattr(tl, name, None)


def _check_scripted_eval(training: bool, name: str) -> None:
    """Under TorchScript a SAP pool is its plain pool (evaluation); its training sampling is Python-only."""
    if training:
        raise RuntimeError(f"{name} under TorchScript runs in evaluation mode only (there it is exactly the "
                           f"plain average pool); its stochastic training runs in eager mode or torch.compile: "
                           f"call .eval() on the scripted model, or train the unscripted one")


def _unsupported(cls: type, pool: nn.Module, accepted: str) -> TypeError:
    return TypeError(f"{cls.__name__}.from_module got {type(pool).__module__}.{type(pool).__name__}; "
                     f"it converts {accepted}")


class StochasticAvgPool2d(nn.AvgPool2d):
    """``nn.AvgPool2d`` with stochastic average pooling in training.

    Same arguments and eval behaviour as :class:`torch.nn.AvgPool2d`, plus
    ``keep_prob``. In training every window averages a random subset of
    ``max(1, floor(keep_prob * K + 0.5))`` of its ``K`` positions, one subset
    per sample and window shared by all channels (Kim & Kim, "Stochastic
    Subsampling With Average Pooling", arXiv 2409.16630).

    Args:
        kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override:
            as in :class:`torch.nn.AvgPool2d`.
        keep_prob: Fraction of each window kept in training, in (0, 1]; 1 is plain pooling.
    """

    same_padding: bool = False

    def __init__(self, kernel_size: _Size2, stride: Optional[_Size2] = None, padding: _Size2 = 0,
                 ceil_mode: bool = False, count_include_pad: bool = True,
                 divisor_override: Optional[int] = None, keep_prob: float = 0.5) -> None:
        super().__init__(kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
        self.keep_prob = check_keep_prob(keep_prob)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            _check_scripted_eval(self.training, "StochasticAvgPool2d")
            return F.avg_pool2d(input, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                                self.count_include_pad, self.divisor_override)  # nn.AvgPool2d's forward
        if not self.training and not self.same_padding:
            return super().forward(input)  # eval: literally nn.AvgPool2d
        return stochastic_avg_pool2d(input, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                                     self.count_include_pad, self.divisor_override, self.keep_prob,
                                     self.training, self.same_padding)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", keep_prob={self.keep_prob}"

    @classmethod
    def from_module(cls, pool: nn.AvgPool2d, keep_prob: float = 0.5) -> "StochasticAvgPool2d":
        """The SAP version of ``nn.AvgPool2d`` or timm's ``AvgPool2dSame`` (same arguments and mode)."""
        same_cls = _timm_class("AvgPool2dSame")
        if same_cls is not None and type(pool) is same_cls:
            new: StochasticAvgPool2d = StochasticAvgPool2dSame(
                pool.kernel_size, pool.stride, ceil_mode=pool.ceil_mode,
                count_include_pad=pool.count_include_pad, keep_prob=keep_prob)
        elif type(pool) is nn.AvgPool2d:
            new = StochasticAvgPool2d(pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode,
                                      pool.count_include_pad, pool.divisor_override, keep_prob)
        else:
            raise _unsupported(cls, pool, "torch.nn.AvgPool2d and timm.layers.AvgPool2dSame")
        return new.train(pool.training)


class StochasticAvgPool2dSame(StochasticAvgPool2d):
    """SAP version of timm's ``AvgPool2dSame`` (TensorFlow 'SAME' padding).

    The input is zero padded like timm's ``pad_same`` and then pooled without
    pooling padding, so the padded zeros are positions of their windows (they
    count in ``K`` and in the mean, as in timm's op). ``padding`` is accepted and
    ignored, as in timm.
    """

    same_padding = True

    def __init__(self, kernel_size: _Size2, stride: Optional[_Size2] = None, padding: _Size2 = 0,
                 ceil_mode: bool = False, count_include_pad: bool = True, keep_prob: float = 0.5) -> None:
        kernel = _pair(kernel_size)
        super().__init__(kernel, _pair(stride) if stride is not None else kernel, (0, 0),
                         ceil_mode, count_include_pad, None, keep_prob)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            _check_scripted_eval(self.training, "StochasticAvgPool2dSame")
            ih, iw = input.shape[-2], input.shape[-1]
            kh, kw = self.kernel_size[0], self.kernel_size[1]
            sh, sw = self.stride[0], self.stride[1]
            ph = max((-(ih // -sh) - 1) * sh + kh - ih, 0)  # timm's pad_same (dilation 1), as in _same_pad
            pw = max((-(iw // -sw) - 1) * sw + kw - iw, 0)
            x = F.pad(input, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
            return F.avg_pool2d(x, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                                self.count_include_pad)
        return stochastic_avg_pool2d(input, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                                     self.count_include_pad, None, self.keep_prob, self.training, True)


class StochasticAdaptiveAvgPool2d(nn.AdaptiveAvgPool2d):
    """``nn.AdaptiveAvgPool2d`` with stochastic average pooling in training.

    Global average pooling is ``output_size=1``; PSP's pyramid bins are other
    sizes (windows of unequal size are handled, each with its own ``K``).

    Args:
        output_size: As in :class:`torch.nn.AdaptiveAvgPool2d`.
        keep_prob: Fraction of each window kept in training, in (0, 1].
        flatten: Flatten the output from dim 1 (as timm's global pools with
            ``flatten=True`` do).
    """

    def __init__(self, output_size: _OptSize2, keep_prob: float = 0.5, flatten: bool = False) -> None:
        super().__init__(output_size)
        self.keep_prob = check_keep_prob(keep_prob)
        self.flatten = bool(flatten)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            _check_scripted_eval(self.training, "StochasticAdaptiveAvgPool2d")
            out = F.adaptive_avg_pool2d(input, self.output_size)  # nn.AdaptiveAvgPool2d's forward
        elif self.training:
            out = stochastic_adaptive_avg_pool2d(input, self.output_size, self.keep_prob)
        else:
            out = super().forward(input)  # eval: literally nn.AdaptiveAvgPool2d
        return out.flatten(1) if self.flatten else out

    def extra_repr(self) -> str:
        return super().extra_repr() + f", keep_prob={self.keep_prob}" + (", flatten=True" if self.flatten else "")

    @classmethod
    def from_module(cls, pool: nn.Module, keep_prob: float = 0.5) -> "StochasticAdaptiveAvgPool2d":
        """The SAP version of an adaptive average pool.

        Accepts ``nn.AdaptiveAvgPool2d``, timm's ``FastAdaptiveAvgPool`` (NCHW)
        and timm's ``SelectAdaptivePool2d`` with an average pool type
        (``'avg'``, ``'fast'``, ``'fastavg'``); the result keeps their output
        size and flattening.
        """
        select_cls = _timm_class("SelectAdaptivePool2d")
        fast_cls = _timm_class("FastAdaptiveAvgPool")
        training = pool.training
        flatten = False
        if select_cls is not None and type(pool) is select_cls:
            if type(pool.pool) not in (nn.AdaptiveAvgPool2d, fast_cls):
                raise ValueError(f"SelectAdaptivePool2d(pool_type={pool.pool_type!r}) has no average pooling "
                                 f"to make stochastic; SAP converts pool_type 'avg', 'fast' or 'fastavg'")
            flatten = isinstance(pool.flatten, nn.Flatten)
            pool = pool.pool
        if fast_cls is not None and type(pool) is fast_cls:
            if tuple(pool.dim) != (2, 3):
                raise ValueError(f"FastAdaptiveAvgPool reduces dims {pool.dim} (input_fmt NHWC); SAP supports "
                                 f"NCHW (dims (2, 3)) only")
            return cls(1, keep_prob, flatten=flatten or pool.flatten).train(training)
        if type(pool) is nn.AdaptiveAvgPool2d:
            return cls(pool.output_size, keep_prob, flatten=flatten).train(training)
        raise _unsupported(cls, pool, "torch.nn.AdaptiveAvgPool2d and timm's FastAdaptiveAvgPool / "
                                      "SelectAdaptivePool2d('avg')")


class StochasticAvgPool1d(nn.AvgPool1d):
    """``nn.AvgPool1d`` with stochastic average pooling in training (see :class:`StochasticAvgPool2d`)."""

    def __init__(self, kernel_size: Union[int, Tuple[int]], stride: Optional[Union[int, Tuple[int]]] = None,
                 padding: Union[int, Tuple[int]] = 0, ceil_mode: bool = False, count_include_pad: bool = True,
                 keep_prob: float = 0.5) -> None:
        super().__init__(kernel_size, stride, padding, ceil_mode, count_include_pad)
        self.keep_prob = check_keep_prob(keep_prob)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            _check_scripted_eval(self.training, "StochasticAvgPool1d")
            return F.avg_pool1d(input, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                                self.count_include_pad)  # nn.AvgPool1d's forward
        if not self.training:
            return super().forward(input)  # eval: literally nn.AvgPool1d
        return stochastic_avg_pool1d(input, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                                     self.count_include_pad, self.keep_prob, self.training)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", keep_prob={self.keep_prob}"

    @classmethod
    def from_module(cls, pool: nn.AvgPool1d, keep_prob: float = 0.5) -> "StochasticAvgPool1d":
        """The SAP version of an ``nn.AvgPool1d``."""
        if type(pool) is not nn.AvgPool1d:
            raise _unsupported(cls, pool, "torch.nn.AvgPool1d")
        return cls(pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode, pool.count_include_pad,
                   keep_prob).train(pool.training)


class StochasticAdaptiveAvgPool1d(nn.AdaptiveAvgPool1d):
    """``nn.AdaptiveAvgPool1d`` with stochastic average pooling in training."""

    def __init__(self, output_size: Union[int, Tuple[int]], keep_prob: float = 0.5) -> None:
        super().__init__(output_size)
        self.keep_prob = check_keep_prob(keep_prob)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            _check_scripted_eval(self.training, "StochasticAdaptiveAvgPool1d")
            return F.adaptive_avg_pool1d(input, self.output_size)  # nn.AdaptiveAvgPool1d's forward
        if not self.training:
            return super().forward(input)  # eval: literally nn.AdaptiveAvgPool1d
        return stochastic_adaptive_avg_pool1d(input, self.output_size, self.keep_prob)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", keep_prob={self.keep_prob}"

    @classmethod
    def from_module(cls, pool: nn.AdaptiveAvgPool1d, keep_prob: float = 0.5) -> "StochasticAdaptiveAvgPool1d":
        """The SAP version of an ``nn.AdaptiveAvgPool1d``."""
        if type(pool) is not nn.AdaptiveAvgPool1d:
            raise _unsupported(cls, pool, "torch.nn.AdaptiveAvgPool1d")
        return cls(pool.output_size, keep_prob).train(pool.training)


STOCHASTIC_POOL_TYPES: Tuple[type, ...] = (StochasticAvgPool2d, StochasticAdaptiveAvgPool2d,
                                           StochasticAvgPool1d, StochasticAdaptiveAvgPool1d)


# --------------------------------------------------------------------------- model conversion


def _converters() -> List[Tuple[type, Callable[[nn.Module, float], nn.Module]]]:
    """Exact pool class -> converter. Subclasses are not matched (their forward may differ)."""
    table: List[Tuple[type, Callable]] = [
        (nn.AvgPool2d, StochasticAvgPool2d.from_module),
        (nn.AdaptiveAvgPool2d, StochasticAdaptiveAvgPool2d.from_module),
        (nn.AvgPool1d, StochasticAvgPool1d.from_module),
        (nn.AdaptiveAvgPool1d, StochasticAdaptiveAvgPool1d.from_module),
    ]
    for name, fn in (("AvgPool2dSame", StochasticAvgPool2d.from_module),
                     ("FastAdaptiveAvgPool", StochasticAdaptiveAvgPool2d.from_module)):
        cls = _timm_class(name)
        if cls is not None:
            table.append((cls, fn))
    return table


def _as_patterns(patterns: Optional[Union[str, Iterable[str]]], arg: str) -> Optional[List[str]]:
    if patterns is None:
        return None
    if isinstance(patterns, str):
        return [patterns]
    out = list(patterns)
    if not all(isinstance(p, str) for p in out):
        raise TypeError(f"{arg} must be a module-name pattern or a list of them, got {patterns!r}")
    return out


def convert_to_stochastic_pooling(module: nn.Module, keep_prob: float = 0.5,
                                  include: Optional[Union[str, Iterable[str]]] = None,
                                  exclude: Optional[Union[str, Iterable[str]]] = None) -> nn.Module:
    """Replace the average pools of a model by their SAP versions, in place.

    Converted: ``nn.AvgPool1d/2d``, ``nn.AdaptiveAvgPool1d/2d``, timm's
    ``AvgPool2dSame`` and ``FastAdaptiveAvgPool`` (so timm's
    ``SelectAdaptivePool2d('avg'/'fast')`` keeps its class and ``pool_type`` and
    gets a stochastic inner pool). Pools that are already stochastic are left
    as they are. No parameters or buffers are added, so state dicts are
    unchanged; each new pool keeps the train/eval mode of the one it replaces.

    Args:
        module: Any ``nn.Module`` (a timm or mmseg model); if it is itself a
            pool, the converted pool is returned.
        keep_prob: Fraction of each window kept in training, in (0, 1].
        include: ``fnmatch`` pattern(s) over qualified module names
            (``model.named_modules()``), e.g. ``'decode_head.*'``; only pools
            matching one are converted. ``None`` converts every supported pool.
        exclude: Pattern(s) of pools to leave unchanged.

    Returns:
        ``module`` (converted in place), or the new pool when ``module`` is one.

    Raises:
        ValueError: An ``include`` pattern matches no supported average pool
            (a typo would otherwise silently convert nothing).
        TypeError: A matched module subclasses an average pool with unknown
            behaviour; name it in ``exclude`` to keep it.
    """
    keep_prob = check_keep_prob(keep_prob)
    inc = _as_patterns(include, "include")
    exc = _as_patterns(exclude, "exclude") or []
    table = _converters()
    exact = {cls: fn for cls, fn in table}
    pool_bases = (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)

    def selected(name: str) -> bool:
        if any(fnmatch.fnmatchcase(name, p) for p in exc):
            return False
        return inc is None or any(fnmatch.fnmatchcase(name, p) for p in inc)

    hits = set()
    replace: List[Tuple[str, nn.Module]] = []
    for name, child in module.named_modules():
        if isinstance(child, STOCHASTIC_POOL_TYPES):
            continue
        kind = type(child)
        if kind not in exact and not isinstance(child, pool_bases):
            continue
        if not selected(name):
            continue
        if kind not in exact:
            raise TypeError(f"{name or 'the module'} is a {kind.__module__}.{kind.__name__}, a subclass of an "
                            f"average pool whose behaviour SAP cannot reproduce; add {name!r} to exclude= "
                            f"to leave it unchanged")
        if inc is not None:
            hits.update(p for p in inc if fnmatch.fnmatchcase(name, p))
        replace.append((name, exact[kind](child, keep_prob)))
    if inc is not None:
        missed = [p for p in inc if p not in hits]
        if missed:
            pools = [n for n, m in module.named_modules() if type(m) in exact or isinstance(m, pool_bases)]
            raise ValueError(f"include pattern(s) {missed} match no supported average pool of "
                             f"{type(module).__name__}; its average pools are {pools}")
    for name, new in replace:
        if not name:
            return new
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, new)
    return module
