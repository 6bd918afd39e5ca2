"""Grad-CAM vs Extended-CAM of a timm model on Fashion-MNIST images, side by side, with deletion/insertion scores.

Extended-CAM ("Extending Class Activation Mapping Using Gaussian Receptive
Field", arXiv 2001.05153; :mod:`kim_plugins.layers.extended_cam`) spreads each
cell of the class map over the input with a Gaussian of the measured ERF's
size instead of bilinear interpolation, and weights cells by gradient times
activation. Without ``--checkpoint`` the model is first trained briefly on
Fashion-MNIST (``--train-steps``) so the maps mean something; nothing is
downloaded.

Examples::

    python tools/cam.py resnet18 --size 64 --output-stride 8 --train-steps 300
    python tools/cam.py resnet50 --checkpoint fmnist_r50.pth --size 64 --num-classes 10
    python tools/cam.py resnet18_even --size 64 --sigma 6     # a fixed Gaussian sigma (input pixels)

Writes ``<out-dir>/<name>_cam.png`` (image | Grad-CAM | Extended-CAM per row),
``<name>_cam.md`` (deletion / insertion scores, RISE: lower deletion and higher
insertion are better, plus a random-order control) and ``<name>_cam.json``.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn.functional as F

from kim_plugins.cli.common import add_threads_and_seed, doc_parser, start_run
from kim_plugins.layers.extended_cam import ExtendedCAM, GradCAM, deletion_insertion
from kim_plugins.markdown import markdown_table


def fashion_mnist(split: str, directory: Optional[str] = None):
    """``(uint8 images (N, 28, 28), int64 labels (N,))`` tensors."""
    import numpy as np

    from kim_plugins.data.fashion_mnist import load_fashion_mnist

    images, labels = load_fashion_mnist(split, directory)
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def prepare_images(images: torch.Tensor, size: int, normalize) -> torch.Tensor:
    """uint8 ``(N, 28, 28)`` -> normalised RGB ``(N, 3, size, size)``, as ``robustness.brief_train`` feeds it."""
    x = F.interpolate(images.float().div(255.0).unsqueeze(1), size=(size, size), mode="bilinear",
                      align_corners=False, antialias=True).expand(-1, 3, -1, -1)
    return normalize(x)


def plot(images: torch.Tensor, maps: Dict[str, Any], labels: torch.Tensor, preds: torch.Tensor, title: str,
         path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kim_plugins.data.fashion_mnist import CLASSES

    names = list(maps)
    n = images.shape[0]
    fig, axes = plt.subplots(n, 1 + len(names), figsize=(2.4 * (1 + len(names)), 2.4 * n), squeeze=False,
                             constrained_layout=True)
    for i in range(n):
        img = images[i, 0].cpu().numpy()
        axes[i, 0].imshow(img, cmap="gray")
        axes[i, 0].set_title(f"{CLASSES[int(labels[i])]} (pred {CLASSES[int(preds[i])]})", fontsize=7)
        for j, name in enumerate(names):
            axes[i, j + 1].imshow(img, cmap="gray")
            axes[i, j + 1].imshow(maps[name][i], cmap="jet", alpha=0.5, vmin=0, vmax=1)
            if i == 0:
                axes[i, j + 1].set_title(name, fontsize=9)
        for ax in axes[i]:
            ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = doc_parser(__doc__)
    p.add_argument("model", help="timm model name (kim_plugins names included); its last feature map is visualised")
    p.add_argument("--checkpoint", help="timm checkpoint_path (a 10-class Fashion-MNIST model); skips training")
    p.add_argument("--train-steps", type=int, default=300,
                   help="brief AdamW training on Fashion-MNIST without --checkpoint (default 300; 0: untrained)")
    p.add_argument("--output-stride", type=int, default=None,
                   help="timm output_stride (e.g. 8 for a finer map on small images; default: the model's)")
    p.add_argument("--size", type=int, default=64, help="input side (Fashion-MNIST is resized; default 64)")
    p.add_argument("--num-images", type=int, default=6, help="images shown (default 6)")
    p.add_argument("--eval-images", type=int, default=200, help="test images for deletion/insertion (default 200)")
    p.add_argument("--steps", type=int, default=16, help="deletion/insertion levels (default 16)")
    p.add_argument("--sigma", default="erf", help="Gaussian sigma in input pixels, or 'erf' (default: measured)")
    p.add_argument("--fashion-mnist", help="folder of the Fashion-MNIST idx files (default: the Debian package's)")
    p.add_argument("--out-dir", default="work_dirs/cam", help="output folder (default work_dirs/cam)")
    p.add_argument("--name", help="output file stem (default: the model name)")
    add_threads_and_seed(p, "seed of the weights, training batches and random control")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Train briefly (or load), compare Grad-CAM and Extended-CAM; write the plot, table and numbers."""
    import timm

    from kim_plugins.robustness import brief_train, normalizer

    start_run(args)
    sigma: Any = args.sigma if args.sigma == "erf" else float(args.sigma)
    kwargs = dict(checkpoint_path=args.checkpoint) if args.checkpoint else {}
    if args.output_stride:
        kwargs["output_stride"] = args.output_stride
    model = timm.create_model(args.model, pretrained=False, num_classes=10, **kwargs)
    if args.checkpoint:
        weights = f"checkpoint {args.checkpoint}"
    elif args.train_steps > 0:
        images, labels = fashion_mnist("train", args.fashion_mnist)
        brief_train(model, images, labels, (args.size, args.size), args.train_steps, batch_size=64, seed=args.seed)
        weights = f"trained {args.train_steps} steps on Fashion-MNIST"
    else:
        weights = "untrained (random initialisation)"
    model.eval()
    test_images, test_labels = fashion_mnist("test", args.fashion_mnist)
    n = max(args.num_images, args.eval_images)
    x = prepare_images(test_images[:n], args.size, normalizer(model))
    y = test_labels[:n]
    with torch.no_grad():
        preds = model(x).argmax(dim=1)
    cams = {"Grad-CAM": GradCAM(model), "Extended-CAM": ExtendedCAM(model, sigma=sigma)}
    rows, shown, contrib = {}, {}, {}
    from tqdm import tqdm
    for name, cam in tqdm(cams.items(), desc="CAM", unit="method"):
        maps, _ = cam.contributions(x, y)
        contrib[name] = maps
        rows[name] = deletion_insertion(model, x[:args.eval_images], maps[:args.eval_images], y[:args.eval_images],
                                        steps=args.steps)
        shown[name] = cam(x[:args.num_images], y[:args.num_images])
    gen = torch.Generator().manual_seed(args.seed)
    rows["random order (control)"] = deletion_insertion(
        model, x[:args.eval_images], torch.rand(contrib["Grad-CAM"][:args.eval_images].shape, generator=gen),
        y[:args.eval_images], steps=args.steps)
    accuracy = float((preds == y).float().mean())
    sig = cams["Extended-CAM"].sigma_
    name = args.name or args.model
    os.makedirs(args.out_dir, exist_ok=True)
    table = markdown_table([dict(map=k, **v) for k, v in rows.items()], ["map", "deletion", "insertion"],
                           ["map", "deletion (lower is better)", "insertion (higher is better)"], floatfmt="{:.4f}")
    head = (f"{args.model}, {weights}, {args.size}x{args.size}, top-1 {100 * accuracy:.1f} % on {n} test images; "
            f"Extended-CAM sigma = ({sig[0]:.2f}, {sig[1]:.2f}) px ({'measured ERF' if sigma == 'erf' else 'given'}); "
            f"deletion/insertion over {min(n, args.eval_images)} images, {args.steps} levels, baseline 0")
    png = os.path.join(args.out_dir, f"{name}_cam.png")
    plot(x[:args.num_images], shown, y, preds, head, png)
    md = os.path.join(args.out_dir, f"{name}_cam.md")
    js = os.path.join(args.out_dir, f"{name}_cam.json")
    with open(md, "w") as f:
        f.write(f"# Grad-CAM vs Extended-CAM: {name}\n\n{head}\n\n{table}\n")
    numbers = dict(model=args.model, weights=weights, size=args.size, accuracy=accuracy, sigma=list(sig),
                   scores=rows, eval_images=min(n, args.eval_images))
    with open(js, "w") as f:
        json.dump(numbers, f, indent=1)
    print(head)
    print(table)
    print(f"wrote {png}, {md} and {js}")
    return dict(numbers=numbers, png=png, md=md, json=js, table=table)


def main(argv: Optional[Sequence[str]] = None) -> int:
    run(parse_args(argv))
    return 0
