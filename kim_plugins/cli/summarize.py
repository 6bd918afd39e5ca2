"""Baseline vs plugin table (Markdown + CSV) and bar chart from the work dirs of finished runs.

Usage::

    python tools/summarize.py WORK_DIR_OR_PARENT [...] --out results/summary
        [--metrics mIoU aAcc]

Reads what mmengine wrote, nothing typed in:

- each work dir (a folder holding ``<timestamp>/`` session folders, e.g.
  ``work_dirs/pspnet-se_r50-d8_4xb2-80k_cityscapes-512x1024_seed1``) is one
  run; its config name comes from the config mmengine dumped into it
  (``WORK_DIR/<config name>.py``);
- metrics: the latest test session's ``<timestamp>/<timestamp>.json``
  (``tools/test.py``) when there is one, otherwise the last validation
  entry of the latest training session's ``vis_data/scalars.json``;
- seed: ``randomness.seed`` of the dumped config, else the ``seed:`` line of
  the session log (mmengine draws one when the config has none).

Runs are grouped by config name; a plugin config is paired with the baseline
whose name is its own minus the plugin tag (``pspnet-se_...`` -> ``pspnet_...``,
see ``kim_plugins.config_names``). Several seeds of a config give mean ± std
(sample std); the same seed twice keeps the latest run. Writes
``OUT.md``, ``OUT.csv`` and ``OUT.png``.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import os.path as osp
import re
import statistics
import sys
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from kim_plugins.config_names import METHOD_TAGS, find_baseline, parse_config_name
from kim_plugins.markdown import markdown_table

_SESSION = re.compile(r"^\d{8}_\d{6}$")
_NOT_METRICS = {"lr", "data_time", "time", "iter", "step", "epoch", "memory", "base_lr"}
MAIN_METRICS = ("mIoU", "mDice", "mFscore")


@dataclass
class RunResult:
    """One finished run (one work dir)."""

    work_dir: str
    config: str
    seed: Optional[int]
    metrics: Dict[str, float]
    source: str  # 'test' or 'val'
    session: str  # timestamp of the session the metrics come from


@dataclass
class Row:
    """One line of the table: a (baseline, plugin) pair and one metric."""

    dataset: str
    model: str
    method: str
    metric: str
    baseline_config: str
    plugin_config: str
    baseline_values: List[float] = field(default_factory=list)
    plugin_values: List[float] = field(default_factory=list)
    baseline_seeds: List[Optional[int]] = field(default_factory=list)
    plugin_seeds: List[Optional[int]] = field(default_factory=list)

    @staticmethod
    def _mean_std(values: Sequence[float]) -> Tuple[float, Optional[float]]:
        mean = statistics.fmean(values)
        return mean, (statistics.stdev(values) if len(values) > 1 else None)

    @property
    def baseline_mean(self) -> float:
        return self._mean_std(self.baseline_values)[0]

    @property
    def plugin_mean(self) -> float:
        return self._mean_std(self.plugin_values)[0]

    @property
    def delta(self) -> float:
        return self.plugin_mean - self.baseline_mean

    def as_csv(self) -> Dict[str, object]:
        bm, bs = self._mean_std(self.baseline_values)
        pm, ps = self._mean_std(self.plugin_values)
        return dict(dataset=self.dataset, model=self.model, method=self.method, metric=self.metric,
                    baseline_mean=bm, baseline_std="" if bs is None else bs, baseline_n=len(self.baseline_values),
                    plugin_mean=pm, plugin_std="" if ps is None else ps, plugin_n=len(self.plugin_values),
                    delta=pm - bm, baseline_seeds=_seeds(self.baseline_seeds), plugin_seeds=_seeds(self.plugin_seeds),
                    baseline_config=self.baseline_config, plugin_config=self.plugin_config)


def _seeds(seeds: Sequence[Optional[int]]) -> str:
    return ",".join("?" if s is None else str(s) for s in seeds)


def _fmt(values: Sequence[float]) -> str:
    mean = statistics.fmean(values)
    if len(values) > 1:
        return f"{mean:.2f} ± {statistics.stdev(values):.2f}"
    return f"{mean:.2f}"


# --------------------------------------------------------------------------- reading runs

def find_work_dirs(paths: Iterable[str]) -> List[str]:
    """Folders under ``paths`` (themselves included) that hold mmengine session folders."""
    found = []
    for path in paths:
        if not osp.isdir(path):
            raise FileNotFoundError(f"{path!r} is not a directory")
        for dirpath, dirnames, _ in os.walk(path):
            sessions = [d for d in dirnames if _SESSION.match(d)]
            if sessions:
                found.append(dirpath)
            dirnames[:] = [d for d in dirnames if not _SESSION.match(d)]
    return sorted(set(found))


def _json_lines(path: str) -> List[dict]:
    out = []
    if not osp.isfile(path):
        return out
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                out.append(json.loads(line))
    return out


def _metrics_of(entry: dict) -> Dict[str, float]:
    return {k: float(v) for k, v in entry.items()
            if k not in _NOT_METRICS and "loss" not in k and "acc_seg" not in k
            and isinstance(v, (int, float))}


def _config_name(work_dir: str, session_dir: str) -> str:
    pys = sorted(f for f in os.listdir(work_dir) if f.endswith(".py"))
    if len(pys) == 1:
        return pys[0][:-3]
    dumped = osp.join(session_dir, "vis_data", "config.py")
    if pys and osp.isfile(dumped):
        text = open(dumped).read()
        same = [p for p in pys if open(osp.join(work_dir, p)).read() == text]
        if len(same) == 1:
            return same[0][:-3]
    if pys:
        raise ValueError(f"{work_dir} holds several configs {pys}; give each run its own work dir")
    return osp.basename(osp.normpath(work_dir))


def _seed(session_dir: str) -> Optional[int]:
    dumped = osp.join(session_dir, "vis_data", "config.py")
    if osp.isfile(dumped):
        m = re.search(r"randomness\s*=\s*dict\([^)]*seed\s*=\s*(\d+)", open(dumped).read(), re.S)
        if m:
            return int(m.group(1))
    log = osp.join(session_dir, osp.basename(session_dir) + ".log")
    if osp.isfile(log):
        m = re.search(r"^\s+seed: (\d+)\s*$", open(log).read(), re.M)
        if m:
            return int(m.group(1))
    return None


def read_run(work_dir: str) -> Optional[RunResult]:
    """The final metrics of one work dir, or ``None`` when no session has any."""
    sessions = sorted(d for d in os.listdir(work_dir) if _SESSION.match(d) and osp.isdir(osp.join(work_dir, d)))
    test, val, train_session = None, None, None
    for s in sessions:
        sdir = osp.join(work_dir, s)
        scalars = _json_lines(osp.join(sdir, "vis_data", "scalars.json"))
        if any("loss" in e for e in scalars):
            train_session = s
        vals = [_metrics_of(e) for e in scalars if "loss" not in e]
        vals = [v for v in vals if v]
        if vals:
            val = (s, vals[-1])
        tests = [_metrics_of(e) for e in _json_lines(osp.join(sdir, s + ".json")) if "step" not in e]
        tests = [t for t in tests if t]
        if tests:
            test = (s, tests[-1])
    chosen, source = (test, "test") if test else (val, "val")
    if chosen is None:
        return None
    session, metrics = chosen
    if train_session is not None:
        seed = _seed(osp.join(work_dir, train_session))
    else:  # a test-only work dir: the seed of the run that wrote the checkpoint
        seed = _checkpoint_run_seed(osp.join(work_dir, session))
    return RunResult(work_dir=work_dir, config=_config_name(work_dir, osp.join(work_dir, session)),
                     seed=seed, metrics=metrics, source=source, session=session)


def _checkpoint_run_seed(test_session_dir: str) -> Optional[int]:
    """Seed of the training run whose work dir holds the checkpoint a test session loaded."""
    dumped = osp.join(test_session_dir, "vis_data", "config.py")
    if not osp.isfile(dumped):
        return None
    m = re.search(r"^load_from\s*=\s*['\"](.+?)['\"]", open(dumped).read(), re.M)
    ckpt_dir = osp.dirname(m.group(1)) if m else None
    if not ckpt_dir or not osp.isdir(ckpt_dir):
        return None
    for s in sorted(os.listdir(ckpt_dir), reverse=True):
        scalars = osp.join(ckpt_dir, s, "vis_data", "scalars.json")
        if _SESSION.match(s) and any("loss" in e for e in _json_lines(scalars)):
            return _seed(osp.join(ckpt_dir, s))
    return None


def collect_runs(paths: Iterable[str]) -> List[RunResult]:
    """Every finished run under ``paths``; the same (config, seed) twice keeps the latest."""
    runs: Dict[Tuple[str, object], RunResult] = {}
    for wd in find_work_dirs(paths):
        run = read_run(wd)
        if run is None:
            continue
        key = (run.config, run.seed if run.seed is not None else wd)
        if key in runs:
            old = runs[key]
            keep, drop = (run, old) if run.session > old.session else (old, run)
            print(f"warning: {run.config} seed {run.seed} found twice; keeping {keep.work_dir}, "
                  f"ignoring {drop.work_dir}", file=sys.stderr)
            run = keep
        runs[key] = run
    return sorted(runs.values(), key=lambda r: (r.config, str(r.seed)))


# --------------------------------------------------------------------------- table

def summarize(runs: Sequence[RunResult], metrics: Optional[Sequence[str]] = None) -> Tuple[List[Row], List[str]]:
    """Pair plugin runs with their baselines.

    Args:
        runs: From :func:`collect_runs`.
        metrics: Metrics to report; default: those of ``mIoU``, ``mDice``, ``mFscore`` that both sides have.

    Returns:
        The rows, and the config names that found no partner.
    """
    by_config: Dict[str, List[RunResult]] = {}
    for r in runs:
        by_config.setdefault(r.config, []).append(r)
    names = set(by_config)
    rows: List[Row] = []
    paired = set()
    for name in sorted(names):
        found = find_baseline(name, names) if _follows_scheme(name) else None
        if found is None:
            continue
        base, tag = found
        paired |= {name, base}
        parsed = parse_config_name(base)
        plugin_runs, base_runs = by_config[name], by_config[base]
        common = set.intersection(*[set(r.metrics) for r in plugin_runs + base_runs])
        wanted = list(metrics) if metrics else [m for m in MAIN_METRICS if m in common]
        for metric in wanted:
            if metric not in common:
                raise KeyError(f"metric {metric!r} missing from some runs of {base} / {name}; "
                               f"available in all: {sorted(common)}")
            rows.append(Row(dataset=parsed.dataset, model=parsed.model, method=METHOD_TAGS.get(tag, tag),
                            metric=metric, baseline_config=base, plugin_config=name,
                            baseline_values=[r.metrics[metric] for r in base_runs],
                            plugin_values=[r.metrics[metric] for r in plugin_runs],
                            baseline_seeds=[r.seed for r in base_runs], plugin_seeds=[r.seed for r in plugin_runs]))
    unpaired = sorted(names - paired)
    return rows, unpaired


def _follows_scheme(name: str) -> bool:
    try:
        parse_config_name(name)
        return True
    except ValueError:
        return False


def to_markdown(rows: Sequence[Row], unpaired: Sequence[str], runs: Sequence[RunResult]) -> str:
    table = [dict(dataset=r.dataset, model=r.model, method=r.method, metric=r.metric,
                  baseline=_fmt(r.baseline_values), plugin=_fmt(r.plugin_values), delta=f"{r.delta:+.2f}",
                  seeds=f"{_seeds(r.baseline_seeds)} / {_seeds(r.plugin_seeds)}") for r in rows]
    columns = ["dataset", "model", "method", "metric", "baseline", "plugin", "delta", "seeds"]
    headers = columns[:6] + ["Δ", "seeds (baseline / plugin)"]
    out = ["# Baseline vs plugin", "",
           "Mean ± sample std over seeds; Δ = plugin mean − baseline mean. Read from the runs' own outputs "
           "(test results where present, else the last validation).", "",
           markdown_table(table, columns, headers, empty="(no plugin run has its baseline among the runs)")]
    if unpaired:
        out += ["", "Runs without a partner: " + ", ".join(f"`{u}`" for u in unpaired)]
    out += ["", "Runs:", ""] + [f"- `{r.config}` seed {r.seed} ({r.source}, {r.session}): {r.work_dir}"
                                for r in runs]
    return "\n".join(out) + "\n"


def write_csv(rows: Sequence[Row], path: str) -> None:
    fields = list(Row("", "", "", "", "", "", [0.0], [0.0]).as_csv())
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow(r.as_csv())


def plot(rows: Sequence[Row], path: str) -> None:
    """Grouped bars (baseline, plugin) per pair, one panel per metric, error bars = std."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    metrics = list(dict.fromkeys(r.metric for r in rows))
    fig, axes = plt.subplots(len(metrics), 1, figsize=(max(6.0, 1.6 * max(1, len(rows))), 3.6 * len(metrics)),
                             squeeze=False)
    for ax, metric in zip(axes[:, 0], metrics):
        sel = [r for r in rows if r.metric == metric]
        x = np.arange(len(sel))
        for off, side, color in ((-0.2, "baseline", "#9e9e9e"), (0.2, "plugin", "#1f77b4")):
            vals = [getattr(r, f"{side}_values") for r in sel]
            means = [statistics.fmean(v) for v in vals]
            errs = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals]
            ax.bar(x + off, means, 0.4, yerr=errs, capsize=3, label=side, color=color)
        for xi, r in zip(x, sel):
            ax.annotate(f"{r.delta:+.2f}", (xi, max(r.baseline_mean, r.plugin_mean)), ha="center",
                        va="bottom", fontsize=8)
        ax.set_xlim(-0.8, len(sel) - 0.2)
        ax.set_xticks(x)
        ax.set_xticklabels([f"{r.dataset}\n{r.model}\n{r.method}" for r in sel], fontsize=7)
        ax.set_ylabel(metric)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("work_dirs", nargs="+", help="work dirs of finished runs, or folders holding them")
    p.add_argument("--out", default="summary", help="output prefix: writes OUT.md, OUT.csv, OUT.png")
    p.add_argument("--metrics", nargs="+", help="metrics to report (default: mIoU / mDice / mFscore)")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> List[Row]:
    """Collect the runs, pair plugins with baselines, write the table, CSV and chart; return the rows."""
    runs = collect_runs(args.work_dirs)
    if not runs:
        raise SystemExit(f"no finished run (scalars.json or test results) under {args.work_dirs}")
    rows, unpaired = summarize(runs, args.metrics)
    os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
    md = to_markdown(rows, unpaired, runs)
    with open(args.out + ".md", "w") as f:
        f.write(md)
    write_csv(rows, args.out + ".csv")
    if rows:
        plot(rows, args.out + ".png")
    print(md)
    print(f"wrote {args.out}.md, {args.out}.csv" + (f", {args.out}.png" if rows else " (no pairs: no chart)"))
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    run(parse_args(argv))
    return 0
