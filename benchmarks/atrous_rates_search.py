#!/usr/bin/env python
"""Rule vs ERF search for the atrous-rate configs: writes benchmarks/results/atrous_rates_search.{md,json}.

For every resolution-aware config of ``configs/atrous_rates/`` this runs
``tools/atrous_rates.py --search`` (:mod:`kim_plugins.cli.atrous_rates`; mean ERF coverage over a grid of output
positions, for every integer r_max of a range, the rule's ladder shape) and
tabulates the r_max the search picks against the rule's. The models are
untrained (no weights can be downloaded here) and the images synthetic, so
this checks the geometry of the rule, not a trained optimum; the per-config
sweeps (md, json, png) are written next to the summary.

``--trained`` searches trained weights instead: it trains the main job's rates
pair (``kim_plugins.suite``, quick preset, seed 0: the plain ``ASPPHead`` with
mmseg's (1, 12, 24, 36) and ``RAASPPHead(dilations='auto')``, at 96x96 and
128x128 on the Fashion scenes) and sweeps r_max on each trained model with real
validation scenes; with the 128x128 models it also sweeps a non-square 128x256
input (two validation scenes side by side) to compare the rule's choice of the
shorter side with the longer one. Writes
``benchmarks/results/atrous_rates_search_trained.{md,json}``.

Usage::

    python benchmarks/atrous_rates_search.py              # all five configs, CPU sizes below
    python benchmarks/atrous_rates_search.py --only stare --full-size
    python benchmarks/atrous_rates_search.py --trained --threads 1
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from kim_plugins.cli import atrous_rates  # noqa: E402
from kim_plugins.markdown import markdown_table  # noqa: E402

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


def _trained_row(label: str, weights: str, s: Dict[str, Any], rule_short: int, **extra: Any) -> Dict[str, Any]:
    return dict(setting=label, weights=weights, **extra, rule_r_max=rule_short,
                search_r_max=s["search_best_r_max"], search_r_max_non_degenerate=s["search_best_r_max_non_degenerate"],
                centre_only_r_max=s["centre_only_best_r_max"],
                **{f"search_r_max{k[8:]}": v for k, v in s["best_r_max_at_other_thresholds"].items()},
                max_nondegenerate_r=s["max_nondegenerate_r"], ladder_step=round(s["ladder_step"], 1),
                agree=s["agree_within_one_step"], seconds=s["seconds"])


def trained(args: argparse.Namespace) -> None:
    """Sweep r_max on the trained models of the main job's rates pair (see the module docstring)."""
    import tempfile

    import torch

    from kim_plugins.layers.atrous import resolution_aware_rates
    from kim_plugins.suite.data import default_data_root, prepare_data
    from kim_plugins.suite.pairs import get_pair
    from kim_plugins.suite.seg import _train_variant
    from kim_plugins.suite.settings import preset

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = preset("quick")
    data = prepare_data(args.fashion_mnist, args.data_root or default_data_root(),
                        num_train_scenes=settings.num_train_scenes, num_val_scenes=settings.num_val_scenes,
                        scene_size=settings.scene_size)
    rows: List[Dict[str, Any]] = []
    sweeps: Dict[str, Any] = {}
    cache: Dict[str, Any] = {}
    also = (0.05, 0.1)
    with tempfile.TemporaryDirectory() as work:
        for pair in ("rates-small", "rates-large"):
            spec = get_pair(pair)
            size = spec.input_size(settings)
            rule = resolution_aware_rates(size, 8)
            for variant in spec.variants:
                name = variant.name
                run = _train_variant(spec, variant, 0, size, settings, data, work, "cpu", cache)
                model, images = run["model"], run["images"][:args.num_images]
                weights = (f"{pair} '{name}' {tuple(run['dilations'])}, trained {settings.seg_iters} it, "
                           f"mIoU {run['metrics'].get('mIoU', float('nan')):.2f}")
                feat = size // 8
                print(f"== {weights}: square {size}x{size} (F={feat})", flush=True)
                s = atrous_rates.sweep_r_max(model, images, list(range(5, feat + 1)), 4, 8, grid=args.grid,
                                             also_thresholds=also, rule_r_max=rule[-1])
                key = f"{pair}/{name}/square"
                sweeps[key] = s
                rows.append(_trained_row(f"{size}x{size}", weights, s, rule[-1], input=f"{size}x{size}",
                                         num_images=len(images), long_side_rule_r_max=rule[-1]))
                if pair != "rates-large":
                    continue
                wide = torch.cat([run["images"][0::2], run["images"][1::2]], dim=-1)[:args.num_images]
                long_rule = resolution_aware_rates((2 * size, 2 * size), 8)
                print(f"== {weights}: non-square {size}x{2 * size}", flush=True)
                s = atrous_rates.sweep_r_max(model, wide, list(range(5, 2 * feat + 1)), 4, 8, grid=args.grid,
                                             also_thresholds=also, rule_r_max=rule[-1])
                sweeps[f"{pair}/{name}/wide"] = s
                rows.append(_trained_row(f"{size}x{2 * size}", weights, s, rule[-1], input=f"{size}x{2 * size}",
                                         num_images=len(wide), long_side_rule_r_max=long_rule[-1]))
    table = markdown_table(rows)
    md = ["# Atrous rates: rule vs ERF-coverage search on trained weights", "",
          "Weights: the main job's rates pair (`kim_plugins.suite`, quick preset, seed 0), trained on the Fashion "
          f"scenes; images: its real validation scenes. ERF target: the decoder features before `conv_seg` (centre "
          f"of each output position, channel mean). Coverage of an output position = fraction of the image where "
          f"its ERF exceeds 1 % of its maximum; score = mean over a {args.grid}x{args.grid} grid of positions. "
          "Every r_max from 5 is swept with the rule's ladder shape on the same weights; `search_r_max` is the "
          "best overall, `search_r_max_non_degenerate` the best with r_max <= floor((F - 1) / 2) "
          "(`max_nondegenerate_r`), `rule_r_max` the rule's (shorter side), `long_side_rule_r_max` what the rule "
          "would give from the longer side; `agree` = |search - rule| <= one ladder step (rule r_max / 3). "
          "The 128x256 rows feed two validation scenes side by side to the 128x128-trained models.", "",
          table, ""]
    _write(args.out + "_trained", md, dict(rows=rows, sweeps=sweeps))
    print(table)


def _write(stem: str, md: List[str], data: Dict[str, Any]) -> None:
    with open(stem + ".md", "w") as f:
        f.write("\n".join(md))
    with open(stem + ".json", "w") as f:
        json.dump(data, f, indent=2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", help="subset of the case keys")
    p.add_argument("--full-size", action="store_true", help="search at the crop size (slow on CPU)")
    p.add_argument("--grid", type=int, default=3)
    p.add_argument("--num-images", type=int, default=None,
                   help="images per ERF (default 2 on the configs, 8 with --trained)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=os.path.join(HERE, "results", "atrous_rates_search"))
    p.add_argument("--trained", action="store_true",
                   help="search the trained models of the main job's rates pair instead of the configs")
    p.add_argument("--fashion-mnist", default=None, metavar="DIR", help="with --trained: Fashion-MNIST idx folder")
    p.add_argument("--data-root", default=None, help="with --trained: cache of the Fashion scenes (default ./data)")
    args = p.parse_args()
    if args.trained:
        args.num_images = args.num_images or 8
        trained(args)
        return
    args.num_images = args.num_images or 2
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
        s = atrous_rates.run(atrous_rates.parse_args(argv))["search"]
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
    table = markdown_table(rows)
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
    _write(args.out, md, dict(rows=rows, sweeps=sweeps))
    print(table)


if __name__ == "__main__":
    main()
