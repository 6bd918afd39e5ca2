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
from typing import Any, Dict, List, Optional, Sequence

from kim_plugins.suite.records import PairResult, RunRecord, same_fingerprints

__all__ = ["summarize_pair", "significance", "write_report", "PLOTS"]

#: The PNG files every full report has (a pair that did not run leaves its plot out).
PLOTS = {"metric_bars.png": None, "se_variance.png": "se", "erf_rates.png": "rates", "robustness.png": "vit",
         "sap_consistency.png": "sap"}

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


def _table(rows: List[Dict[str, Any]], columns: List[str], headers: Optional[List[str]] = None) -> str:
    headers = headers or columns
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def _accuracy_rows(summaries: Dict[str, List[Dict[str, Any]]], titles: Dict[str, str]) -> List[Dict[str, str]]:
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
               "significance", "train time (s)", "iters", "params", "GFLOPs/img"]


def accuracy_table(summaries: Dict[str, List[Dict[str, Any]]], titles: Dict[str, str]) -> str:
    """The Markdown accuracy table (also printed at the end of a run)."""
    return _table(_accuracy_rows(summaries, titles), ACC_COLUMNS, ACC_HEADERS)


# ---------------------------------------------------------------------------------------------------------
# mechanism sections
# ---------------------------------------------------------------------------------------------------------

def _spread(operands: List[Dict[str, Any]], key: str = "var") -> float:
    vs = [o[key] for o in operands]
    return max(vs) / max(min(vs), 1e-30)


def _se_section(prs: List[PairResult]) -> List[str]:
    lines = ["### Scale equalizers: the variance of each branch entering a fusion",
             "",
             "Bilinear upsampling lowers a map's variance (i.i.d. input: x2 -> 0.39, x4 -> 0.43, limit 4/9), so "
             "the branches a decoder concatenates or adds sit on different scales. Measured on the first "
             "validation scenes with the model as in training (BatchNorm on batch statistics, no update), for "
             "every operand of every fusion that takes an upsampled map: the population variance over N·C·H·W. "
             "*start* = initial weights (SE heads: right after the calibration hook), *end* = after training. "
             "*without SE* = the same operand without its equalizer (the equalizer is the scalar affine map "
             "x·s + t, so that is Var / s²).",
             ""]
    for pr in prs:
        var = pr.mechanism.get("variance", {})
        names = list(var)
        if len(names) != 2:
            continue
        base, se = names
        bt, st = var[base]["table"], var[se]["table"]
        lines += [f"**{pr.title}** (seed 0)", ""]
        rows = []
        for b, t in zip(bt, st):
            def with_without(row, when):
                w = row[f"var_{when}_without_se"]
                return f"{row[f'var_{when}']:.3g}" + ("" if w is None else f" (without SE {w:.3g})")
            rows.append(dict(fusion=b["fusion"], op=t["operand"], vb0=f"{b['var_start']:.3g}",
                             vb1=f"{b['var_end']:.3g}", vs0=with_without(t, "start"), vs1=with_without(t, "end")))
        lines.append(_table(rows, ["fusion", "op", "vb0", "vb1", "vs0", "vs1"],
                            ["fusion", "operand (in the SE head)", f"{base}: Var start", "end", f"{se}: Var start",
                             "end"]))
        lines.append("")
        fusions = list(dict.fromkeys(r["fusion"] for r in bt))
        alt = var[se].get("upsampled_only_start")
        spread_rows = []
        for k, fusion in enumerate(fusions):
            def sp(table, key):
                return _spread([r for r in table if r["fusion"] == fusion], key)
            row = dict(fusion=fusion, b0=f"{sp(bt, 'var_start'):.2f}", b1=f"{sp(bt, 'var_end'):.2f}",
                       s0=f"{sp(st, 'var_start'):.2f}", s1=f"{sp(st, 'var_end'):.2f}")
            if alt is not None and k < len(alt["fusions"]):
                row["a0"] = f"{_spread(alt['fusions'][k]['operands']):.2f}"
            spread_rows.append(row)
        cols = ["fusion", "b0", "b1", "s0", "s1"] + (["a0"] if alt is not None else [])
        heads = ["fusion", f"{base} start", "end", f"{se} start", "end"] + (
            [f"{se}, upsampled operands only (`equalize_all_branches=False`), start"] if alt is not None else [])
        lines += ["Spread of the operand variances in each fusion (max / min; 1 = scale equilibrium):", "",
                  _table(spread_rows, cols, heads), "",
                  f"By default (`equalize_all_branches=True` [decision], for the paper's promised scale equilibrium) "
                  f"every operand of each fusion that an upsampling feeds is standardised with dataset-wide "
                  f"statistics (variance 1 on the calibration data). The last column rebuilds the same initial "
                  f"weights with the alternative, literal placement — equalizers after the upsamplings only "
                  f"(`equalize_all_branches=False`), calibrated on training scenes: the branches that are not "
                  f"upsampled then keep the scale the network gives them, and the spread is that scale against 1.",
                  ""]
    lines.append("![per-branch variance](se_variance.png)")
    return lines


def _erf_section(prs: List[PairResult]) -> List[str]:
    lines = ["### Atrous rates: the ERF lattice of each rate setting",
             "",
             "Effective receptive field of the centre output pixel (gradient of the decoder features before "
             "`conv_seg`, channel mean, w.r.t. the input, RGB-averaged, clipped at 0, summed over validation "
             "scenes, normalised; `kim_plugins.layers.erf`), at initialisation and after training. ASPP's ERF is a "
             "lattice: the centre plus satellites at ±rate·OS input pixels. A branch whose rate exceeds "
             "floor((F - 1) / 2) on the F-pixel feature map is degenerate: no output position sees its whole 3x3 "
             "kernel inside the map. Coverage = fraction of the image where the ERF exceeds 1 % of its maximum.",
             ""]
    rows = []
    for pr in prs:
        size = pr.mechanism.get("size")
        for name, probes in pr.mechanism.get("erf", {}).items():
            rates = pr.mechanism["rates"].get(name, ())
            os_ = next((r.extra.get("output_stride") for r in pr.runs if r.variant == name and r.seed == 0), None)
            inside = [r for r in rates if r > 1 and r <= (-(-size // (os_ or 8)) - 1) // 2]  # non-degenerate
            for when in ("start", "end"):
                p = probes[when]
                rows.append(dict(size=f"{size}x{size}", variant=name, rates=str(rates), os=str(os_),
                                 sat=", ".join(f"±{r * (os_ or 8)}" for r in rates if r > 1),
                                 inside=f"{len(inside)}/{len([r for r in rates if r > 1])}",
                                 when="init" if when == "start" else "trained",
                                 sigma=f"{p['sigma_y']:.1f} x {p['sigma_x']:.1f}",
                                 side=f"{p['side_50']} / {p['side_90']}", cov=f"{100 * p['coverage']:.1f} %"))
    lines.append(_table(rows, ["size", "variant", "rates", "os", "sat", "inside", "when", "sigma", "side", "cov"],
                        ["input", "variant", "rates", "output stride (measured)", "satellites (px)",
                         "non-degenerate dilated branches", "weights", "Gaussian σ_y x σ_x (px)",
                         "50 % / 90 % mass square (px)", "coverage"]))
    lines += ["", "![ERF lattice per rate setting](erf_rates.png)"]
    return lines


def _vit_section(pr: PairResult) -> List[str]:
    rob = pr.mechanism.get("robustness", {})
    acc = rob.get("accuracy", {})
    rows_def = rob.get("rows", [])
    lines = ["### PreLayerNorm: accuracy under contrast change",
             "",
             f"Top-1 (%) of the seed-0 models on the first {rob.get('images')} Fashion-MNIST test images under "
             "ImageNet-C contrast change `clip((x - mean) * c + mean, 0, 1)` (reduction c < 1, enhancement c > 1; "
             "`tools/robustness.py`). A contrast change scales the patch embedding but not the positional "
             "embedding; PLN normalises the projected patch tokens before the positional embedding is added.",
             ""]
    names = list(acc)
    table_rows = []
    for kind, sev, c in rows_def:
        row = dict(kind=kind, sev=str(sev), c=f"{c:g}")
        for i, n in enumerate(names):
            row[f"m{i}"] = f"{acc[n][c]:.2f}"
        table_rows.append(row)
    lines.append(_table(table_rows, ["kind", "sev", "c"] + [f"m{i}" for i in range(len(names))],
                        ["contrast", "severity", "factor c"] + names))
    inv = [(r.variant, r.extra.get("pln_scale_max_abs_logit_change")) for r in pr.runs
           if r.seed == 0 and "pln_scale_max_abs_logit_change" in r.extra]
    if inv:
        lines += ["", "Invariance to the image's scale, model(α·x) = model(x): largest |logit change| of the "
                      "trained model when its normalised input images are multiplied by α ∈ {0.25, 0.5, 2, 4} "
                      "(PLN's projection is bias-free, so LN(α·xE) = LN(xE)):", "",
                  _table([dict(v=v, d=f"{d:.3g}") for v, d in inv], ["v", "d"], ["variant", "max |Δ logit|"])]
    lines += _gab_table(pr)
    lines += ["", "![contrast robustness](robustness.png)"]
    return lines


def _gab_table(pr: PairResult) -> List[str]:
    """The learnt σ and a of every GAB block (seed 0), if the pair has GAB variants."""
    gab = pr.mechanism.get("gab", {})
    if not gab:
        return []
    grows = [dict(v=v, sig=", ".join(f"{s:.2f}" for g in blocks for s in g["sigma"]),
                  amp=", ".join(f"{a:.2f}" for g in blocks for a in g["amplitude"]))
             for v, blocks in gab.items()]
    return ["", "Learnt Gaussian attention bias (σ in patches, initialised 5; amplitude a, initialised 2: "
                "supplement §C), seed 0, block by block:", "",
            _table(grows, ["v", "sig", "amp"], ["variant", "σ per block", "a per block"])]


def _swin_section(pr: PairResult) -> List[str]:
    lines = ["### Gaussian attention bias on Swin",
             "",
             "Every window attention of the GAB Swin adds a² · exp(-(dh² + dw²) / (2σ²)) of the in-window "
             "offsets to Swin's relative position bias (the paper's ADE20K / COCO host)."]
    return lines + _gab_table(pr)


def _sap_section(pr: PairResult) -> List[str]:
    m = pr.mechanism.get("sap", {})
    if not m:
        return []
    lines = ["### Stochastic average pooling: train/eval consistency",
             "",
             f"On the trained seed-0 SAP model ({len(m['stochastic_pools'])} stochastic pools, keep probability "
             f"{m['keep_prob']:g}), 256 test images:",
             "",
             _table([
                 dict(k="pooled map before the global pool", v=f"{m['pooled_map'][0]}x{m['pooled_map'][1]}"),
                 dict(k="eval output bit-identical to the plain ResNet-18-D with the same weights",
                      v="yes" if m["eval_bit_identical_to_plain"] else "**NO**"),
                 dict(k="train-mode output (only the SAP pools stochastic) differs from eval (asserted)",
                      v=f"yes: max |Δ logit| {m['max_abs_logit_diff_train_vs_eval']:.3g}, "
                        f"{100 * m['frac_logits_changed']:.1f} % of logits changed"),
                 dict(k=f"global pool, train mode: |E[train] - eval| / |eval| over {m['draws']} draws",
                      v=f"SAP {m['sap_mean_rel_err']:.3f} vs inverted dropout (p={m['dropout_p']:g}) "
                        f"{m['dropout_mean_rel_err']:.3f}"),
                 dict(k="global pool: variance over images, train / eval (median over features; 1 = no shift)",
                      v=f"SAP {m['sap_var_ratio']:.3f} vs inverted dropout {m['dropout_var_ratio']:.3f}"),
             ], ["k", "v"], ["check", "result"]),
             "",
             "Both estimators are unbiased in the mean; SAP averages a random half of each window, so its "
             "train-mode features keep nearly the eval-mode variance, while dropout's rescaled zeros inflate "
             "it — the train/test variance shift SAP is designed to avoid.",
             "",
             "![SAP consistency](sap_consistency.png)"]
    return lines


# ---------------------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------------------

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_metric_bars(summaries: Dict[str, List[Dict[str, Any]]], titles: Dict[str, str], path: str) -> None:
    plt = _plt()
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


def plot_se_variance(prs: List[PairResult], path: str) -> None:
    plt = _plt()
    prs = [p for p in prs if len(p.mechanism.get("variance", {})) == 2]
    fig, axes = plt.subplots(len(prs), 2, figsize=(13, 3.8 * len(prs)), squeeze=False)
    for row, pr in zip(axes, prs):
        (base, bvar), (se, svar) = list(pr.mechanism["variance"].items())
        bt, st = bvar["table"], svar["table"]
        alt = svar.get("upsampled_only_start")
        alt_vars = [o["var"] for f in alt["fusions"] for o in f["operands"]] if alt else None
        labels = [f"{t['fusion'].split(':')[0]}: {t['site'] or t['operand']}" for t in st]
        for ax, when in zip(row, ("start", "end")):
            series = [(base, [b[f"var_{when}"] for b in bt], "#888888"),
                      (se, [t[f"var_{when}"] for t in st], "#3b75af")]
            if when == "start" and alt_vars is not None and len(alt_vars) == len(st):
                series.append((f"{se} upsampled operands only", alt_vars, "#55a868"))
            w = 0.8 / len(series)
            for j, (name, vals, color) in enumerate(series):
                ax.bar([x + (j - (len(series) - 1) / 2) * w for x in range(len(st))], vals, w, label=name,
                       color=color)
            ax.set_yscale("log")
            every = [v for _, vals, _ in series for v in vals]
            ax.set_ylim(min(every) / 1.5, max(every) * 1.5)
            ax.set_xticks(list(range(len(st))))
            ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=6)
            ax.set_ylabel("variance entering the fusion")
            ax.set_title(f"{pr.title} — {'initial weights (SE: calibrated)' if when == 'start' else 'trained'}",
                         fontsize=8)
            ax.legend(fontsize=7)
            ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_erf(prs: List[PairResult], path: str) -> None:
    import numpy as np

    plt = _plt()
    cells = []
    for pr in prs:
        for name, probes in pr.mechanism.get("erf", {}).items():
            for when in ("start", "end"):
                cells.append((pr.mechanism["size"], name, pr.mechanism["rates"].get(name, ()), when,
                               probes[when]["map"]))
    cols = 4
    rows = max(1, math.ceil(len(cells) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (size, name, rates, when, m) in zip(axes.flat, cells):
        arr = np.asarray(m, dtype=np.float64)
        arr = np.log10(arr / arr.max() + 1e-6)
        im = ax.imshow(arr, cmap="magma", vmin=-6, vmax=0)
        label = name if str(tuple(rates)) in name else f"{name} {tuple(rates)}"
        ax.set_title(f"{size}px, {'at init' if when == 'start' else 'trained'}\n{label}", fontsize=7)
        ax.axis("off")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label="log10(ERF / max)")
    fig.suptitle("ERF of the centre output pixel per rate setting (log scale)", fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sap(m: Dict[str, Any], path: str) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(7, 3))
    axes[0].bar(["SAP", f"dropout p={m['dropout_p']:g}"], [m["sap_var_ratio"], m["dropout_var_ratio"]],
                color=["#3b75af", "#c44e52"])
    axes[0].axhline(1.0, color="k", lw=0.8)
    axes[0].set_title("feature variance train / eval (1 = no shift)", fontsize=8)
    axes[1].bar(["SAP", f"dropout p={m['dropout_p']:g}"], [m["sap_mean_rel_err"], m["dropout_mean_rel_err"]],
                color=["#3b75af", "#c44e52"])
    axes[1].set_title(f"|E[train] - eval| / |eval| ({m['draws']} draws)", fontsize=8)
    fig.suptitle("Global pooling of the trained SAP ResNet: train vs eval mode", fontsize=9)
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
    by_pair = {pr.pair: pr for pr in results}
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

    # plots
    plot_metric_bars(summaries, titles, os.path.join(out_dir, "metric_bars.png"))
    files["metric_bars.png"] = os.path.join(out_dir, "metric_bars.png")
    se_prs = [pr for pr in results if pr.pair.startswith("se-")]
    rate_prs = [pr for pr in results if pr.pair.startswith("rates-")]
    if se_prs:
        plot_se_variance(se_prs, os.path.join(out_dir, "se_variance.png"))
        files["se_variance.png"] = os.path.join(out_dir, "se_variance.png")
    if rate_prs:
        plot_erf(rate_prs, os.path.join(out_dir, "erf_rates.png"))
        files["erf_rates.png"] = os.path.join(out_dir, "erf_rates.png")
    if "vit" in by_pair:
        rob = by_pair["vit"].mechanism["robustness"]
        from kim_plugins.robustness import plot as plot_robustness
        plot_robustness(rob["accuracy"], rob["rows"],
                        f"Fashion-MNIST test ({rob['images']} images), models trained "
                        f"{by_pair['vit'].runs[0].iters} iterations here (seed 0)",
                        os.path.join(out_dir, "robustness.png"))
        files["robustness.png"] = os.path.join(out_dir, "robustness.png")
    if "sap" in by_pair and by_pair["sap"].mechanism.get("sap"):
        plot_sap(by_pair["sap"].mechanism["sap"], os.path.join(out_dir, "sap_consistency.png"))
        files["sap_consistency.png"] = os.path.join(out_dir, "sap_consistency.png")

    # report.md
    info = run_info
    lines = [f"# kim_plugins benchmark suite — `{info['suite']}`", "", DISCLAIMER, "",
             "## Run", "",
             _table([dict(k=k, v=v) for k, v in info["table"].items()], ["k", "v"], ["", ""]), ""]
    if info.get("notes"):
        lines += [f"- {n}" for n in info["notes"]] + [""]
    lines += ["## 1. Mechanisms (what a short run shows for certain)", ""]
    if se_prs:
        lines += _se_section(se_prs) + [""]
    if rate_prs:
        lines += _erf_section(rate_prs) + [""]
    if "vit" in by_pair:
        lines += _vit_section(by_pair["vit"]) + [""]
    if "swin" in by_pair:
        lines += _swin_section(by_pair["swin"]) + [""]
    if "sap" in by_pair:
        lines += _sap_section(by_pair["sap"]) + [""]
    from kim_plugins.suite.stability import STABILITY_PAIRS, report_lines
    for pr in results:
        if pr.pair in STABILITY_PAIRS:
            lines += report_lines(pr) + [""]
    for pr in results:  # pairs that render their own mechanism section (kim_plugins.suite.diagnostics)
        if pr.mechanism.get("report_lines"):
            lines += list(pr.mechanism["report_lines"]) + [""]
    lines += ["## 2. Accuracy against each baseline", "",
              "Δ = mean(variant) − mean(baseline) over the same seeds; \"not significant\" when a single seed was "
              "run or |Δ| ≤ 2·sqrt(s_b²/n + s_v²/n) (s: sample std over seeds). Train time is the wall time of "
              "training (SE calibration included, evaluation excluded) on this machine under its load; "
              "GFLOPs: forward of one image (convolutions, matmuls, attention; `torch.utils.flop_counter`).",
              "", accuracy_table(summaries, titles), "", "![accuracy](metric_bars.png)", "",
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
