#!/usr/bin/env python
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
import gzip
import json
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

try:  # run from a source checkout without installing
    import kim_plugins  # noqa: F401  registers the timm names
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import kim_plugins  # noqa: F401

import timm  # noqa: E402

REDUCE_DEFAULT = (0.4, 0.3, 0.2, 0.1, 0.05)  # ImageNet-C contrast, severities 1..5
ENHANCE_DEFAULT = (1.5, 2.0, 3.0, 4.0, 5.0)  # [decision]
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def contrast_change(images: torch.Tensor, factor: float) -> torch.Tensor:
    """ImageNet-C contrast change by ``factor`` (< 1 reduces, > 1 enhances) of ``(B, C, H, W)`` images in [0, 1].

    ``clip((x - m) * factor + m, 0, 1)`` with ``m`` the per-image, per-channel mean.
    """
    if factor < 0:
        raise ValueError(f"contrast factor must be >= 0, got {factor}")
    if images.ndim != 4:
        raise ValueError(f"expected (B, C, H, W) images, got shape {tuple(images.shape)}")
    mean = images.mean(dim=(2, 3), keepdim=True)
    return ((images - mean) * factor + mean).clamp_(0.0, 1.0)


def severity_table(reduce: Sequence[float], enhance: Sequence[float]) -> List[Tuple[str, int, float]]:
    """``(kind, severity, factor)`` rows: clean, reductions 1..n, enhancements 1..m."""
    rows = [("clean", 0, 1.0)]
    rows += [("reduce", i + 1, float(c)) for i, c in enumerate(reduce)]
    rows += [("enhance", i + 1, float(c)) for i, c in enumerate(enhance)]
    for kind, _, c in rows:
        if kind == "reduce" and not 0 <= c < 1:
            raise ValueError(f"--reduce factors must be in [0, 1), got {c}")
        if kind == "enhance" and not c > 1:
            raise ValueError(f"--enhance factors must be > 1, got {c}")
    return rows


# ----------------------------------------------------------------------------- data


def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(split: str, root: str = FASHION_MNIST_DIR) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST ``(uint8 images (N, 28, 28), int64 labels (N,))`` for ``split`` in {'train', 'test'}."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    img_path = os.path.join(root, f"{prefix}-images-idx3-ubyte.gz")
    if not os.path.exists(img_path):
        raise FileNotFoundError(f"{img_path} not found: install the Debian package 'dataset-fashion-mnist' "
                                "or pass --data /path/to/imagefolder")
    images = torch.from_numpy(_read_idx(img_path).copy())
    labels = torch.from_numpy(_read_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz")).astype(np.int64))
    return images, labels


def fashion_mnist_batches(images: torch.Tensor, labels: torch.Tensor, size: Tuple[int, int],
                          batch_size: int) -> Callable:
    """Factory of an iterator over ``([0, 1] float (B, 3, H, W), labels)`` batches, resized to ``size``."""

    def batches():
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].float().div_(255.0).unsqueeze(1)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
            yield x.expand(-1, 3, -1, -1).contiguous(), labels[i:i + batch_size]

    return batches


def imagefolder_batches(root: str, model: torch.nn.Module, batch_size: int, max_images: Optional[int],
                        workers: int) -> Tuple[Callable, int]:
    """Batches of ``[0, 1]`` images from an ImageFolder, preprocessed with the model's eval transform (no normalisation)."""
    from timm.data import create_transform, resolve_data_config
    from torchvision.datasets import ImageFolder

    cfg = resolve_data_config(args=dict(input_size=_input_size(model)), model=model)
    transform = create_transform(**cfg, is_training=False, normalize=False)
    dataset = ImageFolder(root, transform=transform)
    if max_images:
        dataset = torch.utils.data.Subset(dataset, range(min(max_images, len(dataset))))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)

    def batches():
        for x, y in loader:  # timm's un-normalised eval transform gives uint8 tensors
            yield (x.float().div_(255.0) if x.dtype == torch.uint8 else x), y

    return batches, len(dataset)


# ----------------------------------------------------------------------------- evaluation


def _input_size(model: torch.nn.Module) -> Tuple[int, int, int]:
    """The model's current input size (its ``img_size``), not the pretrained cfg's 224."""
    from timm.models import get_model_input_config
    return tuple(get_model_input_config(model)["input_size"])


def _normalizer(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    cfg = model.pretrained_cfg
    mean = torch.tensor(cfg["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, -1, 1, 1)
    return lambda x: (x - mean) / std


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Callable, factors: Sequence[float], total: Optional[int] = None,
             progress: bool = True) -> Dict[float, float]:
    """Top-1 accuracy (%) of ``model`` on ``batches()`` for every contrast factor (same images for all)."""
    model.eval()
    normalize = _normalizer(model)
    correct = {c: 0 for c in factors}
    seen = 0
    bar = None
    if progress and total:
        from mmengine.utils import ProgressBar
        bar = ProgressBar(total)
    for x, y in batches():
        for c in factors:
            xc = x if c == 1.0 else contrast_change(x, c)
            correct[c] += int((model(normalize(xc)).argmax(-1) == y).sum())
        seen += len(y)
        if bar is not None:
            for _ in range(len(y)):
                bar.update()
    if bar is not None:
        print()
    if seen == 0:
        raise ValueError("no images to evaluate")
    return {c: 100.0 * correct[c] / seen for c in factors}


def brief_train(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, size: Tuple[int, int],
                steps: int, batch_size: int = 128, lr: float = 1e-3, seed: int = 0) -> None:
    """Train ``model`` for ``steps`` AdamW steps on random batches (demo only; no augmentation)."""
    from mmengine.utils import ProgressBar

    gen = torch.Generator().manual_seed(seed)
    normalize = _normalizer(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    bar = ProgressBar(steps)
    for _ in range(steps):
        idx = torch.randint(len(images), (batch_size,), generator=gen)
        x = F.interpolate(images[idx].float().div_(255.0).unsqueeze(1), size=size, mode="bilinear",
                          align_corners=False, antialias=True).expand(-1, 3, -1, -1)
        loss = F.cross_entropy(model(normalize(x)), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.update()
    print()
    model.eval()


# ----------------------------------------------------------------------------- output


def format_markdown(results: Dict[str, Dict[float, float]], rows: Sequence[Tuple[str, int, float]],
                    provenance: Dict[str, str]) -> str:
    names = list(results)
    lines = ["| contrast | severity | factor | " + " | ".join(names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for kind, sev, c in rows:
        lines.append(f"| {kind} | {sev} | {c:g} | " + " | ".join(f"{results[n][c]:.2f}" for n in names) + " |")
    lines.append("")
    lines += [f"- `{n}`: {provenance[n]}" for n in names]
    return "\n".join(lines) + "\n"


def plot_title(data_name: str, provenance: Dict[str, str]) -> str:
    """Title that says how the weights were obtained (every distinct provenance, e.g. 'UNTRAINED (random init)')."""
    return f"Accuracy under contrast change on {data_name}\n" + "; ".join(sorted(set(provenance.values())))


def plot(results: Dict[str, Dict[float, float]], rows: Sequence[Tuple[str, int, float]], title: str,
         path: str) -> None:
    """Accuracy vs severity, reduction (left) and enhancement (right), clean accuracy at severity 0."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    clean = [c for kind, _, c in rows if kind == "clean"][0]
    for ax, kind in zip(axes, ("reduce", "enhance")):
        sel = [(0, clean)] + [(s, c) for k, s, c in rows if k == kind]
        for name, acc in results.items():
            ax.plot([s for s, _ in sel], [acc[c] for _, c in sel], marker="o", label=name)
        ax.set_xticks([s for s, _ in sel])
        ax.set_xticklabels([f"{s}\n(c={c:g})" for s, c in sel])
        ax.set_xlabel(f"contrast {'reduction' if kind == 'reduce' else 'enhancement'} severity")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 accuracy (%)")
    axes[1].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", required=True, help="timm model names (kim_plugins names included)")
    p.add_argument("--checkpoint", nargs="+", default=None,
                   help="one checkpoint per model ('none' for none); loaded with timm.models.load_checkpoint")
    p.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights (needs them cached)")
    p.add_argument("--model-kwargs", default="{}", help="JSON dict of timm.create_model kwargs for every model")
    p.add_argument("--data", default="fashion-mnist", help="'fashion-mnist' or an ImageFolder root")
    p.add_argument("--fashion-mnist-dir", default=FASHION_MNIST_DIR,
                   help="folder of the Fashion-MNIST *-ubyte.gz files (Debian package dataset-fashion-mnist)")
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


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Dict[float, float]]:
    args = parse_args(argv)
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
            size = _input_size(model)[1:]
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


if __name__ == "__main__":
    main()
