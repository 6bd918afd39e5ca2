"""Effective receptive field of a timm model or an mmseg config: heatmap + numbers.

The ERF (METHODS.md §6; Luo et al. arXiv 1701.04128 as used in arXiv 2307.14179
and 2305.04722) is the gradient of the centre output unit (centre of the last
feature map for a classifier; a ViT's patch tokens after the final norm; for a
segmentor the centre pixel of the decoder's features before ``conv_seg``, or of
the logits with ``--target logits``) with respect to the input, RGB-averaged,
clipped at 0, accumulated over images and normalised; computed batched in eval
mode (:mod:`kim_plugins.layers.erf`).

Examples::

    python tools/erf.py resnet50 --size 224 --num-images 8 --out-dir work_dirs/erf
    python tools/erf.py configs/atrous_rates/unet-s5-d16_deeplabv3-ra_4xb4-40k_stare-128x128.py \\
        --num-images 4 --out-dir work_dirs/erf
    python tools/erf.py my_config.py --checkpoint iter_40000.pth --images data/STARE/images/validation
    python tools/erf.py vit_small_patch16_gab_224 --checkpoint vit_small_patch16_224.pth  # plain ViT weights
    python tools/erf.py vit_small_patch16_gab_224 --size 96 --model-kwargs '{"gab_sigma_init": 3}'
    python tools/erf.py configs/atrous_rates/unet-s5-d16_deeplabv3_4xb4-40k_stare-128x128.py \
        configs/atrous_rates/unet-s5-d16_deeplabv3-ra_4xb4-40k_stare-128x128.py --name stare  # side by side

Without ``--images`` the images are a synthetic dataset fixture (smooth random
colour fields, :mod:`kim_plugins.dry_run.dataset_fixtures`, in the layout of
the config's training data; ``--fixture`` for a timm model or a config whose
dataset has no fixture). Nothing is
downloaded: timm models use ``pretrained=False``, mmseg configs drop their
pretrained weights; without ``--checkpoint`` the weights are an untrained
initialisation, and the outputs say so.

Writes ``<out-dir>/<name>_erf.png`` (heatmap, linear and log scale, with the
50 % / 90 % mass squares) and ``<out-dir>/<name>_erf.json`` (numbers) per model,
and with several models ``<out-dir>/<name>_erf_compare.png`` (log heatmaps side
by side, on the same images).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch

from kim_plugins.cli.common import LazyDictAction, add_threads_and_seed, doc_parser, start_run
from kim_plugins.cli.inputs import (dataset_fixture_name, fixture_files, image_files, is_config, load_images,
                                    load_segmentor, load_timm, parse_size)
from kim_plugins.config.inspect import crop_size, segmentor_norm

def prepare(args: argparse.Namespace, tmp: str) -> Dict[str, Any]:
    """Model, images and metadata for the command-line arguments."""
    size = parse_size(args.size)
    if is_config(args.model):
        if json.loads(args.model_kwargs):
            raise SystemExit(f"--model-kwargs applies to timm models; change the config {args.model} with "
                             "--cfg-options key=value")
        model, cfg = load_segmentor(args.model, args.checkpoint, args.cfg_options, args.device,
                                    trust=args.trust_checkpoint)
        size = size or crop_size(cfg)
        if size is None:
            raise SystemExit(f"{args.model}: no crop_size in the config; pass --size H W")
        mean, std, scale = segmentor_norm(cfg)
        fixture = args.fixture or dataset_fixture_name(cfg)
        kind = ("mmseg segmentor (centre pixel of the logits)" if args.target == "logits" else
                "mmseg segmentor (centre pixel of the decoder features before conv_seg)")
    else:
        model_kwargs = json.loads(args.model_kwargs)
        if not isinstance(model_kwargs, dict):
            raise SystemExit(f"--model-kwargs must be a JSON object, got {args.model_kwargs!r}")
        model = load_timm(args.model, args.checkpoint, args.device, model_kwargs, size)
        pcfg = getattr(model, "pretrained_cfg", {}) or {}
        if size is None and "img_size" in model_kwargs:
            size = parse_size(model_kwargs["img_size"] if isinstance(model_kwargs["img_size"], (list, tuple))
                              else [model_kwargs["img_size"]])
        size = size or tuple(pcfg.get("input_size", (3, 224, 224))[1:])
        mean, std, scale = list(pcfg.get("mean", (0.485, 0.456, 0.406))), \
            list(pcfg.get("std", (0.229, 0.224, 0.225))), 1.0
        fixture = args.fixture or "ade20k"
        from kim_plugins.layers.erf import _is_vit
        kind = ("timm vision transformer (centre patch token after the final norm)" if _is_vit(model) else
                "timm classifier (centre of the last feature map)")
    if args.images:
        files = image_files(args.images)[:args.num_images]
        source = f"folder {args.images}"
    else:
        files = fixture_files(fixture, args.num_images, size, tmp)
        source = f"synthetic dataset fixture '{fixture}' (smooth random colour fields)"
    images = load_images(files, size, mean, std, scale).to(args.device)
    weights = f"checkpoint {args.checkpoint}" if args.checkpoint else "untrained (random initialisation)"
    return dict(model=model, images=images, size=size, source=source, weights=weights, kind=kind)


# ----------------------------------------------------------------------------- plot
def plot_erf(erf: np.ndarray, numbers: Dict[str, Any], title: str, path: str) -> None:
    """Heatmap of a normalised ERF, linear and log10, with the 50 % / 90 % mass squares."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from kim_plugins.layers.erf import _centroid

    rel = erf / erf.max()
    cy, cx = _centroid(torch.from_numpy(erf))
    cy, cx = int(np.floor(cy + 0.5)), int(np.floor(cx + 0.5))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), constrained_layout=True)
    panels = [(rel, "ERF / max", dict(vmin=0, vmax=1)),
              (np.log10(rel + 1e-4), "log10(ERF / max)", dict(vmin=-4, vmax=0))]
    for ax, (img, label, lim) in zip(axes, panels):
        im = ax.imshow(img, cmap="inferno", interpolation="nearest", **lim)
        for key, color in (("side_50", "cyan"), ("side_90", "lime")):
            s = numbers[key]
            ax.add_patch(Rectangle((cx - s / 2, cy - s / 2), s, s, fill=False, ec=color, lw=1,
                                   label=f"{key[-2:]} % mass: {s} px"))
        ax.set_title(label)
        fig.colorbar(im, ax=ax, shrink=0.85)
    axes[0].legend(loc="lower left", fontsize=7)
    fig.suptitle(f"{title}\nsigma_y={numbers['sigma_y']:.1f} px, sigma_x={numbers['sigma_x']:.1f} px, "
                 f"R^2={numbers['r2']:.3f}, {numbers['num_images']} images", fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = doc_parser(__doc__)
    p.add_argument("models", nargs="+", metavar="model",
                   help="timm model name (e.g. resnet50) or mmseg config file (.py); several: also a side-by-side "
                        "comparison <name or 'compare'>_erf_compare.png on the same images")
    p.add_argument("--checkpoint", help="weights: timm checkpoint_path or mmseg checkpoint (.pth)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="fully unpickle the mmseg --checkpoint if safe loading refuses it (an old-style runner "
                        "checkpoint you trust, e.g. from your own work_dir); nothing else is unpickled")
    p.add_argument("--images", help="folder of images (default: a synthetic dataset fixture)")
    p.add_argument("--fixture", help="dataset fixture to use without --images (default: from the config)")
    p.add_argument("--num-images", type=int, default=8, help="images to accumulate (default 8)")
    p.add_argument("--size", type=int, nargs="+",
                   help="input H [W] (default: timm input_size / config crop); timm models with a fixed input "
                        "size (ViTs) are built for it")
    p.add_argument("--model-kwargs", default="{}",
                   help="JSON dict of timm.create_model kwargs, e.g. '{\"depth\": 4}' (timm models; mmseg configs "
                        "take --cfg-options)")
    p.add_argument("--batch-size", type=int, default=4, help="images per backward (default 4)")
    p.add_argument("--target", default="auto", choices=("auto", "decoder", "logits", "tokens", "features"),
                   help="output unit: auto = decoder features before conv_seg for a segmentor, patch tokens after "
                        "the final norm for a ViT, last feature map otherwise; logits = a segmentor's class-mean "
                        "logits (see kim_plugins.layers.erf)")
    p.add_argument("--position", type=float, nargs=2, default=(0.5, 0.5), metavar=("FY", "FX"),
                   help="fractional position of the output unit (default: centre 0.5 0.5)")
    p.add_argument("--out-dir", default="work_dirs/erf", help="output folder (default work_dirs/erf)")
    p.add_argument("--name", help="output file stem (default: from the model; 'compare' for the comparison)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    add_threads_and_seed(p, "seed of the untrained weights and the synthetic images (default 0): "
                            "results are reproducible")
    p.add_argument("--cfg-options", nargs="+", action=LazyDictAction, default=None,
                   help="override mmseg config settings, key=value (as in mmseg's tools)")
    return p


def plot_comparison(maps: Sequence[np.ndarray], titles: Sequence[str], suptitle: str, path: str) -> None:
    """Side-by-side heatmaps of several normalised ERFs (ERF / max, square-root colour scale)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import PowerNorm

    fig, axes = plt.subplots(1, len(maps), figsize=(4.6 * len(maps), 4.6), constrained_layout=True,
                             squeeze=False)
    for ax, erf, title in zip(axes[0], maps, titles):
        im = ax.imshow(erf / erf.max(), cmap="inferno", norm=PowerNorm(0.5, vmin=0, vmax=1), interpolation="nearest")
        ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="ERF / max (square-root scale)")
    fig.suptitle(suptitle, fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Measure, plot and write the ERF of every model of ``args``; return the numbers and file paths."""
    from kim_plugins.layers.erf import effective_receptive_field

    start_run(args)
    os.makedirs(args.out_dir, exist_ok=True)
    runs = []
    for model in args.models:
        t0 = time.perf_counter()
        args.model = model
        with tempfile.TemporaryDirectory() as tmp:
            setup = prepare(args, tmp)
        res = effective_receptive_field(setup["model"], setup["images"], target=args.target,
                                        position=tuple(args.position), batch_size=args.batch_size, progress=True)
        name = args.name if args.name and len(args.models) == 1 else os.path.splitext(os.path.basename(model))[0]
        numbers = res.numbers()
        numbers.update(model=model, kind=setup["kind"], weights=setup["weights"], images=setup["source"],
                       seconds=round(time.perf_counter() - t0, 2))
        json_path = os.path.join(args.out_dir, f"{name}_erf.json")
        png_path = os.path.join(args.out_dir, f"{name}_erf.png")
        with open(json_path, "w") as f:
            json.dump(numbers, f, indent=2)
        size = f"{setup['size'][0]}x{setup['size'][1]}"
        plot_erf(res.erf.cpu().numpy(), numbers, f"ERF of {name} at {size} ({setup['weights']})", png_path)
        print(json.dumps({k: numbers[k] for k in ("sigma_y", "sigma_x", "r2", "side_50", "side_90", "seconds")}))
        print(f"wrote {png_path} and {json_path}")
        runs.append(dict(numbers=numbers, png=png_path, json=json_path, erf=res.erf.cpu().numpy(), name=name,
                         size=size, model=setup["model"], weights=setup["weights"]))
    out: Dict[str, Any] = {k: runs[0][k] for k in ("numbers", "png", "json")}
    out["runs"] = [{k: r[k] for k in ("numbers", "png", "json")} for r in runs]
    if len(runs) > 1:
        titles = []
        for r in runs:
            rates = getattr(getattr(r["model"], "decode_head", None), "dilations", None)
            titles.append(f"{r['name']}\n{r['size']}" + (f", dilations={tuple(rates)}" if rates else ""))
        path = os.path.join(args.out_dir, f"{args.name or 'compare'}_erf_compare.png")
        plot_comparison([r["erf"] for r in runs], titles, f"ERF of the centre output unit ({runs[0]['weights']}, "
                        f"{runs[0]['numbers']['num_images']} images)", path)
        print(f"wrote {path}")
        out["compare_png"] = path
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    return 0 if run(parse_args(argv)) else 1
