"""Accuracy of classifiers under contrast reduction and contrast enhancement.

The PreLayerNorm paper (Kim et al., "Improved Robustness of Vision Transformer
via PreLayerNorm in Patch Embedding", arXiv:2111.08413) reports that ViTs
degrade badly under contrast *enhancement*, and that LayerNorm on the patch
embedding (``vit_*_pln_*``) fixes it. This tool measures accuracy vs severity
for one or more timm models on the same images and writes a table and a plot.

Contrast change (ImageNet-C's ``contrast``, extended to factors > 1), on
pixel values in [0, 1] before the model's mean/std normalisation::

    x' = clip((x - mean_c(x)) * c + mean_c(x), 0, 1)

with ``mean_c`` the per-image, per-channel mean. Reduction uses ImageNet-C's
severities 1-5, ``c = 0.4, 0.3, 0.2, 0.1, 0.05`` [paper]; enhancement uses
``c = 1.5, 2, 3, 4, 5`` by default [decision: the paper's enhancement levels
were not available; change them with ``--enhance``]. ``c = 1`` is the clean
accuracy.

Data: ``--data fashion-mnist`` (the Debian package ``dataset-fashion-mnist``,
real 28x28 images, resized to the model's input size, grey replicated to RGB)
or ``--data /path/to/folder`` (an ImageFolder: one sub-folder per class,
preprocessed with the model's timm eval transform).

Examples::

    # two ImageNet checkpoints on an ImageNet-val style folder
    python tools/robustness.py --model vit_small_patch16_224 vit_small_patch16_pln_224 \\
        --checkpoint vanilla.pth pln.pth --data /data/imagenet/val --max-images 5000

    # offline demo: briefly train both on Fashion-MNIST, then evaluate
    python tools/robustness.py --model vit_tiny_patch16_224 vit_tiny_patch16_pln_224 \\
        --model-kwargs '{"img_size": 32, "patch_size": 4, "depth": 4, "num_classes": 10}' \\
        --data fashion-mnist --train-steps 300 --out-dir work_dirs/robustness

Writes ``<out-dir>/robustness.{md,json,png}``. Every plot title says how the
weights were obtained (checkpoint, brief training of N steps, or untrained),
so an untrained or briefly trained result is never mistaken for the paper's.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

import timm

import kim_plugins  # noqa: F401  registers the timm names

from kim_plugins.data.fashion_mnist import DEFAULT_DIR
from kim_plugins.data.fashion_mnist import load_fashion_mnist as _load_fashion_mnist_arrays
from kim_plugins.robustness import (ENHANCE_DEFAULT, REDUCE_DEFAULT, brief_train, evaluate,
                                    fashion_mnist_batches, format_markdown, imagefolder_batches, model_input_size,
                                    plot, plot_title, severity_table)


def load_fashion_mnist(split: str, root: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST ``(uint8 images (N, 28, 28), int64 labels (N,))`` for ``split`` in {'train', 'test'}."""
    images, labels = _load_fashion_mnist_arrays(split, root)
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", required=True, help="timm model names (kim_plugins names included)")
    p.add_argument("--checkpoint", nargs="+", default=None,
                   help="one checkpoint per model ('none' for none); loaded with timm.models.load_checkpoint")
    p.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights (needs them cached)")
    p.add_argument("--model-kwargs", default="{}", help="JSON dict of timm.create_model kwargs for every model")
    p.add_argument("--data", default="fashion-mnist", help="'fashion-mnist' or an ImageFolder root")
    p.add_argument("--fashion-mnist", "--fashion-mnist-dir", dest="fashion_mnist_dir", default=None, metavar="DIR",
                   help=f"folder of the four Fashion-MNIST idx files (default: $FASHION_MNIST_DIR or {DEFAULT_DIR}, "
                        "the Debian package dataset-fashion-mnist)")
    p.add_argument("--max-images", type=int, default=None, help="evaluate on the first N images")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--reduce", type=float, nargs="*", default=list(REDUCE_DEFAULT), help="reduction factors < 1")
    p.add_argument("--enhance", type=float, nargs="*", default=list(ENHANCE_DEFAULT), help="enhancement factors > 1")
    p.add_argument("--train-steps", type=int, default=0,
                   help="Fashion-MNIST only: briefly train each model first (demo); the plot says so")
    p.add_argument("--seed", type=int, default=0, help="seed of model init and of the brief training")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--out-dir", default="work_dirs/robustness")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> Dict[str, Dict[float, float]]:
    """Train (or load) every model, evaluate it under every contrast factor; return accuracy per factor."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model_kwargs = json.loads(args.model_kwargs)
    checkpoints = args.checkpoint or ["none"] * len(args.model)
    if len(checkpoints) != len(args.model):
        raise SystemExit(f"--checkpoint: give one per model ({len(args.model)}), got {len(checkpoints)}")
    fashion = args.data == "fashion-mnist"
    if args.train_steps and not fashion:
        raise SystemExit("--train-steps is a demo for --data fashion-mnist; fine-tune real models with timm's train.py")
    rows = severity_table(args.reduce, args.enhance)
    factors = [c for _, _, c in rows]
    os.makedirs(args.out_dir, exist_ok=True)

    results: Dict[str, Dict[float, float]] = {}
    provenance: Dict[str, str] = {}
    for name, ckpt in zip(args.model, checkpoints):
        torch.manual_seed(args.seed)
        model = timm.create_model(name, pretrained=args.pretrained, **model_kwargs)
        if ckpt.lower() != "none":
            timm.models.load_checkpoint(model, ckpt)
            provenance[name] = f"weights from {ckpt}"
        elif args.pretrained:
            provenance[name] = "timm pretrained weights"
        else:
            provenance[name] = "UNTRAINED (random init)"
        if fashion:
            size = model_input_size(model)[1:]
            if args.train_steps:
                train_x, train_y = load_fashion_mnist("train", args.fashion_mnist_dir)
                print(f"[{name}] brief training: {args.train_steps} steps on Fashion-MNIST train")
                brief_train(model, train_x, train_y, size, args.train_steps, seed=args.seed)
                provenance[name] = f"BRIEFLY TRAINED ({args.train_steps} steps on Fashion-MNIST train, from " + \
                    ("random init)" if provenance[name].startswith("UNTRAINED") else provenance[name] + ")")
            test_x, test_y = load_fashion_mnist("test", args.fashion_mnist_dir)
            if args.max_images:
                test_x, test_y = test_x[:args.max_images], test_y[:args.max_images]
            batches, total = fashion_mnist_batches(test_x, test_y, size, args.batch_size), len(test_y)
        else:
            batches, total = imagefolder_batches(args.data, model, args.batch_size, args.max_images, args.workers)
        print(f"[{name}] evaluating {total} images x {len(factors)} contrast levels")
        results[name] = evaluate(model, batches, factors, total, progress=not args.no_progress)

    data_name = "Fashion-MNIST test" if fashion else os.path.basename(os.path.normpath(args.data))
    title = plot_title(data_name, provenance)
    md = f"# Contrast robustness on {data_name}\n\n" + format_markdown(results, rows, provenance)
    with open(os.path.join(args.out_dir, "robustness.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out_dir, "robustness.json"), "w") as f:
        json.dump(dict(data=data_name, rows=rows, provenance=provenance, model_kwargs=model_kwargs,
                       accuracy={n: {str(c): a for c, a in r.items()} for n, r in results.items()}), f, indent=2)
    plot(results, rows, title, os.path.join(args.out_dir, "robustness.png"))
    print(md)
    print(f"wrote {args.out_dir}/robustness.{{md,json,png}}")
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    run(parse_args(argv))
    return 0
