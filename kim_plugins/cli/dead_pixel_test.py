"""Dead pixel test of a timm model or an mmseg config: ERF lattice before and after the even-kernel conversion.

The dead-pixel paper ("Dead Pixel Test Using Effective Receptive Field", Pattern
Recognition Letters; :mod:`kim_plugins.layers.dead_pixel`) finds a lattice of
partially dead input pixels in the ERF of strided CNNs: a stride-2 kernel that
is not a multiple of 2 covers some pixels more often than others. This tool
measures, per stage (timm ``feature_info`` / the mmseg backbone's outputs), the
lattice ratio (max/min of the mean ERF over the pixel-parity classes; 1 = no
lattice) and the dead-pixel fraction, before and after
:func:`~kim_plugins.layers.dead_pixel.even_kernel_convert`.

Examples::

    python tools/dead_pixel_test.py resnet50 --size 64 --num-images 8
    python tools/dead_pixel_test.py resnet18 --checkpoint r18.pth --init pad   # trained: keep the function
    python tools/dead_pixel_test.py configs/stochastic_pooling/pspnet_r50d-d8_4xb2-80k_cityscapes-512x1024.py \\
        --size 64 --num-images 2

Images: real Fashion-MNIST test garments (``kim_plugins.data``, grey replicated
to RGB, resized to ``--size``, normalised as the model expects) or ``--images DIR``.
Nothing is downloaded: without ``--checkpoint`` the weights are an untrained
initialisation and the outputs say so. ``--init pad`` zero-pads the existing
weights (the function, hence the ERF, is unchanged but for ``--maxpool``: use
it with a checkpoint you then fine-tune); ``--init fresh`` draws new even
kernels (the default without a checkpoint, the authors' ``*_f`` models).

Writes ``<out-dir>/<name>_dead_pixel.png`` (ERF and dead-pixel map of the last
stage, before | after), ``<name>_dead_pixel.md`` (the Markdown table printed at
the end) and ``<name>_dead_pixel.json``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from kim_plugins.cli import inputs
from kim_plugins.cli.common import LazyDictAction, add_threads_and_seed, doc_parser, start_run
from kim_plugins.config.inspect import crop_size, segmentor_norm
from kim_plugins.layers.dead_pixel import even_kernel_changes, even_kernel_convert, stage_dead_pixel_reports
from kim_plugins.markdown import markdown_table


def fashion_mnist_images(num: int, size: Tuple[int, int], mean: Sequence[float], std: Sequence[float],
                         scale: float, directory: Optional[str] = None) -> torch.Tensor:
    """The first ``num`` Fashion-MNIST test images as normalised ``(num, 3, H, W)`` RGB."""
    import torch.nn.functional as F

    from kim_plugins.data.fashion_mnist import load_fashion_mnist

    images, _ = load_fashion_mnist("test", directory)
    x = torch.from_numpy(images[:num].copy()).float()[:, None] / 255.0
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1) * scale
    m = torch.tensor(mean, dtype=torch.float32)[None, :, None, None]
    s = torch.tensor(std, dtype=torch.float32)[None, :, None, None]
    return (x - m) / s


def prepare(args: argparse.Namespace) -> Dict[str, Any]:
    """The backbone to test, its images and a description."""
    size = inputs.parse_size(args.size)
    if inputs.is_config(args.model):
        segmentor, cfg = inputs.load_segmentor(args.model, args.checkpoint, args.cfg_options, args.device)
        model = segmentor.backbone
        size = size or crop_size(cfg)
        if size is None:
            raise SystemExit(f"{args.model}: no crop_size in the config; pass --size H W")
        mean, std, scale = segmentor_norm(cfg)
        kind = "mmseg backbone"
    else:
        model = inputs.load_timm(args.model, args.checkpoint, args.device)
        pcfg = getattr(model, "pretrained_cfg", {}) or {}
        size = size or tuple(pcfg.get("input_size", (3, 224, 224))[1:])
        mean, std, scale = list(pcfg.get("mean", (0.485, 0.456, 0.406))), \
            list(pcfg.get("std", (0.229, 0.224, 0.225))), 1.0
        kind = "timm model"
    if args.images:
        files = inputs.image_files(args.images)[:args.num_images]
        images = inputs.load_images(files, size, mean, std, scale)
        source = f"folder {args.images}"
    else:
        images = fashion_mnist_images(args.num_images, size, mean, std, scale, args.fashion_mnist)
        source = "Fashion-MNIST test images"
    weights = f"checkpoint {args.checkpoint}" if args.checkpoint else "untrained (random initialisation)"
    model.eval()  # mmseg's ResNet.train() returns None: no chaining
    return dict(model=model, images=images.to(args.device), size=size, kind=kind, source=source,
                weights=weights)


def dead_pixel_table(before: Dict[str, Any], after: Dict[str, Any]) -> str:
    """Stage | lattice ratio before/after | per-axis ratios | dead fraction before/after."""
    rows = []
    for name in before:
        b, a = before[name][1], after[name][1]
        rows.append(dict(stage=name, ratio_before=f"{b.ratio:.3f}", ratio_after=f"{a.ratio:.3f}",
                         axes_before=f"{b.axis_ratios[0]:.3f} / {b.axis_ratios[1]:.3f}",
                         axes_after=f"{a.axis_ratios[0]:.3f} / {a.axis_ratios[1]:.3f}",
                         dead_before=f"{100 * b.dead_fraction:.1f} %", dead_after=f"{100 * a.dead_fraction:.1f} %"))
    return markdown_table(rows, headers=["stage", "lattice ratio before", "after", "ratio y / x before", "after",
                                         "dead pixels before", "after"])


def plot(before: Tuple[torch.Tensor, Any], after: Tuple[torch.Tensor, Any], title: str, path: str,
         crop: int = 24) -> None:
    """ERF (log scale), its centre crop and the dead-pixel map, before (top) and after (bottom)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(12, 8), constrained_layout=True)
    for row, (label, (erf, rep)) in enumerate((("before", before), ("after", after))):
        z = erf.cpu().numpy()
        h, w = z.shape
        cy, cx = np.unravel_index(np.argmax(z), z.shape)
        y0, x0 = max(0, min(cy - crop // 2, h - crop)), max(0, min(cx - crop // 2, w - crop))
        rel = np.log10(z / z.max() + 1e-4)
        axes[row, 0].imshow(rel, cmap="inferno", vmin=-4, vmax=0, interpolation="nearest")
        axes[row, 0].set_title(f"{label}: log10(ERF / max)", fontsize=9)
        axes[row, 1].imshow(z[y0:y0 + crop, x0:x0 + crop], cmap="inferno", interpolation="nearest")
        axes[row, 1].set_title(f"{label}: ERF, {crop}x{crop} around the peak (linear); "
                               f"lattice ratio {rep.ratio:.2f}", fontsize=9)
        axes[row, 2].imshow(rep.dead_map.cpu().numpy(), cmap="gray_r", interpolation="nearest")
        axes[row, 2].set_title(f"{label}: dead pixels (< {rep.threshold:g} x local level): "
                               f"{100 * rep.dead_fraction:.1f} %", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = doc_parser(__doc__)
    p.add_argument("model", help="timm model name (e.g. resnet50) or mmseg config file (.py): its backbone")
    p.add_argument("--checkpoint", help="weights: timm checkpoint_path or mmseg checkpoint (.pth)")
    p.add_argument("--images", help="folder of images (default: Fashion-MNIST test images)")
    p.add_argument("--fashion-mnist", help="folder of the Fashion-MNIST idx files (default: the Debian package's)")
    p.add_argument("--num-images", type=int, default=8, help="images to accumulate (default 8)")
    p.add_argument("--size", type=int, nargs="+", help="input H [W] (default: timm input_size / config crop)")
    p.add_argument("--batch-size", type=int, default=4, help="images per backward (default 4)")
    p.add_argument("--period", type=int, default=2, help="lattice period: classes (y mod P, x mod P) (default 2)")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="a pixel is dead below this fraction of its local level (default 0.5)")
    p.add_argument("--init", choices=("pad", "fresh"), default=None,
                   help="even kernels: zero-padded weights (function kept) or fresh ones "
                        "(default: pad with --checkpoint, fresh without)")
    p.add_argument("--no-maxpool", dest="maxpool", action="store_false",
                   help="keep the 3x3 max-pool (the authors enlarge it to 4x4; not function-preserving)")
    p.add_argument("--out-dir", default="work_dirs/dead_pixel", help="output folder (default work_dirs/dead_pixel)")
    p.add_argument("--name", help="output file stem (default: from the model)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    add_threads_and_seed(p, "seed of untrained and fresh weights (default 0)")
    p.add_argument("--cfg-options", nargs="+", action=LazyDictAction, default=None,
                   help="override mmseg config settings, key=value (as in mmseg's tools)")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """The dead pixel test before and after the even-kernel conversion; writes the table, plot and numbers."""
    start_run(args)
    os.makedirs(args.out_dir, exist_ok=True)
    setup = prepare(args)
    model, images = setup["model"], setup["images"]
    init = args.init or ("pad" if args.checkpoint else "fresh")
    converted = copy.deepcopy(model)
    changes = [c for c in even_kernel_changes(converted, maxpool=args.maxpool)]
    even_kernel_convert(converted, maxpool=args.maxpool, init=init)
    kw = dict(period=args.period, threshold=args.threshold, batch_size=args.batch_size, progress=True)
    before = stage_dead_pixel_reports(model, images, **kw)
    after = stage_dead_pixel_reports(converted, images, **kw)
    name = args.name or os.path.splitext(os.path.basename(args.model))[0]
    table = dead_pixel_table(before, after)
    size = f"{setup['size'][0]}x{setup['size'][1]}"
    last = list(before)[-1]
    png = os.path.join(args.out_dir, f"{name}_dead_pixel.png")
    plot(before[last], after[last], f"{name} ({setup['kind']}, {setup['weights']}), stage {last}, {size}, "
         f"{images.shape[0]} {setup['source']}; after = even kernels ({init}"
         f"{', 4x4 max-pool' if args.maxpool else ''})", png)
    changed: List[Dict[str, Any]] = [dict(name=c.name, kind=c.kind, old=list(c.old_kernel), new=list(c.new_kernel),
                                          applied=c.applied, reason=c.reason) for c in changes]
    numbers = dict(model=args.model, kind=setup["kind"], weights=setup["weights"], images=setup["source"],
                   num_images=int(images.shape[0]), input_size=list(setup["size"]), init=init,
                   maxpool=args.maxpool, changes=changed,
                   before={k: v[1].numbers() for k, v in before.items()},
                   after={k: v[1].numbers() for k, v in after.items()})
    md = os.path.join(args.out_dir, f"{name}_dead_pixel.md")
    js = os.path.join(args.out_dir, f"{name}_dead_pixel.json")
    with open(md, "w") as f:
        f.write(f"# Dead pixel test: {name}\n\n{setup['kind']}, {setup['weights']}, {size}, "
                f"{images.shape[0]} {setup['source']}, period {args.period}.\n\n{table}\n")
    with open(js, "w") as f:
        json.dump(numbers, f, indent=1, default=float)
    print("\nchanged layers: " + ", ".join(f"{c['name']} {c['old']}->{c['new']}" + ("" if c["applied"] else
                                                                                    " (kept)") for c in changed))
    print(table)
    print(f"wrote {png}, {md} and {js}")
    return dict(numbers=numbers, png=png, md=md, json=js, table=table)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return 0 if run(parse_args(argv)) else 1
