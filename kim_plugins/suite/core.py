"""Run the benchmark suite: plan within the budget, prepare data, run the pairs, write the report."""
from __future__ import annotations

import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch

from kim_plugins.suite.settings import PAIR_GROUPS, SuiteSettings, preset

__all__ = ["SuiteOptions", "run_suite", "estimate_cost", "plan_settings"]

_SEG_OVERHEAD_S = 2.5  # Runner build, dataset scan, hooks, per run
_CLS_OVERHEAD_S = 0.5
_REPORT_S = 8.0  # plots and files
_SCENE_S = 0.004  # writing one scene (two PNGs)
_FMNIST_S = 2.0  # reading the idx files
_SAFETY = 0.9  # plan to use this fraction of what is left


@dataclass
class SuiteOptions:
    """The command line of ``tools/benchmark_suite.py``, as data."""

    suite: str = "quick"
    seeds: Optional[int] = None
    only: Sequence[str] = tuple(PAIR_GROUPS)
    device: Optional[str] = None
    budget_minutes: Optional[float] = None
    fashion_mnist: Optional[str] = None
    data_root: Optional[str] = None
    out: Optional[str] = None
    threads: Optional[int] = None
    argv: Sequence[str] = field(default_factory=list)


def _selected_pairs(only: Sequence[str]) -> List[str]:
    bad = [o for o in only if o not in PAIR_GROUPS]
    if bad:
        raise ValueError(f"--only: unknown {bad}; choose from {','.join(PAIR_GROUPS)} (comma separated)")
    return [p for g in PAIR_GROUPS if g in only for p in PAIR_GROUPS[g]]


def _time(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def measure_step_costs(pairs: Sequence[str], settings: SuiteSettings, device: str) -> Dict[str, Dict[str, float]]:
    """Seconds per training step and per evaluated image of each pair's baseline, on random data."""
    from kim_plugins.suite import cls, diagnostics, seg, stability
    from kim_plugins.suite.seg import _on_device

    out = {}
    for pair in pairs:
        if pair in seg.SEG_PAIRS:
            with _on_device(device):
                step, fwd, n = seg.synthetic_step(pair, settings)
        elif pair in stability.STABILITY_PAIRS:
            step, fwd, n = stability.synthetic_step(pair, settings)
        elif pair in diagnostics.DIAG_PAIRS:
            step, fwd, n = diagnostics.synthetic_step(pair, settings)
        else:
            step, fwd, n = cls.synthetic_step(pair, settings)
        step()
        fwd()
        out[pair] = dict(step_s=_time(step, 1), image_s=_time(fwd, 1) / n)
    return out


def estimate_cost(pairs: Sequence[str], settings: SuiteSettings, costs: Dict[str, Dict[str, float]],
                  scenes_cached: bool) -> float:
    """Seconds the suite needs with ``settings`` given the measured step costs (a planning model)."""
    from kim_plugins.suite import cls, diagnostics, seg, stability

    total = _REPORT_S + _FMNIST_S
    if any(p in seg.SEG_PAIRS for p in pairs) and not scenes_cached:
        total += _SCENE_S * (settings.num_train_scenes + settings.num_val_scenes)
    seen = set()  # identical runs of two pairs (e.g. the ASPP baseline at the scene size) are trained once
    for pair in pairs:
        c = costs[pair]
        if pair in seg.SEG_PAIRS:
            keys = {(head, repr(sorted(kw.items())), seg.pair_size(pair, settings))
                    for _, head, kw, _ in seg.SEG_PAIRS[pair]["variants"]}
            variants = len(keys - seen)
            seen |= keys
            per_run = (_SEG_OVERHEAD_S + 1.15 * settings.seg_iters * c["step_s"]
                       + 1.3 * settings.num_val_scenes * c["image_s"])
            calib = settings.se_calib_batches * settings.seg_batch * c["image_s"] if pair.startswith("se-") else 0.0
            probes = 2 * variants * 4 * max(settings.erf_images, settings.variance_images) * c["image_s"]
            total += settings.seeds * variants * per_run + settings.seeds * calib + probes
        elif pair in stability.STABILITY_PAIRS:
            total += stability.estimate_pair_cost(pair, settings, c, _CLS_OVERHEAD_S)
        elif pair in diagnostics.DIAG_PAIRS:
            total += diagnostics.estimate_pair_cost(pair, settings, c)
        else:
            variants = len(cls.CLS_PAIRS[pair]["variants"])
            per_run = (_CLS_OVERHEAD_S + 1.1 * settings.cls_iters * c["step_s"]
                       + settings.cls_test_images * c["image_s"])
            robust = variants * 11 * settings.robustness_images * c["image_s"] if pair == "vit" else 0.0
            total += settings.seeds * variants * per_run + robust
    return total


def plan_settings(pairs: Sequence[str], settings: SuiteSettings, costs: Dict[str, Dict[str, float]],
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
        ``{'out_dir', 'files', 'failed', 'wall_s', 'table'}``.
    """
    t_start = time.perf_counter()
    cpu_start = time.process_time()
    load_start = _load()
    base = preset(opts.suite)
    if opts.seeds is not None:
        if opts.seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {opts.seeds}")
        base.seeds = opts.seeds
    pairs = _selected_pairs(opts.only)
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
    from kim_plugins.suite import cls, diagnostics, seg, stability
    from kim_plugins.suite.data import cached_scenes, default_data_root, prepare_data
    from kim_plugins.suite.report import accuracy_table, summarize_pair, write_report

    fmnist_dir = find_fashion_mnist(opts.fashion_mnist)  # fail early, with the how-to-get-it message
    data_root = opts.data_root or default_data_root()

    print(f"[suite] {opts.suite}: pairs {', '.join(pairs)} | seeds {base.seeds} | device {device} | "
          f"threads {torch.get_num_threads()} | budget {budget_min or 'none'} min | out {out_dir}", flush=True)
    print("[suite] measuring a training step of each pair to plan within the budget ...", flush=True)
    costs = measure_step_costs(pairs, base, device)
    seg_pairs = [p for p in pairs if p in seg.SEG_PAIRS]
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
                        scenes=bool(seg_pairs))
    data_s = time.perf_counter() - t_data

    results, failed, pair_times, seg_cache = [], {}, {}, {}
    fixed = estimate_cost([], settings, costs, True)
    pair_est = {p: estimate_cost(pairs[:k + 1], settings, costs, True) - estimate_cost(pairs[:k], settings, costs, True)
                for k, p in enumerate(pairs)}
    for i, pair in enumerate(pairs):
        left = fixed + sum(pair_est[p] for p in pairs[i:])
        print(f"\n[suite] == {i + 1}/{len(pairs)} {pair} (about {pair_est[pair] / 60:.1f} min; elapsed "
              f"{(time.perf_counter() - t_start) / 60:.1f} min, about {left / 60:.1f} min left) ==", flush=True)
        t0 = time.perf_counter()
        try:
            if pair in seg.SEG_PAIRS:
                results.append(seg.run_seg_pair(pair, settings, data, out_dir, device, seg_cache))
            elif pair in stability.STABILITY_PAIRS:
                results.append(stability.run_stability_pair(pair, settings, data, out_dir, device))
            elif pair in diagnostics.DIAG_PAIRS:
                results.append(diagnostics.run_diag_pair(pair, settings, data, out_dir, device))
            else:
                results.append(cls.run_cls_pair(pair, settings, data, out_dir, device))
        except Exception as err:  # noqa: BLE001  one broken pair must not hide the others; reported below
            failed[pair] = f"{type(err).__name__}: {err}"
            traceback.print_exc()
        pair_times[pair] = time.perf_counter() - t0

    wall = time.perf_counter() - t_start
    argv = " ".join(opts.argv) if opts.argv else ""
    table = {
        "command": f"`python tools/benchmark_suite.py {argv}`".replace(" `", "`"),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "suite / seeds": f"{opts.suite} / {settings.seeds}",
        "pairs": ", ".join(pairs),
        "device": f"{device} ({os.cpu_count()} CPUs visible, {torch.get_num_threads()} torch threads)",
        "load average (1/5/15 min) at start / end": f"{load_start}  |  {_load()}",
        "wall time": f"{wall / 60:.1f} min (data {data_s:.0f} s; " + ", ".join(
            f"{p} {t:.0f} s" for p, t in pair_times.items()) + ")",
        "process CPU time": f"{(time.process_time() - cpu_start) / 60:.1f} min",
        "peak memory (RSS)": _peak_rss(),
        "budget": "none" if budget_min is None else f"{budget_min:g} min (plan scale {factor:g}, "
                                                     f"estimated {estimate / 60:.1f} min)",
        "data": f"Fashion-MNIST from `{data.fashion_mnist_dir}` (60k train / 10k test)"
                + (f"; Fashion scenes {data.num_train_scenes} train / {data.num_val_scenes} val, "
                   f"{data.scene_size}x{data.scene_size}, seed {data.scene_seed}, `{data.scenes_root}`"
                   if data.scenes_root else ""),
        "software": _versions(),
    }
    for pair, err in failed.items():
        notes.append(f"**Pair `{pair}` FAILED**: {err}")
    files = write_report(out_dir, results, dict(suite=opts.suite, table=table, notes=notes)) if results else {}
    if not results:
        with open(os.path.join(out_dir, "report.md"), "w") as f:
            f.write("# kim_plugins benchmark suite\n\nEvery pair failed:\n\n" +
                    "\n".join(f"- {p}: {e}" for p, e in failed.items()) + "\n")
        files["report.md"] = os.path.join(out_dir, "report.md")
    acc = accuracy_table({pr.pair: summarize_pair(pr) for pr in results}, {pr.pair: pr.title for pr in results}) \
        if results else ""
    print("\n" + acc + "\n", flush=True)
    for pair, err in failed.items():
        print(f"[suite] pair {pair} FAILED: {err}", file=sys.stderr)
    print(f"[suite] wall time {wall / 60:.1f} min; report: {files.get('report.md')}", flush=True)
    return dict(out_dir=out_dir, files=files, failed=failed, wall_s=wall, table=acc)
