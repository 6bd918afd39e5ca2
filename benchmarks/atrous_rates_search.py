#!/usr/bin/env python
"""Rule vs ERF search for the atrous-rate configs: writes benchmarks/results/atrous_rates_search.{md,json}.

For every resolution-aware config of ``configs/atrous_rates/`` this runs
``tools/atrous_rates.py --search`` (mean ERF coverage over a grid of output
positions, for every integer r_max of a range, the rule's ladder shape) and
tabulates the r_max the search picks against the rule's. The models are
untrained (no weights can be downloaded here) and the images synthetic, so
this checks the geometry of the rule, not a trained optimum; the per-config
sweeps (md, json, png) are written next to the summary.

Usage::

    python benchmarks/atrous_rates_search.py              # all five configs, CPU sizes below
    python benchmarks/atrous_rates_search.py --only stare --full-size
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tools"))
sys.path.insert(0, ROOT)

import atrous_rates  # noqa: E402  tools/atrous_rates.py

from kim_plugins.benchmarking import format_table  # noqa: E402

CFG = os.path.join(ROOT, "configs", "atrous_rates")
# key, config, search size used on CPU (None = the crop), r_max range and step at that size.
# STARE, CHASE_DB1 and HRF share one model (UNet-S5-D16 + ASPP, OS 1): searching it at 128 (STARE's
# crop) and at 64 (CHASE_DB1 at half, HRF at a quarter of their crops) also tests the scale invariance.
CASES = [
    ("stare", "unet-s5-d16_deeplabv3-ra_4xb4-40k_stare-128x128.py", None, (8, 96, 8)),
    ("chase_db1", "unet_s5-d16_deeplabv3-ra_4xb4-40k_chase-db1-128x128.py", (64, 64), (4, 48, 2)),
    ("hrf", "unet-s5-d16_deeplabv3-ra_4xb4-40k_hrf-256x256.py", (64, 64), (4, 48, 2)),
    ("cityscapes", "deeplabv3-ra_r101-d8_4xb2-80k_cityscapes-512x1024.py", (128, 256), (5, 16, 1)),
    ("isaid", "deeplabv3-ra_r50-d8_4xb4-80k_isaid-896x896.py", (128, 128), (5, 16, 1)),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", help="subset of the case keys")
    p.add_argument("--full-size", action="store_true", help="search at the crop size (slow on CPU)")
    p.add_argument("--grid", type=int, default=3)
    p.add_argument("--num-images", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=os.path.join(HERE, "results", "atrous_rates_search"))
    args = p.parse_args()
    rows: List[Dict[str, Any]] = []
    sweeps = {}
    for key, cfg, size, (lo, hi, step) in CASES:
        if args.only and key not in args.only:
            continue
        argv = [os.path.join(CFG, cfg), "--search", "--r-max", str(lo), str(hi), "--grid", str(args.grid),
                "--num-images", str(args.num_images), "--out-dir", args.out + "_sweeps", "--name", key]
        if size and not args.full_size:
            argv += ["--search-size", str(size[0]), str(size[1])]
        if args.threads:
            argv += ["--threads", str(args.threads)]
        if step > 1:
            argv += ["--r-max-step", str(step)]
        print(f"== {key}: {' '.join(argv[1:])}", flush=True)
        s = atrous_rates.main(argv)["search"]
        sweeps[key] = s
        rows.append(dict(dataset=key, crop="x".join(map(str, s["crop_size"])), OS=s["output_stride"],
                         search_input="x".join(map(str, s["search_size"])),
                         rule_r_max=s["rule_rates_at_search_size"][-1],
                         search_r_max=s["search_best_r_max"], centre_only_r_max=s["centre_only_best_r_max"],
                         ladder_step=round(s["ladder_step"], 1), agree=s["agree_within_one_step"],
                         **{f"search_r_max{k[8:]}": v for k, v in s["best_r_max_at_other_thresholds"].items()},
                         rule_rates_at_crop=str(tuple(s["rule_rates_full"])),
                         search_rates_scaled_to_crop=str(atrous_rates.rate_ladder(
                             int(round(s["search_best_r_max_scaled_to_crop"])), s["num_rates"])),
                         seconds=s["seconds"]))
    table = format_table(rows)
    md = ["# Atrous rates: rule vs ERF-coverage search", "",
          "Weights: untrained (each config's own initialisation, nothing downloaded); images: synthetic "
          "dataset fixtures. Coverage of an output position = fraction of the image where its ERF "
          f"exceeds 1 % of its maximum; score = mean over a {args.grid}x{args.grid} grid of positions "
          "(cell centres). `rule_r_max` and `search_r_max` are at the search input size; "
          "`agree` = |search - rule| <= one ladder step (rule r_max / 3). `centre_only_r_max` is the "
          "optimum of the centre position alone; `search_r_max@0.05` / `@0.1` the optimum when coverage "
          "counts pixels above 5 % / 10 % of the maximum instead of 1 %. STARE, CHASE_DB1 and HRF share one "
          "model (UNet-S5-D16 + ASPP, OS 1), searched at 128 (STARE) and at 64 (CHASE_DB1, HRF: reduced "
          "size, scaled back by the rule's scale invariance). Per-config sweeps (tables, plots): "
          "`atrous_rates_search_sweeps/`.", "",
          table, ""]
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(md))
    with open(args.out + ".json", "w") as f:
        json.dump(dict(rows=rows, sweeps=sweeps), f, indent=2)
    print(table)


if __name__ == "__main__":
    main()
