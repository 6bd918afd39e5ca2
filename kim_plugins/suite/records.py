"""What a suite run hands to the report: one :class:`RunRecord` per trained model, one :class:`PairResult` per pair."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

__all__ = ["RunRecord", "PairResult", "param_fingerprint", "count_params", "forward_gflops"]


@dataclass
class RunRecord:
    """One trained model of one pair and seed.

    Attributes:
        pair: Pair id (``'se-uper'``, ``'vit'``, ...).
        variant: Display name of the variant.
        baseline: True for the pair's baseline.
        seed: Seed of initialisation, data order and augmentation.
        metric: Metric name (``'mIoU'`` or ``'top-1'``), in percent.
        value: The metric.
        train_time_s: Wall time of training (SE calibration included), evaluation excluded.
        iters: Training iterations.
        params: Trainable parameters.
        gflops: Forward GFLOPs of one input, one multiply-add = 1 FLOP (:data:`kim_plugins.markdown.FLOP_CONVENTION`;
            ``torch.utils.flop_counter``'s count of convolutions, matmuls and attention, halved).
        data_order: Digest of the training batches (file names / indices and flips) in order.
        init_params: Per-parameter digests at the start of training (after any calibration).
        extra: Other numbers (aAcc, ...).
    """

    pair: str
    variant: str
    baseline: bool
    seed: int
    metric: str
    value: float
    train_time_s: float
    iters: int
    params: int
    gflops: float
    data_order: str = ""
    init_params: Dict[str, str] = field(default_factory=dict, repr=False)
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class PairResult:
    """A pair's runs, its description and its mechanism measurements.

    Attributes:
        pair: Pair id.
        title: One-line title for the report.
        description: What was compared, on what, with which schedule (Markdown).
        metric: The accuracy metric's name.
        runs: Every :class:`RunRecord` of the pair.
        mechanism: Pair-specific measurements (tables as lists of dicts, figure data).
        checks: ``{check: (passed, detail)}`` (same data order, same initialisation, ...).
    """

    pair: str
    title: str
    description: str
    metric: str
    runs: List[RunRecord] = field(default_factory=list)
    mechanism: Dict[str, Any] = field(default_factory=dict)
    checks: Dict[str, Any] = field(default_factory=dict)


def param_fingerprint(model: torch.nn.Module) -> Dict[str, str]:
    """A short digest of every parameter's values, by name."""
    out = {}
    for name, p in model.named_parameters():
        data = p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
        out[name] = hashlib.sha1(data).hexdigest()[:16]
    return out


def count_params(model: torch.nn.Module) -> int:
    """Number of trainable parameters."""
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad))


@torch.no_grad()
def forward_gflops(fn, *args: Any) -> float:
    """Forward GFLOPs of ``fn(*args)``, one multiply-add = 1 FLOP (the project's convention,
    :data:`kim_plugins.markdown.FLOP_CONVENTION`, as mmengine counts in ``tools/benchmark.py``).

    :class:`torch.utils.flop_counter.FlopCounterMode` counts a multiply-add as 2, so its total is halved.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn(*args)
    return counter.get_total_flops() / 2 / 1e9


def same_fingerprints(a: Dict[str, str], b: Dict[str, str]) -> Optional[bool]:
    """Whether the parameters the two models share by name were identical (None: nothing shared)."""
    shared = set(a) & set(b)
    if not shared:
        return None
    return all(a[k] == b[k] for k in shared)
