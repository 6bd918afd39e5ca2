"""A main-job pair as one object, and the one registry of pairs.

A :class:`Pair` is everything the suite knows about one comparison: its name,
``--only`` group, title, metric, its variants (:class:`Variant`: the baseline
first), how to time one training step (:meth:`Pair.synthetic_step`, for the
budget), how much its runs cost (:meth:`Pair.estimate_cost`), how to train and
measure it (:meth:`Pair.run`), and its report section and plots
(:meth:`Pair.report_section`, :meth:`Pair.write_plots`; pairs with the same
:attr:`Pair.section` share one section, e.g. both scale-equalizer pairs).

Each pair module creates its pairs and :func:`register` s them; adding a pair
to an existing module touches that module only. :func:`all_pairs` imports the
pair modules (:data:`PAIR_MODULES`) and returns the pairs in run order: by
module, then in the order each module registered them.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple

__all__ = ["Variant", "Pair", "Cost", "register", "all_pairs", "get_pair", "pair_groups", "timing_closures",
           "PAIR_MODULES"]

#: The modules that define pairs, in run order.
PAIR_MODULES = ("kim_plugins.suite.seg", "kim_plugins.suite.cls", "kim_plugins.suite.stability",
                "kim_plugins.suite.depth_pair", "kim_plugins.suite.diagnostics")

_REGISTRY: Dict[str, "Pair"] = {}


@dataclass(frozen=True)
class Variant:
    """One side of a comparison.

    Attributes:
        name: Display name (report, CSV).
        baseline: True for the pair's baseline.
        spec: What builds and trains it (the pair's own keys: a head type, a timm name, a loss, ...).
    """

    name: str
    baseline: bool = False
    spec: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Cost:
    """Estimated seconds of a pair: ``iters_s`` scales with its training iterations, ``fixed_s`` does not."""

    fixed_s: float = 0.0
    iters_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.fixed_s + self.iters_s


@dataclass(eq=False)
class Pair:
    """A baseline and its plugin variants, trained on the same data, seeds and schedule.

    Attributes:
        name: Pair id (``'se-uper'``, ``'vit'``, ...).
        group: The ``--only`` name that selects it.
        title: One-line title for the report.
        metric: Accuracy metric (``'mIoU'``, ``'top-1'``, ...), in percent.
        variants: The baseline first, then the plugin variants.
        iters_field: The :class:`~kim_plugins.suite.settings.SuiteSettings` field of its training iterations
            (what a budget re-plan shrinks).
        section: Report-section key: the pairs that share it are rendered by one :meth:`report_section` and
            :meth:`write_plots` call (default: the pair's own name).
        plots: The PNG files its section writes.
        needs_scenes: It reads the Fashion-scenes segmentation set.
    """

    name: str = ""
    group: str = ""
    title: str = ""
    metric: str = ""
    variants: Tuple[Variant, ...] = ()
    iters_field: str = ""
    section: str = ""
    plots: Tuple[str, ...] = ()
    needs_scenes: bool = False

    def __post_init__(self) -> None:
        self.variants = tuple(self.variants)
        self.section = self.section or self.name
        if [v.baseline for v in self.variants][:1] != [True] or sum(v.baseline for v in self.variants) != 1:
            raise ValueError(f"pair {self.name!r}: the first variant, and only it, must be the baseline")

    @property
    def baseline(self) -> Variant:
        return self.variants[0]

    def iters(self, settings) -> int:
        """Training iterations of each of its runs."""
        return int(getattr(settings, self.iters_field))

    # ---- budget -------------------------------------------------------------------------------------------
    def timing_setup(self, settings) -> Tuple[Any, Callable, Callable, int]:
        """``(model, loss_fn, forward_fn, n)`` of the baseline on random data: ``loss_fn(model)`` is one training
        batch's loss, ``forward_fn(model)`` an eval forward of ``n`` images."""
        raise NotImplementedError

    def synthetic_step(self, settings) -> Tuple[Callable[[], None], Callable[[], None], int]:
        """``(step, forward, n)``: one training step and one eval forward of ``n`` images of the baseline on
        random data (for the budget estimate)."""
        model, loss_fn, forward_fn, n = self.timing_setup(settings)
        return (*timing_closures(model, loss_fn, forward_fn), n)

    def estimate_cost(self, settings, cost: Dict[str, float], seen: Set[Any]) -> Cost:
        """Seconds of the pair with ``settings`` given its measured ``step_s`` / ``image_s``.

        ``seen`` holds the runs of earlier pairs that this one would reuse (identical runs are trained once).
        """
        raise NotImplementedError

    # ---- running ------------------------------------------------------------------------------------------
    def run(self, settings, data, out_dir: str, device: str, cache: Dict[str, Any]):
        """Train every variant for every seed and measure the mechanism; returns a
        :class:`~kim_plugins.suite.records.PairResult`. ``cache`` is shared by the pairs of one suite run."""
        raise NotImplementedError

    # ---- report -------------------------------------------------------------------------------------------
    def report_section(self, results: Sequence[Any]) -> List[str]:
        """Markdown lines of the mechanism section of ``results`` (the pairs that share :attr:`section`);
        by default :meth:`section_lines` of each."""
        return [line for pr in results for line in self.section_lines(pr)]

    def section_lines(self, result) -> List[str]:
        """Markdown lines of one pair's mechanism section."""
        return []

    def write_plots(self, results: Sequence[Any], out_dir: str) -> Dict[str, str]:
        """Draw each of :attr:`plots` with :meth:`plot`; returns ``{file name: path}`` of those drawn."""
        files = {}
        for name in self.plots:
            path = os.path.join(out_dir, name)
            if self.plot(name, results, path) is not False:
                files[name] = path
        return files

    def plot(self, name: str, results: Sequence[Any], path: str) -> Optional[bool]:
        """Draw plot ``name`` of ``results`` to ``path`` (return False when there is nothing to draw)."""
        return False


def register(pair: Pair) -> Pair:
    """Add ``pair`` to the registry (its name must be new)."""
    if pair.name in _REGISTRY and _REGISTRY[pair.name] is not pair:
        raise ValueError(f"pair {pair.name!r} is registered twice")
    _REGISTRY[pair.name] = pair
    return pair


def all_pairs() -> List[Pair]:
    """Every registered pair, in run order."""
    for module in PAIR_MODULES:
        importlib.import_module(module)
    order = {m: i for i, m in enumerate(PAIR_MODULES)}
    reg = list(_REGISTRY.values())
    return [p for _, _, p in sorted((order.get(type(p).__module__, len(order)), k, p) for k, p in enumerate(reg))]


def get_pair(name: str) -> Pair:
    """The registered pair ``name``."""
    pairs = {p.name: p for p in all_pairs()}
    if name not in pairs:
        raise KeyError(f"unknown pair {name!r}; registered: {', '.join(pairs)}")
    return pairs[name]


def pair_groups() -> Dict[str, Tuple[str, ...]]:
    """``--only`` names -> the pairs they run, in run order."""
    out: Dict[str, List[str]] = {}
    for p in all_pairs():
        out.setdefault(p.group, []).append(p.name)
    return {g: tuple(names) for g, names in out.items()}


def timing_closures(model, loss_fn: Callable[[Any], Any], forward_fn: Callable[[Any], Any]
                    ) -> Tuple[Callable[[], None], Callable[[], None]]:
    """``(step, forward)``: one AdamW training step on ``loss_fn(model)``, one eval ``forward_fn(model)``."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        model.train()
        loss = loss_fn(model)
        opt.zero_grad()
        loss.backward()
        opt.step()

    @torch.no_grad()
    def forward() -> None:
        model.eval()
        forward_fn(model)

    return step, forward
