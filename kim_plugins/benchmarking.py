"""Timing and memory measurement shared by ``benchmarks/`` and ``tools/benchmark.py``.

A few-percent speed target is inside the noise of a shared 2-core machine
unless the measurement is careful. :func:`compare_timings` does what
DEVELOPERS.md asks for every performance claim:

- pins the intra-op thread count (``torch.set_num_threads``),
- interleaves the candidates round by round, in a shuffled order per round,
- reports medians over many rounds and the per-round ratio against the baseline,
- runs the baseline twice per round (``A`` and ``A'``) so that the A/A ratio,
  which should be 1.00, shows the noise floor next to every A/B ratio.

:func:`saved_activation_bytes` measures the memory a training step keeps for
backward (the tensors autograd saves), which is deterministic on any device,
and :func:`peak_cuda_memory` the allocator peak on a GPU.
"""
from __future__ import annotations

import contextlib
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional

import torch

__all__ = [
    "TimingResult",
    "compare_timings",
    "pinned_threads",
    "saved_activation_bytes",
    "peak_cuda_memory",
]

AA_CONTROL_SUFFIX = " (A/A)"


@dataclass
class TimingResult:
    """Outcome of :func:`compare_timings`.

    Attributes:
        baseline: Name of the baseline candidate.
        times: Per-candidate list of per-round times in seconds (one call each).
        threads: Intra-op thread count used.
        rounds: Number of timed rounds.
    """

    baseline: str
    times: Dict[str, List[float]] = field(default_factory=dict)
    threads: int = 1
    rounds: int = 0

    @property
    def aa_name(self) -> str:
        return self.baseline + AA_CONTROL_SUFFIX

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])

    def ratio(self, name: str) -> float:
        """Median over rounds of ``time(name) / time(baseline)`` (per-round pairing)."""
        base = self.times[self.baseline]
        return statistics.median(t / b for t, b in zip(self.times[name], base))

    def ratio_iqr(self, name: str) -> tuple:
        base = self.times[self.baseline]
        rs = sorted(t / b for t, b in zip(self.times[name], base))
        q = statistics.quantiles(rs, n=4) if len(rs) >= 2 else [rs[0], rs[0], rs[0]]
        return q[0], q[2]

    def rows(self) -> List[Dict[str, Any]]:
        """One dict per candidate: median ms, ratio vs baseline and its IQR."""
        out = []
        for name in self.times:
            lo, hi = self.ratio_iqr(name)
            out.append(dict(name=name, median_ms=1e3 * self.median(name), ratio=self.ratio(name),
                            ratio_q1=lo, ratio_q3=hi))
        return out


@contextlib.contextmanager
def pinned_threads(num_threads: int) -> Iterator[None]:
    """Temporarily set ``torch.set_num_threads(num_threads)``."""
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    old = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _sync(device: Optional[torch.device]) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def compare_timings(candidates: Mapping[str, Callable[[], Any]], baseline: str, *,
                    rounds: int = 30, warmup: int = 3, num_threads: int = 1,
                    device: Optional[torch.device] = None, seed: int = 0,
                    progress: bool = False) -> TimingResult:
    """Time callables against a baseline, interleaved, with an A/A control.

    Args:
        candidates: Name -> zero-argument callable doing one unit of work
            (a forward, or a forward+backward+step).
        baseline: Key of ``candidates`` every ratio is taken against. It is
            also run a second time per round under ``'<baseline> (A/A)'``.
        rounds: Timed rounds; every candidate runs once per round.
        warmup: Untimed rounds before timing.
        num_threads: Intra-op threads, pinned for the whole measurement.
        device: Synchronised around each call when it is a CUDA device.
        seed: Seed of the per-round shuffling of the call order.
        progress: Show an mmengine progress bar over rounds.

    Returns:
        A :class:`TimingResult`.

    Raises:
        KeyError: ``baseline`` is not one of ``candidates``.
        ValueError: ``rounds`` < 3.
    """
    if baseline not in candidates:
        raise KeyError(f"baseline {baseline!r} is not among the candidates {list(candidates)}")
    if rounds < 3:
        raise ValueError(f"rounds must be >= 3 for a median, got {rounds}")
    fns: Dict[str, Callable[[], Any]] = dict(candidates)
    fns[baseline + AA_CONTROL_SUFFIX] = candidates[baseline]
    order = list(fns)
    result = TimingResult(baseline=baseline, times={k: [] for k in [baseline, baseline + AA_CONTROL_SUFFIX]
                                                     + [k for k in candidates if k != baseline]},
                          threads=num_threads, rounds=rounds)
    rng = random.Random(seed)
    bar = None
    if progress:
        from mmengine.utils import ProgressBar
        bar = ProgressBar(rounds + warmup, file=sys.stdout)
    with pinned_threads(num_threads):
        for r in range(warmup + rounds):
            rng.shuffle(order)
            for name in order:
                _sync(device)
                t0 = time.perf_counter()
                fns[name]()
                _sync(device)
                dt = time.perf_counter() - t0
                if r >= warmup:
                    result.times[name].append(dt)
            if bar is not None:
                bar.update()
    if bar is not None:
        print()
    return result


def saved_activation_bytes(fn: Callable[[], Any]) -> int:
    """Bytes of the distinct tensors autograd saves for backward while ``fn`` runs.

    This is the activation memory a training step holds between forward and
    backward, measured exactly (storages are counted once), on any device.
    ``fn`` should run a forward pass with gradients enabled.
    """
    seen: Dict[Any, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            st = t.untyped_storage()
            seen[(st.data_ptr(), t.device)] = st.nbytes()
        except (RuntimeError, NotImplementedError):  # e.g. sparse / meta tensors
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return int(sum(seen.values()))


def peak_cuda_memory(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak CUDA allocator bytes above the starting allocation while ``fn`` runs."""
    torch.cuda.synchronize(device)
    start = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - start)

