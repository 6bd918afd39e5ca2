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
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from kim_plugins.cli.common import LazyDictAction, doc_parser
from kim_plugins.config.inspect import crop_size, segmentor_norm

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


# ----------------------------------------------------------------------------- models
def is_config(model: str) -> bool:
    """True when ``model`` names an mmseg config file rather than a timm model."""
    return model.endswith(".py") or os.path.isfile(model)


def uncalibrated_equalizer_owners(model: torch.nn.Module) -> List[str]:
    """Module paths of the heads whose ``'dataset'`` scale equalizers are uncalibrated and may not run so."""
    from kim_plugins.layers.scale_equalizer import ScaleEqualizer

    owners = []
    for name, m in model.named_modules():
        if isinstance(m, ScaleEqualizer) and m.mode == "dataset" and not m.is_calibrated and not m.allow_uncalibrated:
            owner = name.split(".scale_equalizers.")[0]
            if owner not in owners:
                owners.append(owner)
    return owners


def load_segmentor(config: Any, checkpoint: Optional[str] = None, cfg_options: Optional[Dict] = None,
                   device: str = "cpu", trust: bool = False) -> Tuple[torch.nn.Module, Any]:
    """Build an mmseg segmentor offline: no pretrained download, SyncBN -> BN.

    The model is :func:`kim_plugins.config.inspect.build_segmentor`'s (``mmseg.apis.init_model``;
    without ``checkpoint``, mmseg's own ``init_weights``: an untrained
    initialisation). ``trust`` (``--trust-checkpoint``) lets an old-style
    runner checkpoint that safe loading refuses be unpickled. Returns
    ``(model, cfg)``; ``cfg`` has the ``cfg_options`` and the offline, BN rewrite.

    Raises:
        SystemExit: Scale equalizers that were never calibrated (an untrained
            SE head): the message gives ``--checkpoint`` and the command-line
            spelling of ``allow_uncalibrated``.
    """
    from mmengine.config import Config

    from kim_plugins.config.inspect import build_segmentor
    from kim_plugins.config.rewrite import offline_weights, sync_bn_to_bn

    cfg = Config.fromfile(config) if isinstance(config, str) else config
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    sync_bn_to_bn(cfg.model)
    offline_weights(cfg.model)
    model = build_segmentor(cfg, checkpoint, device, trust=trust)
    owners = uncalibrated_equalizer_owners(model)
    if owners:
        flags = " ".join(f"model.{o}.allow_uncalibrated=True" for o in owners)
        weights = f"checkpoint {checkpoint}" if checkpoint else "untrained weights"
        raise SystemExit(f"{config if isinstance(config, str) else 'the config'}: the scale equalizers of "
                         f"{', '.join(owners)} were never calibrated ({weights}). Pass --checkpoint with a trained "
                         f"checkpoint, or measure the ERF with mean 0 / variance 1 equalizers: --cfg-options {flags}")
    return model, cfg


def load_timm(name: str, checkpoint: Optional[str] = None, device: str = "cpu",
              model_kwargs: Optional[Dict[str, Any]] = None,
              size: Optional[Tuple[int, int]] = None) -> torch.nn.Module:
    """``timm.create_model(name, pretrained=False, checkpoint_path=checkpoint, **model_kwargs)``.

    kim_plugins' names work too. A model whose timm config has a fixed input
    size (ViTs) is built for ``size`` (``img_size=size``) unless
    ``model_kwargs`` sets ``img_size``.
    """
    import timm
    from timm.models import get_pretrained_cfg_value

    import kim_plugins  # noqa: F401  timm registrations
    kwargs = dict(model_kwargs or {})
    if size is not None and "img_size" not in kwargs and get_pretrained_cfg_value(name, "fixed_input_size"):
        kwargs["img_size"] = size
    if checkpoint:
        kwargs["checkpoint_path"] = checkpoint
    return timm.create_model(name, pretrained=False, **kwargs).to(device).eval()


def dataset_fixture_name(cfg: Any) -> str:
    """The dataset fixture in the layout of a config's training data.

    Raises:
        SystemExit: No fixture for the config's dataset classes (through
            ``RepeatDataset``/``ConcatDataset``); the message names ``--fixture`` and ``--images``.
    """
    from kim_plugins.dry_run.dataset_fixtures import fixture_for_config

    try:
        return fixture_for_config(cfg)
    except ValueError as err:
        raise SystemExit(f"{err}: pass --fixture NAME or --images DIR") from None


# ----------------------------------------------------------------------------- images
def image_files(folder: str) -> List[str]:
    """Image files of a folder (recursive), sorted."""
    out = []
    for root, _, files in os.walk(folder):
        out.extend(os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_EXTS))
    if not out:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTS)}) under {folder!r}")
    return sorted(out)


def load_images(files: Sequence[str], size: Tuple[int, int], mean: Sequence[float], std: Sequence[float],
                scale: float) -> torch.Tensor:
    """Read RGB images, resize to ``size`` (H, W), normalise to ``((x/255*scale) - mean) / std``."""
    from PIL import Image

    h, w = size
    arrs = []
    for f in files:
        with Image.open(f) as im:
            arrs.append(np.asarray(im.convert("RGB").resize((w, h), Image.BILINEAR), dtype=np.float32))
    x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2) * (scale / 255.0)
    m = torch.tensor(mean, dtype=torch.float32)[None, :, None, None]
    s = torch.tensor(std, dtype=torch.float32)[None, :, None, None]
    return (x - m) / s


def fixture_files(name: str, num_images: int, size: Tuple[int, int], root: str) -> List[str]:
    """Write a synthetic dataset fixture of ``num_images`` training images and list them."""
    from kim_plugins.dry_run.dataset_fixtures import FIXTURES, make_dataset_fixture

    data_root = make_dataset_fixture(name, root, num_train=num_images, num_val=1, size=size)
    spec = FIXTURES[name]
    folder = os.path.join(data_root, spec.img_dir.format(split=spec.splits[0]))
    files = [f for f in image_files(folder) if f.endswith(spec.img_suffix)]
    return files[:num_images]


def parse_size(values: Optional[Sequence[int]]) -> Optional[Tuple[int, int]]:
    if not values:
        return None
    if len(values) > 2 or min(values) <= 0:
        raise SystemExit(f"--size takes one or two positive ints (H [W]), got {values}")
    return (values[0], values[-1])


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
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the untrained weights and the synthetic images (default 0): results are reproducible")
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

    if args.num_images < 1:
        raise SystemExit(f"--num-images must be >= 1, got {args.num_images}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # untrained weights are drawn from the global generator
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


if __name__ == "__main__":
    sys.exit(main())
