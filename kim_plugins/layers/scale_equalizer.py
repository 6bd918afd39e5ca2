"""Scale equalizers: standardise upsampled features before multi-level fusion.

Paper: Bum Jun Kim, Sang Woo Kim, "Scale Equalization for Multi-Level Feature
Fusion", TMLR 2024, arXiv 2402.01149.

Bilinear upsampling lowers a feature map's variance (for i.i.d. input and
``align_corners=False``: x2 -> 0.39, x4 -> 0.43, limit 4/9, see
:func:`bilinear_upsampling_variance_ratio`), so the branches a decoder
concatenates or adds are on different scales. A scale equalizer placed after
every bilinear upsampling whose output is fused computes [paper]::

    SE(x) = (x - mu) / sqrt(var + eps)

with *scalar* ``mu`` and ``var`` (one pair per equalizer, over all N*C*H*W
elements, population variance) and no learnable affine.

Statistics modes:

- ``'dataset'`` (default) [paper wording, details are a decision]: ``mu`` and
  ``var`` are the global mean / variance of the equalizer's input over
  training data, measured once by :func:`calibrate_scale_equalizers` before
  training and then frozen.
- ``'batch'`` [decision, option]: BatchNorm-like, the statistics of the
  current batch in training (gradients flow through them) and running
  estimates (``momentum``) in eval. The statistics are computed in float32
  (float64 for float64 input) whatever the input dtype, and, under
  ``torch.distributed`` with more than one process, over the global batch
  (count / mean / M2 all-reduced like SyncBN; ``sync_batch_stats=False``
  keeps them per process).

In eval an equalizer is a constant affine map; :func:`fold_scale_equalizers`
folds it into the convolution that consumes it (:func:`fold_input_affine`),
exactly, zero padding included, so the equalizers cost nothing at inference.

Nothing here imports timm or mmseg.
"""
from __future__ import annotations

import contextlib
import math
import random
import warnings
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .module_modes import restored_modes

__all__ = [
    "SE_MODES",
    "ScaleEqualizer",
    "calibrate_scale_equalizers",
    "fold_scale_equalizers",
    "fold_input_affine",
    "BorderCorrectedConv2d",
    "bilinear_upsampling_variance_ratio",
    "merge_moments",
    "forked_rng",
]

SE_MODES = ("dataset", "batch")

_HOOK_HINT = ("add ScaleEqualizerCalibrationHook to the config's custom_hooks "
              "(custom_hooks=[dict(type='ScaleEqualizerCalibrationHook', num_batches=50)]) or call "
              "kim_plugins.layers.scale_equalizer.calibrate_scale_equalizers(model, batches) before training")


def bilinear_upsampling_variance_ratio(factor: int) -> float:
    """Variance ratio Var(up(x)) / Var(x) of 2-D bilinear upsampling of i.i.d. input.

    ``align_corners=False``, integer ``factor``, interior pixels (away from the
    clamped borders). Output pixel k along an axis samples the source at
    ``(k + 0.5) / factor - 0.5``; with fractional part ``f`` its two weights are
    ``(1 - f, f)``, so its variance is ``(1 - f)^2 + f^2`` times the input's.
    The 2-D ratio is the square of the 1-D average: x2 -> 0.390625,
    x4 -> 0.4306640625, x8 -> 0.44097900390625, limit 4/9.

    Args:
        factor: Integer upsampling factor >= 1.

    Returns:
        The analytic variance ratio.
    """
    if not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be an int >= 1, got {factor!r}")
    one_d = 0.0
    for k in range(factor):
        f = ((k + 0.5) / factor - 0.5) % 1.0
        one_d += (1.0 - f) ** 2 + f ** 2
    return (one_d / factor) ** 2


def merge_moments(a: Tuple[float, torch.Tensor, torch.Tensor],
                  b: Tuple[float, torch.Tensor, torch.Tensor]) -> Tuple[float, torch.Tensor, torch.Tensor]:
    """Merge (count, mean, M2) of two disjoint sample sets (Chan et al.'s parallel formula).

    ``M2`` is the sum of squared deviations from the mean, so the population
    variance of the union is ``M2 / count``.
    """
    n_a, mean_a, m2_a = a
    n_b, mean_b, m2_b = b
    if n_a == 0:
        return b
    if n_b == 0:
        return a
    n = n_a + n_b
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / n)
    m2 = m2_a + m2_b + delta * delta * (n_a * n_b / n)
    return n, mean, m2


class ScaleEqualizer(nn.Module):
    """Scalar standardisation ``(x - mu) / sqrt(var + eps)`` of a fused branch.

    From "Scale Equalization for Multi-Level Feature Fusion" (Kim & Kim, TMLR
    2024, arXiv 2402.01149). One scalar mean and variance over all N*C*H*W
    elements (population variance), no learnable affine.

    Args:
        mode: ``'dataset'`` (default): statistics measured by
            :func:`calibrate_scale_equalizers`, then frozen. ``'batch'``
            [decision, option]: batch statistics in training, running
            estimates in eval.
        eps: Added to the variance inside the square root (> 0).
        momentum: Running-estimate update rate of ``'batch'`` mode, in (0, 1].
        allow_uncalibrated: Let an uncalibrated ``'dataset'`` equalizer run in
            eval with its initial statistics (mean 0, variance 1), e.g. for
            FLOP counts. Training uncalibrated is always an error.
        sync_batch_stats: ``'batch'`` mode under ``torch.distributed`` with
            more than one process: standardise with the statistics of the
            global batch (default; count, mean and M2 of every process are
            all-reduced and merged with Chan's formula, differentiably, like
            SyncBN). False: each process uses its own batch.

    Buffers (in the state dict): ``mean``, ``var`` (float32 scalars; the
    calibrated statistics in ``'dataset'`` mode, the running estimates in
    ``'batch'`` mode) and ``calibrated`` (bool). ``'batch'`` statistics are
    computed in float32 (or float64) whatever the input dtype, so an fp16 /
    bf16 input whose variance exceeds its dtype's range is standardised
    correctly; a batch whose statistics are not finite (an input that already
    holds inf / NaN) leaves the running estimates unchanged.
    """

    def __init__(self, mode: str = "dataset", eps: float = 1e-5, momentum: float = 0.1,
                 allow_uncalibrated: bool = False, sync_batch_stats: bool = True) -> None:
        super().__init__()
        if mode not in SE_MODES:
            raise ValueError(f"ScaleEqualizer mode={mode!r} is not one of {SE_MODES}: use 'dataset' "
                             f"(calibrated, frozen statistics, the paper's default) or 'batch' (BatchNorm-like)")
        if not (isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps)):
            raise ValueError(f"ScaleEqualizer eps={eps!r} must be a finite float > 0 (default 1e-5); it keeps "
                             f"the output finite for a zero-variance input")
        if not (isinstance(momentum, (int, float)) and 0 < momentum <= 1):
            raise ValueError(f"ScaleEqualizer momentum={momentum!r} must be in (0, 1] (default 0.1)")
        if not isinstance(sync_batch_stats, bool):
            raise TypeError(f"ScaleEqualizer sync_batch_stats={sync_batch_stats!r} must be a bool (default True: "
                            f"global batch statistics across processes)")
        self.mode = mode
        self.sync_batch_stats = sync_batch_stats
        self.eps = float(eps)
        self.momentum = float(momentum)
        self.allow_uncalibrated = bool(allow_uncalibrated)
        self.register_buffer("mean", torch.zeros(()))
        self.register_buffer("var", torch.ones(()))
        self.register_buffer("calibrated", torch.tensor(False))
        # Calibration state (never saved): begin_probe / begin_calibration / finish_calibration move it.
        self._calib: Optional[str] = None  # None | 'probe' | 'accumulate' | 'pass'
        self._acc: Tuple[float, torch.Tensor, torch.Tensor] = (0, torch.zeros(()), torch.zeros(()))
        self._probe_in: Optional[torch.Tensor] = None
        self._probe_out: Optional[torch.Tensor] = None

    def extra_repr(self) -> str:
        sync = f", sync_batch_stats={self.sync_batch_stats}" if self.mode == "batch" else ""
        return f"mode={self.mode!r}, eps={self.eps}, momentum={self.momentum}{sync}"

    @property
    def is_calibrated(self) -> bool:
        """Whether the statistics are usable (always true in ``'batch'`` mode)."""
        return self.mode == "batch" or bool(self.calibrated)

    @property
    def commutes_with_resize(self) -> bool:
        """True when the equalizer is a constant affine map right now (``'dataset'`` mode, not calibrating).

        Every ``F.interpolate`` mode computes each output as a weighted sum of
        inputs whose weights sum to 1, so ``resize(x) * s + t ==
        resize(x * s + t)``: the equalizer may then be applied to the smaller
        tensor before the upsampling, with the same result and gradient at a
        fraction of the cost. (``'batch'`` mode and calibration need the
        statistics of the upsampled tensor itself.)
        """
        return self.mode == "dataset" and self._calib is None

    def scale_shift(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The eval-time affine map ``x * scale + shift`` as float64 scalars."""
        scale = torch.rsqrt(self.var.double() + self.eps)
        return scale, -self.mean.double() * scale

    # -- calibration: the states calibrate_scale_equalizers moves every equalizer through --------------------

    def begin_probe(self) -> None:
        """Calibration step 1: uncalibrated; the next forward records its input and returns a fresh leaf copy.

        The leaf lets :func:`calibrate_scale_equalizers` find, in the autograd
        graph, which equalizers feed which (:meth:`end_probe` hands both back).
        """
        self.calibrated.fill_(False)
        self._calib, self._probe_in, self._probe_out = "probe", None, None

    def end_probe(self) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The (input, leaf) of the probe forward (``(None, None)`` if it was not reached); probing stops."""
        seen = (self._probe_in, self._probe_out)
        self._calib, self._probe_in, self._probe_out = None, None, None
        return seen

    def begin_calibration(self, measure: bool = True) -> None:
        """Calibration step 2: forwards pass the input through unchanged and, if ``measure``, observe it."""
        self._calib = "accumulate" if measure else "pass"
        self._acc = (0, torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64))

    def observe(self, x: torch.Tensor) -> None:
        """Merge the float64 (count, mean, M2) of ``x`` into the moments being measured."""
        if x.numel() == 0:
            return
        xd = x.detach().double()
        mean_b = xd.mean()
        m2_b = (xd - mean_b).square().sum()
        n, mean, m2 = self._acc
        if n == 0:
            self._acc = (x.numel(), mean_b, m2_b)
        else:
            self._acc = merge_moments((n, mean.to(mean_b.device), m2.to(mean_b.device)), (x.numel(), mean_b, m2_b))

    @property
    def observed_moments(self) -> Tuple[float, torch.Tensor, torch.Tensor]:
        """(count, mean, M2) observed since :meth:`begin_calibration` (this process only)."""
        return self._acc

    def finish_calibration(self, moments: Tuple[float, torch.Tensor, torch.Tensor]) -> Tuple[float, float]:
        """Calibration step 3: store ``moments`` (count > 0) as the statistics and run as an equalizer again.

        Returns:
            The stored ``(mean, population variance)``.
        """
        n, mean, m2 = moments
        stats = (float(mean), float(m2) / n)
        self.mean.fill_(stats[0])
        self.var.fill_(stats[1])
        self.calibrated.fill_(True)
        self._calib = None
        return stats

    def reset_calibration(self) -> None:
        """Leave any calibration state (statistics untouched): run as an equalizer again."""
        self._calib, self._probe_in, self._probe_out = None, None, None
        self._acc = (0, torch.zeros(()), torch.zeros(()))

    def _calibration_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._calib == "probe":
            self._probe_in = x
            leaf = x.detach().requires_grad_(True)
            self._probe_out = leaf
            return leaf.clone()
        if self._calib == "accumulate":
            self.observe(x)
        return x

    def _batch_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``'batch'`` mode in training: (global) batch statistics in float32+, running estimates updated."""
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
        var, mean = torch.var_mean(xf, dim=None, correction=0)
        if self.sync_batch_stats and _world_size() > 1:
            mean, var = _global_moments(xf.numel(), mean, var)
        with torch.no_grad():
            finite = torch.isfinite(mean) & torch.isfinite(var)
            for buf, new in ((self.mean, mean), (self.var, var)):
                updated = torch.lerp(buf, new.detach().to(buf.dtype), self.momentum)
                buf.copy_(torch.where(finite, updated, buf))  # no host sync; a non-finite batch is skipped
        return ((xf - mean) * torch.rsqrt(var + self.eps)).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._calib is not None:
            return self._calibration_forward(x)
        if self.mode == "batch" and self.training:
            return self._batch_forward(x)
        if self.mode == "dataset" and not bool(self.calibrated):
            if self.training:
                raise RuntimeError(f"ScaleEqualizer(mode='dataset') is not calibrated and cannot train: {_HOOK_HINT}. "
                                   f"(Or use se_mode='batch'.)")
            if not self.allow_uncalibrated:
                raise RuntimeError(f"ScaleEqualizer(mode='dataset') is not calibrated: load a checkpoint trained with "
                                   f"it, {_HOOK_HINT}, or build it with allow_uncalibrated=True (benchmarks, FLOP "
                                   f"counts) to run with mean 0 / variance 1")
        scale = torch.rsqrt(self.var + self.eps)
        shift = -self.mean * scale
        return torch.addcmul(shift.to(x.dtype), x, scale.to(x.dtype))


def _world_size() -> int:
    import torch.distributed as dist
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _global_moments(count: int, mean: torch.Tensor, var: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean and population variance of the union of every process's batch, differentiable (like SyncBN).

    Each process contributes its row ``(count, mean, M2)`` to a ``(world, 3)``
    table that one all-reduce (sum) fills on every process; the rows are
    merged with Chan's parallel formula. The all-reduce is autograd-aware
    (:func:`torch.distributed.nn.functional.all_reduce`), so the gradient of
    every process's loss reaches every process's input through the shared
    statistics, as SyncBN's does.
    """
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_reduce

    n = torch.full((), float(count), dtype=mean.dtype, device=mean.device)
    row = torch.stack([n, mean, var * n])
    rank, world = dist.get_rank(), dist.get_world_size()
    zeros = row.new_zeros(3)
    table = all_reduce(torch.stack([row if r == rank else zeros for r in range(world)]))
    counts, means, m2s = table.unbind(1)
    total = counts.sum()
    global_mean = (counts * means).sum() / total
    m2 = (m2s + counts * (means - global_mean).square()).sum()
    return global_mean, m2 / total


# --------------------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------------------

def _default_forward(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, dict):
        return model(**batch)
    return model(batch)


def _is_stochastic_regulariser(m: nn.Module) -> bool:
    """Dropout-like modules switched off during calibration (dropout, drop path, drop block, SAP)."""
    if isinstance(m, nn.modules.dropout._DropoutNd):
        return True
    name = type(m).__name__
    return any(key in name for key in ("DropPath", "DropBlock", "Stochastic")) or bool(
        getattr(m, "stochastic_in_training", False))


@contextlib.contextmanager
def forked_rng(devices: Sequence[torch.device] = ()) -> Iterator[None]:
    """Restore the torch (CPU + the given CUDA devices), numpy and python RNG states on exit."""
    cuda_ids = sorted({d.index if d.index is not None else torch.cuda.current_device()
                       for d in devices if d.type == "cuda"})
    np_state = np.random.get_state()
    py_state = random.getstate()
    with torch.random.fork_rng(devices=cuda_ids):
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


def _depends_on(t: Optional[torch.Tensor], leaves: Dict[int, int]) -> set:
    """Indices of the probe leaves reachable from ``t``'s autograd graph."""
    found: set = set()
    if t is None or t.grad_fn is None:
        return found
    stack, seen = [t.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        var = getattr(fn, "variable", None)
        if var is not None and id(var) in leaves:
            found.add(leaves[id(var)])
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return found


def _all_gather_merge(stats: List[Tuple[float, torch.Tensor, torch.Tensor]],
                      device: torch.device) -> List[Tuple[float, torch.Tensor, torch.Tensor]]:
    """Merge per-process (count, mean, M2) across ranks when torch.distributed is initialised."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1 or not stats:
        return stats
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    local = torch.tensor([[float(n), float(mean), float(m2)] for n, mean, m2 in stats],
                         dtype=torch.float64, device=device)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    merged = []
    for i in range(len(stats)):
        acc: Tuple[float, torch.Tensor, torch.Tensor] = (0, torch.zeros((), dtype=torch.float64),
                                                          torch.zeros((), dtype=torch.float64))
        for g in gathered:
            n, mean, m2 = g[i].cpu()
            acc = merge_moments(acc, (int(n), mean, m2))
        merged.append(acc)
    return merged


def calibrate_scale_equalizers(model: nn.Module, batches: Iterable[Any], *,
                               forward_fn: Optional[Callable[[nn.Module, Any], Any]] = None,
                               recalibrate: bool = True,
                               is_stochastic: Callable[[nn.Module], bool] = _is_stochastic_regulariser,
                               ) -> Dict[str, Tuple[float, float]]:
    """Measure the dataset-wide mean / variance of every ``'dataset'``-mode equalizer.

    The model runs as in training (``model.train()``: BatchNorm on batch
    statistics, so the equalizers see the distribution training feeds them)
    but without gradients, with dropout-like modules (``is_stochastic``) in
    eval mode, and every buffer of the model (BatchNorm running statistics,
    ``num_batches_tracked``, ``'batch'``-mode equalizer estimates) restored
    afterwards. The torch (CPU and CUDA), numpy and python RNG states are
    restored on exit, so a run with and one without equalizers draw the same
    random numbers afterwards. Statistics are accumulated as (count, mean, M2)
    in float64 and merged across processes with Chan's parallel formula when
    ``torch.distributed`` is initialised (every rank must call this).

    Equalizers whose input depends on another equalizer are calibrated after
    it (one pass over ``batches`` per dependency level, found from the
    autograd graph of one probe forward), so each sees exactly what it will
    see in training: after calibration, in train mode and on the same
    batches, every equalizer's output has mean 0 and variance v / (v + eps).

    Args:
        model: Any module containing :class:`ScaleEqualizer` modules.
        batches: The calibration inputs (kept in memory: it is iterated once
            per dependency level).
        forward_fn: ``forward_fn(model, batch)`` runs one forward. Default:
            ``model(**batch)`` for a dict, else ``model(batch)``.
        recalibrate: Calibrate equalizers that are already calibrated too
            (default). With False only the uncalibrated ones are measured.
        is_stochastic: Which modules to switch to eval mode (default:
            dropout, drop path, drop block, stochastic pooling).

    Returns:
        ``{equalizer name: (mean, variance)}`` of the equalizers calibrated.

    Raises:
        ValueError: ``batches`` is empty.
        RuntimeError: an equalizer to calibrate was not reached by the forward.
    """
    forward_fn = forward_fn or _default_forward
    batches = list(batches)
    if not batches:
        raise ValueError("calibrate_scale_equalizers needs at least one batch (got none): pass a non-empty "
                         "iterable, e.g. num_batches >= 1 for the calibration hook")
    names = {m: n for n, m in model.named_modules()}
    targets = [m for m in model.modules() if isinstance(m, ScaleEqualizer) and m.mode == "dataset"
               and (recalibrate or not bool(m.calibrated))]
    if not targets:
        return {}
    devices = list({b.device for b in model.buffers()} | {p.device for p in model.parameters()})
    statistics = [b for m in targets for b in (m.mean, m.var, m.calibrated)]
    result: Dict[str, Tuple[float, float]] = {}
    try:
        with restored_modes(model), _restored_buffers(model, kept_on_success=statistics), forked_rng(devices):
            model.train()
            for m in model.modules():
                if is_stochastic(m):
                    m.eval()
            levels = _dependency_levels(model, targets, forward_fn, batches[0], names)
            with torch.no_grad():  # one pass per level; lower levels are already calibrated and normalise
                for level in range(max(levels) + 1):
                    result.update(_calibrate_level(model, targets, levels, level, forward_fn, batches, names))
        return result
    finally:
        for m in targets:
            m.reset_calibration()


@contextlib.contextmanager
def _restored_buffers(model: nn.Module, kept_on_success: Sequence[torch.Tensor] = ()) -> Iterator[None]:
    """Every buffer of ``model`` back to its value on entry, except ``kept_on_success`` when the block succeeds."""
    snapshot = [(b, b.detach().clone()) for b in model.buffers()]
    kept: set = set()
    try:
        yield
        kept = {id(b) for b in kept_on_success}
    finally:
        with torch.no_grad():
            for b, saved in snapshot:
                if id(b) not in kept:
                    b.copy_(saved)


@contextlib.contextmanager
def _frozen_parameters(model: nn.Module) -> Iterator[None]:
    """No parameter of ``model`` requires grad within the block; each flag is restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, rg in flags:
            p.requires_grad_(rg)


def _dependency_levels(model: nn.Module, targets: List[ScaleEqualizer], forward_fn: Callable[[nn.Module, Any], Any],
                       batch: Any, names: Dict[nn.Module, str]) -> List[int]:
    """Calibration order of ``targets``, from the autograd graph of one probe forward.

    Level 0: the equalizer's input depends on no other target; level k: it
    depends on targets of levels < k, at least one of level k - 1.
    """
    for m in targets:
        m.begin_probe()
    with _frozen_parameters(model), torch.enable_grad():
        forward_fn(model, batch)
    probes = [m.end_probe() for m in targets]
    missing = [names[m] for m, (_, leaf) in zip(targets, probes) if leaf is None]
    if missing:
        raise RuntimeError(f"calibrate_scale_equalizers: the forward did not reach the equalizers {missing}; "
                           f"check forward_fn (e.g. mode='loss' so auxiliary heads run)")
    leaves = {id(leaf): i for i, (_, leaf) in enumerate(probes)}
    deps = [_depends_on(seen, leaves) - {i} for i, (seen, _) in enumerate(probes)]
    level: Dict[int, int] = {}
    while len(level) < len(targets):
        progressed = False
        for i, d in enumerate(deps):
            if i not in level and all(j in level for j in d):
                level[i] = 1 + max((level[j] for j in d), default=-1)
                progressed = True
        if not progressed:  # a cycle cannot happen in a feed-forward graph
            raise RuntimeError("calibrate_scale_equalizers: cyclic equalizer dependencies")
    return [level[i] for i in range(len(targets))]


def _calibrate_level(model: nn.Module, targets: List[ScaleEqualizer], levels: List[int], level: int,
                     forward_fn: Callable[[nn.Module, Any], Any], batches: List[Any],
                     names: Dict[nn.Module, str]) -> Dict[str, Tuple[float, float]]:
    """One pass over ``batches``: measure the targets of ``level`` (merged over processes), store their statistics.

    Targets of higher levels pass their input through; lower levels are calibrated already.
    """
    for m, lvl in zip(targets, levels):
        if lvl >= level:
            m.begin_calibration(measure=lvl == level)
    for batch in batches:
        forward_fn(model, batch)
    current = [m for m, lvl in zip(targets, levels) if lvl == level]
    merged = _all_gather_merge([m.observed_moments for m in current], targets[0].mean.device)
    result: Dict[str, Tuple[float, float]] = {}
    for m, moments in zip(current, merged):
        if moments[0] == 0:
            raise RuntimeError(f"calibrate_scale_equalizers: equalizer {names[m]!r} saw no elements")
        result[names[m]] = m.finish_calibration(moments)
    return result


# --------------------------------------------------------------------------------------------------------
# Folding
# --------------------------------------------------------------------------------------------------------

def _explicit_padding(conv: nn.Conv2d) -> Tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding of a Conv2d."""
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0, 0, 0)
        pads = []
        for d, k in zip(conv.dilation, conv.kernel_size):
            total = d * (k - 1)
            pads.append((total // 2, total - total // 2))
        (t, b), (l, r) = pads
        return (l, r, t, b)
    ph, pw = conv.padding
    return (pw, pw, ph, ph)


class BorderCorrectedConv2d(nn.Conv2d):
    """A Conv2d whose zero-padded input was an affine map ``x * scale + shift`` folded into it.

    Folding a per-channel affine map into a convolution scales the weight's
    input channels and adds ``shift`` times the summed kernel to the bias --
    exact in the interior. Where the kernel overlaps the zero padding, the
    padded positions contributed 0 instead of ``shift``, so the output gets a
    border correction: ``-conv(P, K)`` with ``P`` the indicator of padded
    positions and ``K[o] = sum_c shift_c * W[o, c]``. It is non-zero only on
    a few rows / columns at the borders; those strips are cached per input
    size (a small LRU) and added in place.

    Build it with :func:`fold_input_affine`.
    """

    _cache_size = 8

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("border_kernel", None)
        self._strips: "OrderedDict[Any, Tuple]" = OrderedDict()

    def _border_strips(self, hw: Tuple[int, int], out_hw: Tuple[int, int], device: torch.device,
                       dtype: torch.dtype) -> Tuple:
        key = (hw, device, dtype)
        hit = self._strips.get(key)
        if hit is not None:
            self._strips.move_to_end(key)
            return hit
        h, w = hw
        ho, wo = out_hw
        l, r, t, b = _explicit_padding(self)
        kernel = self.border_kernel.double()
        pad_indicator = 1.0 - F.pad(torch.ones(1, 1, h, w, dtype=torch.float64, device=device), (l, r, t, b))
        corr = -F.conv2d(pad_indicator, kernel, stride=self.stride, dilation=self.dilation)  # (1, O, ho, wo)
        (sh, sw), (dh, dw), (kh, kw) = self.stride, self.dilation, self.kernel_size
        top = min(ho, -(-t // sh))
        left = min(wo, -(-l // sw))
        bottom = sum(1 for i in range(top, ho) if i * sh - t + dh * (kh - 1) > h - 1)
        right = sum(1 for j in range(left, wo) if j * sw - l + dw * (kw - 1) > w - 1)
        corr = corr.to(dtype)
        strips = (top, bottom, left, right,
                  corr[:, :, :top], corr[:, :, ho - bottom:],
                  corr[:, :, top:ho - bottom, :left], corr[:, :, top:ho - bottom, wo - right:])
        strips = tuple(s.clone() if isinstance(s, torch.Tensor) else s for s in strips)
        self._strips[key] = strips
        if len(self._strips) > self._cache_size:
            self._strips.popitem(last=False)
        return strips

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.border_kernel is None:
            return out
        ho, wo = out.shape[-2:]
        top, bottom, left, right, s_top, s_bottom, s_left, s_right = self._border_strips(
            tuple(x.shape[-2:]), (ho, wo), x.device, out.dtype)
        if top:
            out[:, :, :top] += s_top
        if bottom:
            out[:, :, ho - bottom:] += s_bottom
        if left:
            out[:, :, top:ho - bottom, :left] += s_left
        if right:
            out[:, :, top:ho - bottom, wo - right:] += s_right
        return out


def fold_input_affine(conv: nn.Conv2d, scale: torch.Tensor, shift: torch.Tensor) -> nn.Conv2d:
    """Fold ``x -> x * scale + shift`` (per input channel) into the conv that reads ``x``.

    Returns a new :class:`BorderCorrectedConv2d` with
    ``new(x) == conv(x * scale[:, None, None] + shift[:, None, None])`` up to
    float rounding, zero padding included. The computation is done in
    float64. Any ``padding_mode`` other than ``'zeros'`` pads a constant map
    with the same constant, so it needs no border correction.

    Args:
        conv: The consumer convolution (``nn.Conv2d``, any groups/dilation/stride).
        scale: ``(in_channels,)`` multipliers.
        shift: ``(in_channels,)`` offsets.

    Returns:
        The folded convolution (the input module is not modified).
    """
    if type(conv) is BorderCorrectedConv2d or not isinstance(conv, nn.Conv2d):
        raise TypeError(f"fold_input_affine needs a plain nn.Conv2d (not yet folded), got {type(conv).__name__}")
    cin = conv.in_channels
    scale = torch.as_tensor(scale, dtype=torch.float64).flatten().to(conv.weight.device)
    shift = torch.as_tensor(shift, dtype=torch.float64).flatten().to(conv.weight.device)
    if scale.numel() != cin or shift.numel() != cin:
        raise ValueError(f"scale/shift must have in_channels={cin} entries, got {scale.numel()}/{shift.numel()}")
    w = conv.weight.detach().double()  # (O, Cin/g, kh, kw)
    out_ch, cg = w.shape[:2]
    groups = conv.groups
    in_idx = (torch.arange(out_ch, device=w.device) // (out_ch // groups))[:, None] * cg + torch.arange(
        cg, device=w.device)[None, :]  # (O, Cin/g): the input channel each weight slice reads
    new_w = w * scale[in_idx][:, :, None, None]
    kernel = (w * shift[in_idx][:, :, None, None]).sum(dim=1, keepdim=True)  # (O, 1, kh, kw)
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros(out_ch, dtype=torch.float64,
                                                                                  device=w.device)
    new_bias = bias + kernel.sum(dim=(1, 2, 3))
    folded = BorderCorrectedConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                                   padding=conv.padding, dilation=conv.dilation, groups=groups, bias=True,
                                   padding_mode=conv.padding_mode, device=conv.weight.device,
                                   dtype=conv.weight.dtype)
    with torch.no_grad():
        folded.weight.copy_(new_w.to(conv.weight.dtype))
        folded.bias.copy_(new_bias.to(conv.weight.dtype))
    folded.train(conv.training)
    needs_border = conv.padding_mode == "zeros" and any(_explicit_padding(conv)) and bool(kernel.abs().sum() > 0)
    if needs_border:
        folded.border_kernel = kernel.to(conv.weight.dtype)
    return folded


def fold_scale_equalizers(model: nn.Module) -> Dict[str, List[str]]:
    """Fold every equalizer of ``model`` into the convolution that consumes it (inference only).

    Puts the model in eval mode and asks every module that owns equalizers
    (``_owns_scale_equalizers = True`` and a ``fold_scale_equalizers()``
    method returning the folded names, e.g. the kim_plugins mmseg SE heads)
    to fold them. Folded equalizers become ``nn.Identity``;
    the folded model gives the same eval logits (float tolerance) at the
    cost of the plain model. It can no longer be trained.

    Returns:
        ``{'folded': [...], 'unfolded': [...]}`` equalizer names. Unfolded
        ones are also reported with a warning.

    Raises:
        RuntimeError: an uncalibrated ``'dataset'`` equalizer (not built with
            ``allow_uncalibrated``).
    """
    model.eval()
    folded: List[str] = []
    for name, module in model.named_modules():
        if getattr(module, "_owns_scale_equalizers", False):
            folded.extend(f"{name}.{n}" if name else n for n in module.fold_scale_equalizers())
    unfolded = [n for n, m in model.named_modules() if isinstance(m, ScaleEqualizer)]
    if unfolded:
        warnings.warn(f"fold_scale_equalizers: {len(unfolded)} equalizer(s) could not be folded and still run: "
                      f"{unfolded}", stacklevel=2)
    return {"folded": folded, "unfolded": unfolded}
