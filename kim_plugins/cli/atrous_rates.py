"""Resolution-aware atrous rates: print the rule's rates, or search r_max by ERF coverage.

The rule ([decision], kim_plugins.layers.atrous, arXiv 2307.14179):
F = ceil(min(H, W) / OS), r_max = max(1, min(floor(kappa * F), floor((F - 1) / 2))),
ladder r_0 = 1, r_i = round(r_max * i / (n - 1)); kappa in (0, 0.5].

Examples::

    python tools/atrous_rates.py --crop-size 512 1024 --output-stride 8
    python tools/atrous_rates.py configs/atrous_rates/unet-s5-d16_deeplabv3-ra_4xb4-40k_stare-128x128.py
    python tools/atrous_rates.py CONFIG --search --r-max 5 96 --search-size 64 --grid 3 --num-images 2

``--search`` sweeps every integer r_max of a range on the real model of the
config: the ASPP head's rates are set in place to the rule's ladder for that
r_max (same weights for every candidate), and the ERF coverage is measured.
Coverage of one output position = the fraction of the image where its ERF
exceeds ``--threshold`` (1 %) of its maximum; the score of an r_max is the mean
coverage over a ``--grid`` x ``--grid`` grid of output positions at the cell
centres (not only the centre pixel, whose optimum kappa = 0.5 fixes by
construction). Weights are whatever the config / checkpoint gives: without a
checkpoint the model is untrained, and the results are labelled so. Candidates
above floor((F - 1) / 2) (degenerate branches, which the rule never builds) are
measured too and flagged; the best non-degenerate r_max is reported beside the
overall best.

``--search-size S`` searches at a reduced input S (the rule is scale invariant:
at input size s * crop it prescribes s * r_max, so the found r_max is scaled back
by crop / S; the backbone's own receptive field is not scaled, so this is an
approximation, reported beside the full-size rule).

Writes (with ``--search``) ``<out-dir>/<name>_rates_search.{md,json,png}``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from kim_plugins.cli.common import LazyDictAction, add_threads_and_seed, doc_parser, start_run
from kim_plugins.cli.inputs import (dataset_fixture_name, fixture_files, image_files, load_images,
                                    load_segmentor)
from kim_plugins.config.inspect import crop_size as config_crop_size
from kim_plugins.config.inspect import segmentor_norm
from kim_plugins.layers.atrous import (feature_size, max_nondegenerate_rate, normalize_crop_size, rate_ladder,
                                       resolution_aware_rates)


def _valid(rates: Sequence[int]) -> bool:
    return all(b > a for a, b in zip(rates, rates[1:]))


def aspp_heads(cfg: Any) -> List[Tuple[str, Dict[str, Any]]]:
    """(key, head cfg) of every head of ``cfg.model`` that takes ``dilations`` (an ASPP head)."""
    out = []
    for key in ("decode_head", "auxiliary_head"):
        heads = cfg.model.get(key)
        heads = heads if isinstance(heads, (list, tuple)) else [heads]
        for i, h in enumerate(heads):
            if isinstance(h, dict) and ("dilations" in h or "ASPP" in str(h.get("type", ""))):
                out.append((key if len(heads) == 1 else f"{key}[{i}]", h))
    return out


def config_rates(cfg: Any, num_rates: Optional[int], kappa: Optional[float]) -> List[Dict[str, Any]]:
    """For every ASPP head: its dilations, crop, output stride (given or measured) and the rule's rates."""
    from kim_plugins.mmseg.ra_aspp_heads import resolve_auto_dilations

    heads = aspp_heads(cfg)
    if not heads:
        raise SystemExit("the config has no ASPP head (a head with dilations)")
    # Measure the stride of every ASPP head without an int output_stride through the one shared
    # resolver (a dummy forward of backbone + neck), by asking it for 'auto' rates on a copy.
    probe = copy.deepcopy(cfg)
    for _, h in aspp_heads(probe):
        h["dilations"] = "auto"
        if not isinstance(h.get("output_stride"), int):
            h["output_stride"] = "infer"
        h.setdefault("crop_size", None)
    resolved = resolve_auto_dilations(probe)
    rows = []
    for (key, h), (_, r) in zip(heads, aspp_heads(resolved)):
        crop = normalize_crop_size(r["crop_size"] or config_crop_size(cfg))
        n = num_rates or h.get("num_rates", 4)
        k = kappa or h.get("kappa", 0.5)
        rule = resolution_aware_rates(crop, r["output_stride"], num_rates=n, kappa=k)
        configured = h.get("dilations", (1, 6, 12, 18))
        rows.append(dict(head=key, type=h.get("type"), crop_size=list(crop), output_stride=r["output_stride"],
                         output_stride_source="config" if isinstance(h.get("output_stride"), int) else "measured",
                         configured=configured if isinstance(configured, str) else list(configured),
                         rule=list(rule), num_rates=n, kappa=k))
    return rows


def search(args: argparse.Namespace) -> Dict[str, Any]:
    """ERF-coverage sweep over r_max on the real model of the config."""
    model, cfg = load_segmentor(args.config, args.checkpoint, args.cfg_options, trust=args.trust_checkpoint)
    rows = config_rates(cfg, args.num_rates, args.kappa)
    info = rows[0]
    if info["head"] != "decode_head":
        raise SystemExit("--search needs an ASPP decode_head")
    crop = tuple(info["crop_size"])
    stride, n, kappa = info["output_stride"], info["num_rates"], info["kappa"]
    scale = 1.0
    size = crop
    if args.search_size:
        s = parse_search_size(args.search_size)
        scale = min(s) / min(crop)
        size = s
    head = model.decode_head
    if len(head.aspp_modules) != n:
        raise SystemExit(f"the head has {len(head.aspp_modules)} ASPP branches but num_rates={n}")
    rule_full = resolution_aware_rates(crop, stride, num_rates=n, kappa=kappa)
    rule_here = resolution_aware_rates(size, stride, num_rates=n, kappa=kappa)
    lo, hi = args.r_max
    candidates = [r for r in range(lo, hi + 1, args.r_max_step) if _valid(rate_ladder(r, n))]
    if not candidates:
        raise SystemExit(f"no r_max in [{lo}, {hi}] gives {n} distinct rates")
    mean, std, pix_scale = segmentor_norm(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        if args.images:
            files = image_files(args.images)[:args.num_images]
            source = f"folder {args.images}"
        else:
            fixture = args.fixture or dataset_fixture_name(cfg)
            files = fixture_files(fixture, args.num_images, size, tmp)
            source = f"synthetic dataset fixture '{fixture}' (smooth random colour fields)"
        images = load_images(files, size, mean, std, pix_scale)
    out = dict(config=args.config, weights=f"checkpoint {args.checkpoint}" if args.checkpoint else
               "untrained (random initialisation)", images=source, num_images=len(files),
               crop_size=list(crop), search_size=list(size), output_stride=stride, num_rates=n, kappa=kappa,
               rule_rates_full=list(rule_full), rule_rates_at_search_size=list(rule_here))
    out.update(sweep_r_max(model, images, candidates, n, stride, grid=args.grid, threshold=args.threshold,
                           also_thresholds=args.also_thresholds, batch_size=args.batch_size,
                           rule_r_max=rule_here[-1]))
    out["search_best_r_max_scaled_to_crop"] = round(out["search_best_r_max"] / scale, 1)
    return out


def sweep_r_max(model: torch.nn.Module, images: torch.Tensor, candidates: Sequence[int], num_rates: int,
                output_stride: int, grid: int = 3, threshold: float = 0.01, also_thresholds: Sequence[float] = (),
                batch_size: int = 9, rule_r_max: Optional[int] = None, progress: bool = True) -> Dict[str, Any]:
    """ERF coverage of the segmentor for the rule's ladder of every candidate r_max, on one set of weights.

    The ASPP decode head's rates are set in place (:func:`set_aspp_dilations`)
    for each candidate and restored afterwards. The ERF target is
    :func:`kim_plugins.layers.erf.erf_maps`'s default (the decoder features
    before ``conv_seg``).

    Returns:
        ``results`` (one row per candidate: coverage mean / min / max over the
        ``grid`` x ``grid`` positions, centre-only coverage, coverage at the
        other thresholds, ``non_degenerate``), the best r_max overall, among
        non-degenerate candidates, for the centre alone and at the other
        thresholds, and, given ``rule_r_max``, whether the search agrees with
        the rule within one ladder step (rule r_max / (n - 1)).
    """
    from kim_plugins.layers.erf import erf_coverage, erf_maps, grid_positions
    from kim_plugins.mmseg.ra_aspp_heads import set_aspp_dilations

    head = model.decode_head
    original = tuple(head.dilations)
    bound = max_nondegenerate_rate(feature_size(tuple(images.shape[-2:]), output_stride))
    positions = grid_positions(grid)
    results = []
    t0 = time.perf_counter()
    bar = None
    if progress:
        from mmengine.utils import ProgressBar
        bar = ProgressBar(len(candidates), file=sys.stdout)
    try:
        for r in candidates:
            rates = set_aspp_dilations(head, rate_ladder(r, num_rates))
            maps = erf_maps(model, images, positions=positions, batch_size=batch_size)
            cov = erf_coverage(maps, threshold=threshold)
            centre = erf_maps(model, images, positions=[(0.5, 0.5)], batch_size=batch_size) \
                if grid % 2 == 0 else maps[len(positions) // 2][None]
            extra = {f"coverage@{t:g}": float(erf_coverage(maps, threshold=t).mean()) for t in also_thresholds}
            results.append(dict(r_max=r, rates=list(rates), non_degenerate=r <= bound, coverage=float(cov.mean()),
                                coverage_min=float(cov.min()), coverage_max=float(cov.max()),
                                centre_coverage=float(erf_coverage(centre[0], threshold=threshold)), **extra))
            if bar is not None:
                bar.update()
    finally:
        set_aspp_dilations(head, original)
    if bar is not None:
        print()

    def best(rows: Sequence[Dict[str, Any]], key: str = "coverage") -> Optional[int]:
        return max(rows, key=lambda d: (d[key], -d["r_max"]))["r_max"] if rows else None

    out: Dict[str, Any] = dict(
        grid=grid, threshold=threshold, max_nondegenerate_r=bound, search_best_r_max=best(results),
        search_best_r_max_non_degenerate=best([d for d in results if d["non_degenerate"]]),
        centre_only_best_r_max=best(results, "centre_coverage"),
        best_r_max_at_other_thresholds={f"coverage@{t:g}": best(results, f"coverage@{t:g}") for t in also_thresholds},
        seconds=round(time.perf_counter() - t0, 1), results=results)
    out["search_best_rates"] = rate_ladder(out["search_best_r_max"], num_rates)
    if rule_r_max is not None:
        out["ladder_step"] = rule_r_max / (num_rates - 1)
        out["agree_within_one_step"] = abs(out["search_best_r_max"] - rule_r_max) <= out["ladder_step"]
    return out


def parse_search_size(values: Sequence[int]) -> Tuple[int, int]:
    if len(values) > 2 or min(values) <= 0:
        raise SystemExit(f"--search-size takes one or two positive ints, got {values}")
    return (values[0], values[-1])


def write_search(out: Dict[str, Any], out_dir: str, name: str) -> Dict[str, str]:
    """Write the search table (md), numbers (json) and plot (png)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kim_plugins.markdown import markdown_table

    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"{name}_rates_search")
    res = out["results"]
    rule_r = out["rule_rates_at_search_size"][-1]
    fig, ax = plt.subplots(figsize=(6.4, 4), constrained_layout=True)
    rs = [d["r_max"] for d in res]
    ax.plot(rs, [d["coverage"] for d in res], "o-", ms=3, label=f"mean over {out['grid']}x{out['grid']} positions")
    ax.fill_between(rs, [d["coverage_min"] for d in res], [d["coverage_max"] for d in res], alpha=0.2,
                    label="min-max over positions")
    ax.plot(rs, [d["centre_coverage"] for d in res], "--", lw=1, label="centre position only")
    ax.axvline(rule_r, color="k", lw=1, label=f"rule r_max={rule_r}")
    ax.axvline(out["search_best_r_max"], color="r", lw=1, ls=":", label=f"search r_max={out['search_best_r_max']}")
    if any(not d["non_degenerate"] for d in res):
        ax.axvspan(out["max_nondegenerate_r"] + 0.5, max(rs) + 0.5, color="0.85", zorder=0,
                   label=f"degenerate (r > floor((F-1)/2) = {out['max_nondegenerate_r']})")
    ax.set_xlabel(f"r_max at input {out['search_size'][0]}x{out['search_size'][1]} (OS {out['output_stride']})")
    ax.set_ylabel(f"ERF coverage (> {out['threshold']:.0%} of max)")
    ax.set_title(f"{name}\n{out['weights']}", fontsize=8)
    ax.legend(fontsize=7)
    fig.savefig(stem + ".png", dpi=110)
    plt.close(fig)
    table = markdown_table([dict(r_max=d["r_max"], rates=str(tuple(d["rates"])), non_degenerate=d["non_degenerate"],
                               coverage=d["coverage"],
                               coverage_min=d["coverage_min"], coverage_max=d["coverage_max"],
                               centre_coverage=d["centre_coverage"],
                               **{k: v for k, v in d.items() if k.startswith("coverage@")}) for d in res])
    summary = {k: v for k, v in out.items() if k != "results"}
    md = [f"# Atrous-rate search: {name}", "", "```json", json.dumps(summary, indent=2), "```", "", table, ""]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(md))
    with open(stem + ".json", "w") as f:
        json.dump(out, f, indent=2)
    return dict(md=stem + ".md", json=stem + ".json", png=stem + ".png")


def build_parser() -> argparse.ArgumentParser:
    p = doc_parser(__doc__)
    p.add_argument("config", nargs="?", help="mmseg config with an ASPP head")
    p.add_argument("--crop-size", type=int, nargs="+", help="crop H [W] (without a config)")
    p.add_argument("--output-stride", type=int, help="stride of the feature map the head reads (without a config)")
    p.add_argument("--num-rates", type=int, default=None, help="ladder length (default 4, or the head's)")
    p.add_argument("--kappa", type=float, default=None, help="rule's kappa (default 0.5, or the head's)")
    p.add_argument("--search", action="store_true", help="ERF-coverage sweep over r_max (needs a config)")
    p.add_argument("--r-max", type=int, nargs=2, default=(2, 64), metavar=("LO", "HI"),
                   help="r_max range of the search, inclusive (default 2 64)")
    p.add_argument("--r-max-step", type=int, default=1, help="r_max step of the search (default 1)")
    p.add_argument("--search-size", type=int, nargs="+", help="search at this input H [W] (default: the crop)")
    p.add_argument("--grid", type=int, default=3, help="output positions per axis (default 3)")
    p.add_argument("--threshold", type=float, default=0.01, help="coverage level, fraction of the max (0.01)")
    p.add_argument("--also-thresholds", type=float, nargs="*", default=[0.05, 0.1],
                   help="further coverage levels reported beside the main one (default 0.05 0.1)")
    p.add_argument("--num-images", type=int, default=2, help="images per ERF (default 2)")
    p.add_argument("--batch-size", type=int, default=9, help="(image, position) pairs per backward (default 9)")
    p.add_argument("--images", help="folder of images (default: a synthetic dataset fixture)")
    p.add_argument("--fixture", help="dataset fixture without --images (default: from the config)")
    p.add_argument("--checkpoint", help="mmseg checkpoint (default: untrained)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="fully unpickle --checkpoint if safe loading refuses it (an old-style runner checkpoint "
                        "you trust, e.g. from your own work_dir); nothing else is unpickled")
    p.add_argument("--out-dir", default="work_dirs/atrous_rates", help="output folder of --search")
    p.add_argument("--name", help="output file stem (default: the config name)")
    add_threads_and_seed(p, "seed of the untrained weights and the synthetic images (default 0): "
                            "results are reproducible")
    p.add_argument("--cfg-options", nargs="+", action=LazyDictAction, default=None,
                   help="override config settings, key=value")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """The rule's rates (no config), every ASPP head's rates (a config), or the ERF search (``--search``)."""
    start_run(args)
    if args.config is None:
        if args.crop_size is None or args.output_stride is None or args.search:
            raise SystemExit("give a config, or --crop-size and --output-stride (--search needs a config)")
        crop = normalize_crop_size(args.crop_size[0] if len(args.crop_size) == 1 else tuple(args.crop_size))
        rates = resolution_aware_rates(crop, args.output_stride, num_rates=args.num_rates or 4,
                                       kappa=args.kappa or 0.5)
        print(f"crop {crop[0]}x{crop[1]}, output stride {args.output_stride}: dilations={rates}")
        return dict(rates=list(rates))
    from mmengine.config import Config

    import kim_plugins.mmseg  # noqa: F401
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    if not args.search:
        rows = config_rates(cfg, args.num_rates, args.kappa)
        for r in rows:
            print(f"{r['head']} ({r['type']}): crop {r['crop_size'][0]}x{r['crop_size'][1]}, output stride "
                  f"{r['output_stride']} ({r['output_stride_source']}): rule dilations={tuple(r['rule'])}; "
                  f"config dilations={r['configured'] if isinstance(r['configured'], str) else tuple(r['configured'])}")
        return dict(heads=rows)
    out = search(args)
    name = args.name or os.path.splitext(os.path.basename(args.config))[0]
    paths = write_search(out, args.out_dir, name)
    print(f"rule r_max at {out['search_size']}: {out['rule_rates_at_search_size'][-1]}  "
          f"search r_max: {out['search_best_r_max']}  (centre only: {out['centre_only_best_r_max']})  "
          f"agree within one ladder step ({out['ladder_step']:.1f}): {out['agree_within_one_step']}")
    print(f"wrote {paths['md']}, {paths['json']}, {paths['png']}")
    return dict(search=out, paths=paths)


def main(argv: Optional[Sequence[str]] = None) -> int:
    run(parse_args(argv))
    return 0
