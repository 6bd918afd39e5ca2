"""Turn the suite's :class:`~kim_plugins.suite.records.PairResult` s into report.md, CSV files and PNG plots.

Every number written here comes from the run's records; nothing is typed in.
Accuracy deltas carry their seed spread: a delta is called "not significant"
when there is a single seed (no spread to judge it by) or when it is within
two standard errors of the difference of the seed means,
``2 * sqrt(s_b^2 / n_b + s_v^2 / n_v)`` (``s`` the sample standard deviation
over seeds).
"""
from __future__ import annotations

import csv
import math
import os
import statistics
from typing import Any, Dict, List, Sequence

from kim_plugins.markdown import FLOP_HEADER_NOTE, markdown_table
from kim_plugins.suite.records import PairResult, RunRecord, same_fingerprints

__all__ = ["summarize_pair", "significance", "accuracy_table", "write_report", "PLOTS", "pyplot"]


def __getattr__(name):
    if name == "PLOTS":
        #: The PNG files every full report has (a pair that did not run leaves its plot out): file -> ``--only`` group.
        from kim_plugins.suite.pairs import all_pairs

        return dict({"metric_bars.png": None}, **{f: p.group for p in all_pairs() for f in p.plots})
    raise AttributeError(name)

DISCLAIMER = (
    "**A short CPU run is a sanity check, not a reproduction of the papers' tables.** The papers' accuracy "
    "effects are small (scale equalizers: +0.1 to +0.4 mIoU on ADE20K/VOC/Cityscapes) and far below the "
    "seed-to-seed noise of a minutes-long run on tiny models, so this report leads with what such a run shows "
    "for certain: the mechanisms. Accuracy deltas follow, each with its seed spread.")


def _stats(values: Sequence[float]):
    n = len(values)
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if n > 1 else float("nan")
    return n, mean, std


def significance(base: Sequence[float], other: Sequence[float]) -> Dict[str, Any]:
    """Delta of the means and its verdict against the seed spread."""
    nb, mb, sb = _stats(base)
    nv, mv, sv = _stats(other)
    delta = mv - mb
    if nb < 2 or nv < 2:
        return dict(delta=delta, delta_se=float("nan"), verdict="not significant (1 seed: no spread)")
    se = math.sqrt(sb ** 2 / nb + sv ** 2 / nv)
    if abs(delta) <= 2 * se:
        verdict = "not significant (within seed spread)"
    else:
        verdict = f"beyond 2 std. errors ({min(nb, nv)} seeds)"
    return dict(delta=delta, delta_se=se, verdict=verdict)


def summarize_pair(pr: PairResult) -> List[Dict[str, Any]]:
    """One row per variant: mean/std over seeds, delta vs baseline and verdict, time, params, FLOPs."""
    variants: Dict[str, List[RunRecord]] = {}
    for r in pr.runs:
        variants.setdefault(r.variant, []).append(r)
    base_name = next(r.variant for r in pr.runs if r.baseline)
    base_vals = [r.value for r in variants[base_name]]
    rows = []
    for name, runs in variants.items():
        vals = [r.value for r in runs]
        n, mean, std = _stats(vals)
        row = dict(pair=pr.pair, variant=name, baseline=runs[0].baseline, metric=pr.metric, seeds=n, mean=mean,
                   std=std, values=vals, train_time_s=statistics.fmean(r.train_time_s for r in runs),
                   iters=runs[0].iters, params=runs[0].params, gflops=runs[0].gflops)
        if runs[0].baseline:
            row.update(delta=0.0, delta_se=float("nan"), verdict="baseline")
        else:
            row.update(significance(base_vals, vals))
        row["extra"] = runs[0].extra
        rows.append(row)
    return rows


def pair_checks(pr: PairResult) -> Dict[str, str]:
    """Same data order and same initial shared parameters as the baseline, per seed."""
    out = {}
    by_seed: Dict[int, List[RunRecord]] = {}
    for r in pr.runs:
        by_seed.setdefault(r.seed, []).append(r)
    order_ok, init_ok = True, True
    for seed, runs in by_seed.items():
        base = next(r for r in runs if r.baseline)
        for r in runs:
            order_ok &= r.data_order == base.data_order
            same = same_fingerprints(base.init_params, r.init_params)
            init_ok &= same is not False
    out["same data order and augmentation in every variant (per seed)"] = "yes" if order_ok else "**NO**"
    out["same initial values of the shared parameters (per seed)"] = "yes" if init_ok else "**NO**"
    return out


# ---------------------------------------------------------------------------------------------------------
# formatting helpers
# ---------------------------------------------------------------------------------------------------------

def _f(v: Any, fmt: str = "{:.2f}") -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else fmt.format(v)
    return str(v)


def _accuracy_rows(summaries: Dict[str, List[Dict[str, Any]]]) -> List[Dict[str, str]]:
    out = []
    for pair, rows in summaries.items():
        for r in rows:
            value = _f(r["mean"]) if r["seeds"] == 1 else f"{_f(r['mean'])} ± {_f(r['std'])}"
            delta = "—" if r["baseline"] else (f"{r['delta']:+.2f}" + ("" if math.isnan(r["delta_se"])
                                                                      else f" (± {r['delta_se']:.2f})"))
            shared = r["extra"].get("shared_with")
            out.append(dict(pair=pair, variant=r["variant"] + (" (baseline)" if r["baseline"] else "")
                            + (f" — same run as in {shared}" if shared else ""),
                            metric=f"{r['metric']} %", value=value, delta=delta, verdict=r["verdict"],
                            time=f"{r['train_time_s']:.1f}", iters=str(r["iters"]),
                            params=f"{r['params'] / 1e6:.3f}M", gflops=f"{r['gflops']:.3f}"))
    return out


ACC_COLUMNS = ["pair", "variant", "metric", "value", "delta", "verdict", "time", "iters", "params", "gflops"]
ACC_HEADERS = ["pair", "variant", "metric", "value (mean ± std over seeds)", "Δ vs baseline (± std. err.)",
               "significance", "train time (s)", "iters", "params", "GFLOPs/img (MAC=1)"]


def accuracy_table(summaries: Dict[str, List[Dict[str, Any]]]) -> str:
    """The Markdown accuracy table with the FLOP convention under it (also printed at the end of a run)."""
    return markdown_table(_accuracy_rows(summaries), ACC_COLUMNS, ACC_HEADERS) + "\n\n" + FLOP_HEADER_NOTE


# ---------------------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------------------

def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_metric_bars(summaries: Dict[str, List[Dict[str, Any]]], titles: Dict[str, str], path: str) -> None:
    plt = pyplot()
    import textwrap

    pairs = list(summaries)
    cols = min(3, len(pairs))
    rows_n = math.ceil(len(pairs) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.8 * rows_n), squeeze=False)
    for ax in axes.flat[len(pairs):]:
        ax.axis("off")
    for ax, pair in zip(axes.flat, pairs):
        rows = summaries[pair]
        xs = range(len(rows))
        means = [r["mean"] for r in rows]
        errs = [0.0 if math.isnan(r["std"]) else r["std"] for r in rows]
        ax.bar(xs, means, yerr=errs, capsize=4, color=["#888888" if r["baseline"] else "#3b75af" for r in rows])
        for i, r in enumerate(rows):
            ax.scatter([i] * len(r["values"]), r["values"], color="k", s=10, zorder=3)
        ax.set_xticks(list(xs))
        ax.set_xticklabels([r["variant"] for r in rows], rotation=30, ha="right", fontsize=7)
        ax.set_ylabel(f"{rows[0]['metric']} (%)")
        ax.set_title("\n".join(textwrap.wrap(titles[pair], 45)), fontsize=8)
        lo = min(min(r["values"]) for r in rows)
        hi = max(max(r["values"]) for r in rows)
        pad = max(1.0, 0.5 * (hi - lo))
        ax.set_ylim(max(0.0, lo - pad), min(100.0, hi + pad))
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Accuracy per variant (bars: mean over seeds ± std; dots: seeds; grey: baseline; y axis not at 0)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------
# writing everything
# ---------------------------------------------------------------------------------------------------------

def write_report(out_dir: str, results: List[PairResult], run_info: Dict[str, Any]) -> Dict[str, str]:
    """Write report.md, results.csv, runs.csv and the plots; return ``{name: path}``."""
    os.makedirs(out_dir, exist_ok=True)
    summaries = {pr.pair: summarize_pair(pr) for pr in results}
    titles = {pr.pair: pr.title for pr in results}
    files: Dict[str, str] = {}

    # CSV
    path = os.path.join(out_dir, "results.csv")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["pair", "variant", "baseline", "metric", "seeds", "mean", "std", "delta", "delta_std_err",
                    "significance", "train_time_s", "iters", "params", "gflops"])
        for pair, rows in summaries.items():
            for r in rows:
                w.writerow([pair, r["variant"], r["baseline"], r["metric"], r["seeds"], f"{r['mean']:.4f}",
                            f"{r['std']:.4f}", f"{r['delta']:.4f}", f"{r['delta_se']:.4f}", r["verdict"],
                            f"{r['train_time_s']:.2f}", r["iters"], r["params"], f"{r['gflops']:.5f}"])
    files["results.csv"] = path
    path = os.path.join(out_dir, "runs.csv")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["pair", "variant", "baseline", "seed", "metric", "value", "train_time_s", "iters", "params",
                    "gflops", "data_order_sha1", "extra"])
        for pr in results:
            for r in pr.runs:
                w.writerow([r.pair, r.variant, r.baseline, r.seed, r.metric, f"{r.value:.4f}",
                            f"{r.train_time_s:.2f}", r.iters, r.params, f"{r.gflops:.5f}", r.data_order,
                            ";".join(f"{k}={v}" for k, v in r.extra.items())])
    files["runs.csv"] = path

    # plots, and the mechanism sections: one per section key of the pairs that ran, in run order
    from kim_plugins.suite.pairs import get_pair

    plot_metric_bars(summaries, titles, os.path.join(out_dir, "metric_bars.png"))
    files["metric_bars.png"] = os.path.join(out_dir, "metric_bars.png")
    sections: Dict[str, List[PairResult]] = {}
    owners = {}
    for pr in results:
        pair = get_pair(pr.pair)
        sections.setdefault(pair.section, []).append(pr)
        owners.setdefault(pair.section, pair)
    mechanism_lines: List[str] = []
    for key, prs in sections.items():
        files.update(owners[key].write_plots(prs, out_dir))
        section = owners[key].report_section(prs)
        if section:
            mechanism_lines += section + [""]

    # report.md
    info = run_info
    lines = [f"# kim_plugins benchmark suite — `{info['suite']}`", "", DISCLAIMER, "",
             "## Run", "",
             markdown_table([dict(k=k, v=v) for k, v in info["table"].items()], ["k", "v"], ["", ""]), ""]
    if info.get("notes"):
        lines += [f"- {n}" for n in info["notes"]] + [""]
    if info.get("replans"):
        lines += ["### Budget re-plans", "",
                  "Before every pair the iterations of what is left were re-planned from the measured progress "
                  "(time spent over the plan's estimate of the work done = the pace): when the pace times the "
                  "estimate of what is left exceeded the time left, the pair's iterations were shrunk to fit "
                  "(models, batches, seeds and evaluation sizes unchanged; a pair's variants and seeds share one "
                  "iteration count).", "", info["replans"], ""]
    lines += ["## 1. Mechanisms (what a short run shows for certain)", ""] + mechanism_lines
    lines += ["## 2. Accuracy against each baseline", "",
              "Δ = mean(variant) − mean(baseline) over the same seeds; \"not significant\" when a single seed was "
              "run or |Δ| ≤ 2·sqrt(s_b²/n + s_v²/n) (s: sample std over seeds). Train time is the wall time of "
              "training (SE calibration included, evaluation excluded) on this machine under its load; "
              "GFLOPs: forward of one image (convolutions, matmuls, attention; `torch.utils.flop_counter`, "
              "halved to count a multiply-add once).",
              "", accuracy_table(summaries), "", "![accuracy](metric_bars.png)", "",
              "## 3. What was compared", ""]
    for pr in results:
        lines += [f"**{pr.pair} — {pr.title}.** {pr.description}", ""]
        for k, v in pair_checks(pr).items():
            lines.append(f"- {k}: {v}")
        lines.append("")
    lines += ["## Files", "", "- `results.csv`: one row per variant (the table above); `runs.csv`: one row per "
              "trained model and seed; `runs/`: mmengine work dirs of the segmentation runs.",
              "- Plots: " + ", ".join(f"`{k}`" for k in files if k.endswith(".png")), ""]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    files["report.md"] = path
    return files
