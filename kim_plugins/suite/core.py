"""Run the benchmark suite: plan within the budget, prepare data, run the pairs, write the report."""
from __future__ import annotations

import dataclasses
import math
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch

from kim_plugins.markdown import markdown_table
from kim_plugins.suite.pairs import Cost, Pair, all_pairs, get_pair, pair_groups
from kim_plugins.suite.settings import SuiteSettings, preset

__all__ = ["SuiteOptions", "run_suite", "estimate_cost", "estimate_pair_costs", "plan_settings", "Replanner",
           "Replan"]

_REPORT_S = 8.0  # plots and files
_SCENE_S = 0.004  # writing one scene (two PNGs)
_FMNIST_S = 2.0  # reading the idx files
_SAFETY = 0.9  # plan to use this fraction of what is left


@dataclass
class SuiteOptions:
    """The command line of ``tools/benchmark_suite.py``, as data."""

    suite: str = "quick"
    seeds: Optional[int] = None
    only: Optional[Sequence[str]] = None  # --only groups (None: all)
    device: Optional[str] = None
    budget_minutes: Optional[float] = None
    fashion_mnist: Optional[str] = None
    data_root: Optional[str] = None
    out: Optional[str] = None
    threads: Optional[int] = None
    argv: Sequence[str] = field(default_factory=list)


def _selected_pairs(only: Sequence[str]) -> List[Pair]:
    groups = pair_groups()
    bad = [o for o in only if o not in groups]
    if bad:
        raise ValueError(f"--only: unknown {bad}; choose from {','.join(groups)} (comma separated)")
    return [p for p in all_pairs() if p.group in only]


def _pairs(pairs: Sequence[Union[str, Pair]]) -> List[Pair]:
    return [p if isinstance(p, Pair) else get_pair(p) for p in pairs]


def _time(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def measure_step_costs(pairs: Sequence[Union[str, Pair]], settings: SuiteSettings) -> Dict[str, Dict[str, float]]:
    """Seconds per training step and per evaluated image of each pair's baseline, on random data."""
    out = {}
    for pair in _pairs(pairs):
        step, fwd, n = pair.synthetic_step(settings)
        step()
        fwd()
        out[pair.name] = dict(step_s=_time(step, 1), image_s=_time(fwd, 1) / n)
    return out


def estimate_pair_costs(pairs: Sequence[Union[str, Pair]], settings: SuiteSettings,
                        costs: Dict[str, Dict[str, float]]) -> List[Cost]:
    """The estimated :class:`~kim_plugins.suite.pairs.Cost` of each pair in run order (a run that an earlier pair
    already trained, e.g. the ASPP baseline at the scene size, is counted once)."""
    seen: set = set()
    return [p.estimate_cost(settings, costs[p.name], seen) for p in _pairs(pairs)]


def estimate_cost(pairs: Sequence[Union[str, Pair]], settings: SuiteSettings, costs: Dict[str, Dict[str, float]],
                  scenes_cached: bool) -> float:
    """Seconds the suite needs with ``settings`` given the measured step costs (a planning model)."""
    pairs = _pairs(pairs)
    total = _REPORT_S + _FMNIST_S
    if any(p.needs_scenes for p in pairs) and not scenes_cached:
        total += _SCENE_S * (settings.num_train_scenes + settings.num_val_scenes)
    return total + sum(c.total_s for c in estimate_pair_costs(pairs, settings, costs))


def plan_settings(pairs: Sequence[Union[str, Pair]], settings: SuiteSettings, costs: Dict[str, Dict[str, float]],
                  available_s: Optional[float], scenes_cached: bool):
    """The largest scaling (<= 1) of ``settings`` whose estimated cost fits ``available_s``.

    Returns ``(settings, factor, estimate_s, fits)``.
    """
    if available_s is None:
        return settings, 1.0, estimate_cost(pairs, settings, costs, scenes_cached), True
    factors = [1.0] + [round(1.0 - 0.05 * i, 2) for i in range(1, 20)] + [0.04, 0.03, 0.02, 0.01, 0.005, 0.0]
    for f in factors:
        s = settings.scaled(f)
        est = estimate_cost(pairs, s, costs, scenes_cached)
        if est <= available_s:
            return s, f, est, True
    return s, 0.0, est, False


@dataclass
class Replan:
    """One decision of :class:`Replanner`: the iterations one pair was given, and why."""

    pair: str
    at_s: float
    planned_iters: int
    given_iters: int
    pace: float
    needed_s: float
    left_s: float

    @property
    def shrunk(self) -> bool:
        return self.given_iters < self.planned_iters

    @property
    def reason(self) -> str:
        state = (f"at {self.pace:.2f}x the plan's pace what is left needs {self.needed_s / 60:.1f} min, "
                 f"{self.left_s / 60:.1f} min left")
        if self.shrunk:
            return f"behind: {state}: iterations of what is left x{self.given_iters / self.planned_iters:.2f}"
        if self.needed_s > self.left_s:
            return f"behind: {state}, but its iterations are at the floor already"
        return f"within the budget: {state}"


class Replanner:
    """Re-plans the training iterations of what is left, before every pair, from the measured progress.

    The budget plan (:func:`plan_settings`) is made once from one timed step
    per pair; a machine that slows down afterwards (other jobs on its cores)
    would overrun it. Before each pair the replanner compares the time spent
    so far with the plan's estimate of the work done (the *pace*), and if
    ``pace * (estimate of what is left)`` exceeds the time left before the
    deadline, gives this pair (and, re-planned again before each of them,
    the later ones) the fraction of its planned iterations that fits:
    ``(left / pace - fixed) / iterations`` of what is left, floored at
    ``min_iters``. Models, batches, seeds and evaluation sizes never change,
    and a pair's variants and seeds share one iteration count (the
    comparison's premise), so the decision is made between pairs.

    Args:
        deadline_s: Seconds from now (on ``clock``) by which the training should end (``math.inf``: no budget).
        clock: Seconds as a float (``time.perf_counter``; a fake in tests).
        min_iters: Floor of a shrunk iteration count.
    """

    def __init__(self, deadline_s: float, clock: Callable[[], float] = time.perf_counter, min_iters: int = 2):
        self.clock = clock
        self.start = clock()
        self.deadline = self.start + deadline_s
        self.min_iters = min_iters
        self.done_estimate_s = 0.0
        self.decisions: List[Replan] = []

    def pace(self) -> float:
        """Measured time over the plan's estimate of the work done (1.0 before any work is done)."""
        if self.done_estimate_s <= 0:
            return 1.0
        return (self.clock() - self.start) / self.done_estimate_s

    def iters_for(self, pair: str, planned_iters: int, remaining: Sequence[Cost]) -> int:
        """Iterations for ``pair``; ``remaining``: the estimated costs of it and of every later pair as planned."""
        now = self.clock()
        pace = self.pace()
        left = self.deadline - now
        fixed = sum(c.fixed_s for c in remaining)
        iters = sum(c.iters_s for c in remaining)
        needed = pace * (fixed + iters)
        given = planned_iters
        if needed > left and iters > 0:
            factor = max(0.0, (left / pace - fixed) / iters)
            given = min(planned_iters, max(self.min_iters, int(planned_iters * factor)))
        self.decisions.append(Replan(pair, now - self.start, planned_iters, given, pace, needed, left))
        return given

    def done(self, cost: Cost, planned_iters: int, given_iters: int) -> None:
        """Count a finished pair: its estimated cost at the iterations it was given."""
        self.done_estimate_s += cost.fixed_s + cost.iters_s * given_iters / max(1, planned_iters)

    def table(self) -> str:
        """The decisions as a Markdown table."""
        rows = [dict(pair=d.pair, at=f"{d.at_s / 60:.1f}", planned=d.planned_iters, given=d.given_iters,
                     reason=d.reason) for d in self.decisions]
        return markdown_table(rows, ["pair", "at", "planned", "given", "reason"],
                              ["pair", "decided at (min into training)", "planned iters", "given iters", "reason"])


def _load() -> str:
    try:
        return " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def _peak_rss() -> str:
    try:
        import resource

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return f"{kib / 1024 ** 2:.2f} GiB"
    except (ImportError, OSError):
        return "n/a"


def _versions() -> str:
    out = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    for mod in ("timm", "mmseg", "mmengine", "mmcv"):
        try:
            out.append(f"{mod} {__import__(mod).__version__}")
        except Exception:  # noqa: BLE001  report what is importable
            pass
    return ", ".join(out)


def run_suite(opts: SuiteOptions) -> Dict[str, Any]:
    """Run the suite and write its report.

    Returns:
        ``{'out_dir', 'files', 'failed', 'wall_s', 'table', 'replans'}``.
    """
    t_start = time.perf_counter()
    cpu_start = time.process_time()
    load_start = _load()
    base = preset(opts.suite)
    if opts.seeds is not None:
        if opts.seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {opts.seeds}")
        base.seeds = opts.seeds
    pairs = _selected_pairs(opts.only if opts.only is not None else list(pair_groups()))
    device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here; use --device cpu")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    budget_min = opts.budget_minutes if opts.budget_minutes is not None else (15.0 if opts.suite == "quick" else None)
    if budget_min is not None and budget_min <= 0:
        raise ValueError(f"--budget-minutes must be > 0, got {budget_min}")
    out_dir = opts.out or os.path.join("results", time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(out_dir, exist_ok=True)

    from kim_plugins.data.fashion_mnist import find_fashion_mnist
    from kim_plugins.suite.data import cached_scenes, default_data_root, prepare_data
    from kim_plugins.suite.report import accuracy_table, summarize_pair, write_report

    fmnist_dir = find_fashion_mnist(opts.fashion_mnist)  # fail early, with the how-to-get-it message
    data_root = opts.data_root or default_data_root()
    names = [p.name for p in pairs]

    print(f"[suite] {opts.suite}: pairs {', '.join(names)} | seeds {base.seeds} | device {device} | "
          f"threads {torch.get_num_threads()} | budget {budget_min or 'none'} min | out {out_dir}", flush=True)
    print("[suite] measuring a training step of each pair to plan within the budget ...", flush=True)
    costs = measure_step_costs(pairs, base)
    have = cached_scenes(data_root, base.scene_size)
    cached = have[0] >= base.num_train_scenes and have[1] >= base.num_val_scenes
    available = None if budget_min is None else budget_min * 60 * _SAFETY - (time.perf_counter() - t_start)
    settings, factor, estimate, fits = plan_settings(pairs, base, costs, available, cached)
    notes = []
    if factor < 1.0:
        notes.append(f"The budget ({budget_min:g} min) capped the `{opts.suite}` plan: iterations and evaluation "
                     f"sizes scaled by {factor:g} (floors: {base.min_iters} iterations) after measuring this "
                     f"machine's speed; model sizes, batch sizes and seeds unchanged.")
    if not fits:
        notes.append("Even the smallest plan was estimated to exceed the budget; it ran anyway.")
    print(f"[suite] plan: scale {factor:g}, estimated {estimate / 60:.1f} min "
          f"(seg {settings.seg_iters} it, cls {settings.cls_iters} it, {settings.seeds} seed(s))", flush=True)

    t_data = time.perf_counter()
    data = prepare_data(fmnist_dir, data_root, num_train_scenes=settings.num_train_scenes,
                        num_val_scenes=settings.num_val_scenes, scene_size=settings.scene_size,
                        scenes=any(p.needs_scenes for p in pairs))
    data_s = time.perf_counter() - t_data

    # the training must end by the budget's deadline, less the report; re-planned before every pair
    deadline = math.inf if budget_min is None else \
        budget_min * 60 * _SAFETY - (time.perf_counter() - t_start) - _REPORT_S
    replanner = Replanner(deadline, min_iters=settings.min_iters)
    pair_costs = estimate_pair_costs(pairs, settings, costs)
    results, failed, pair_times, cache = [], {}, {}, {}
    for i, pair in enumerate(pairs):
        planned = pair.iters(settings)
        given = replanner.iters_for(pair.name, planned, pair_costs[i:])
        decision = replanner.decisions[-1]
        print(f"\n[suite] == {i + 1}/{len(pairs)} {pair.name} (about {pair_costs[i].total_s / 60:.1f} min as "
              f"planned; elapsed {(time.perf_counter() - t_start) / 60:.1f} min; {decision.reason}; "
              f"{given} of {planned} iterations) ==", flush=True)
        t0 = time.perf_counter()
        try:
            results.append(pair.run(dataclasses.replace(settings, **{pair.iters_field: given}), data, out_dir,
                                    device, cache))
        except Exception as err:  # noqa: BLE001  one broken pair must not hide the others; reported below
            failed[pair.name] = f"{type(err).__name__}: {err}"
            traceback.print_exc()
        pair_times[pair.name] = time.perf_counter() - t0
        replanner.done(pair_costs[i], planned, given)

    shrunk = [d for d in replanner.decisions if d.shrunk]
    if shrunk:
        notes.append(f"The machine ran behind the plan, so the iterations of {len(shrunk)} pair(s) were shrunk "
                     f"before they started ({', '.join(f'{d.pair} {d.planned_iters} -> {d.given_iters}' for d in shrunk)}"
                     f"); see *Budget re-plans* below. Their numbers are not comparable with an unshrunk run's.")
    wall = time.perf_counter() - t_start
    argv = " ".join(opts.argv) if opts.argv else ""
    table = {
        "command": f"`python tools/benchmark_suite.py {argv}`".replace(" `", "`"),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "suite / seeds": f"{opts.suite} / {settings.seeds}",
        "pairs": ", ".join(names),
        "device": f"{device} ({os.cpu_count()} CPUs visible, {torch.get_num_threads()} torch threads)",
        "load average (1/5/15 min) at start / end": f"{load_start}  |  {_load()}",
        "wall time": f"{wall / 60:.1f} min (data {data_s:.0f} s; " + ", ".join(
            f"{p} {t:.0f} s" for p, t in pair_times.items()) + ")",
        "process CPU time": f"{(time.process_time() - cpu_start) / 60:.1f} min",
        "peak memory (RSS)": _peak_rss(),
        "budget": "none" if budget_min is None else (
            f"{budget_min:g} min (plan scale {factor:g}, estimated {estimate / 60:.1f} min; re-planned before every "
            f"pair: {len(shrunk)} pair(s) shrunk)"),
        "data": f"Fashion-MNIST from `{data.fashion_mnist_dir}` (60k train / 10k test)"
                + (f"; Fashion scenes {data.num_train_scenes} train / {data.num_val_scenes} val, "
                   f"{data.scene_size}x{data.scene_size}, seed {data.scene_seed}, `{data.scenes_root}`"
                   if data.scenes_root else ""),
        "software": _versions(),
    }
    for pair, err in failed.items():
        notes.append(f"**Pair `{pair}` FAILED**: {err}")
    replans = replanner.table() if budget_min is not None else ""
    files = write_report(out_dir, results, dict(suite=opts.suite, table=table, notes=notes, replans=replans)) \
        if results else {}
    if not results:
        with open(os.path.join(out_dir, "report.md"), "w") as f:
            f.write("# kim_plugins benchmark suite\n\nEvery pair failed:\n\n" +
                    "\n".join(f"- {p}: {e}" for p, e in failed.items()) + "\n")
        files["report.md"] = os.path.join(out_dir, "report.md")
    acc = accuracy_table({pr.pair: summarize_pair(pr) for pr in results}) if results else ""
    print("\n" + acc + "\n", flush=True)
    for pair, err in failed.items():
        print(f"[suite] pair {pair} FAILED: {err}", file=sys.stderr)
    print(f"[suite] wall time {wall / 60:.1f} min; report: {files.get('report.md')}", flush=True)
    return dict(out_dir=out_dir, files=files, failed=failed, wall_s=wall, table=acc, replans=replanner.decisions)
