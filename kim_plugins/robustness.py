"""Accuracy under contrast reduction and enhancement: the evaluation of the PreLayerNorm paper.

Kim et al., "Improved Robustness of Vision Transformer via PreLayerNorm in
Patch Embedding" (arXiv:2111.08413): ViTs degrade badly under contrast
*enhancement*, and a LayerNorm on the patch embedding (``vit_*_pln_*``) fixes
it. Contrast change (ImageNet-C's ``contrast``, extended to factors > 1), on
pixel values in [0, 1] before the model's mean/std normalisation::

    x' = clip((x - mean_c(x)) * c + mean_c(x), 0, 1)

with ``mean_c`` the per-image, per-channel mean. Reduction uses ImageNet-C's
severities 1-5, ``c = 0.4, 0.3, 0.2, 0.1, 0.05`` [paper]; enhancement uses
``c = 1.5, 2, 3, 4, 5`` by default [decision: the paper's enhancement levels
were not available]. ``c = 1`` is the clean accuracy.

Used by ``tools/robustness.py`` (the command line) and by the main job's ViT
pair (:mod:`kim_plugins.suite.cls`).
"""
from __future__ import annotations

import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .markdown import markdown_table

__all__ = ["REDUCE_DEFAULT", "ENHANCE_DEFAULT", "contrast_change", "severity_table", "fashion_mnist_batches",
           "imagefolder_batches", "model_input_size", "normalizer", "evaluate", "brief_train", "format_markdown",
           "plot_title", "plot"]

REDUCE_DEFAULT = (0.4, 0.3, 0.2, 0.1, 0.05)  # ImageNet-C contrast, severities 1..5
ENHANCE_DEFAULT = (1.5, 2.0, 3.0, 4.0, 5.0)  # [decision]


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


def fashion_mnist_batches(images: torch.Tensor, labels: torch.Tensor, size: Tuple[int, int],
                          batch_size: int) -> Callable:
    """Factory of an iterator over ``([0, 1] float (B, 3, H, W), labels)`` batches, resized to ``size``.

    Args:
        images: uint8 ``(N, 28, 28)`` (as :func:`kim_plugins.data.fashion_mnist.load_fashion_mnist` gives,
            converted with ``torch.from_numpy``).
        labels: int64 ``(N,)``.
        size: ``(H, W)`` of the model input.
        batch_size: Images per batch.
    """

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

    cfg = resolve_data_config(args=dict(input_size=model_input_size(model)), model=model)
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


def model_input_size(model: torch.nn.Module) -> Tuple[int, int, int]:
    """The model's current input size (its ``img_size``), not the pretrained cfg's 224."""
    from timm.models import get_model_input_config
    return tuple(get_model_input_config(model)["input_size"])


def normalizer(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> (x - mean) / std`` with the model's ``pretrained_cfg`` mean and std, on ``x``'s device and dtype."""
    cfg = model.pretrained_cfg
    mean = torch.tensor(cfg["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, -1, 1, 1)
    return lambda x: (x - mean.to(x)) / std.to(x)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Callable, factors: Sequence[float], total: Optional[int] = None,
             progress: bool = True) -> Dict[float, float]:
    """Top-1 accuracy (%) of ``model`` on ``batches()`` for every contrast factor (same images for all).

    ``batches()`` yields ``([0, 1] images (B, 3, H, W), labels)`` on any device; each batch is moved to the
    model's device.
    """
    model.eval()
    device = next(iter(model.parameters()), torch.empty(0)).device
    normalize = normalizer(model)
    correct = {c: 0 for c in factors}
    seen = 0
    bar = None
    if progress and total:
        from mmengine.utils import ProgressBar
        bar = ProgressBar(total, file=sys.stdout)
    for x, y in batches():
        x, y = x.to(device), y.to(device)
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
    normalize = normalizer(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    bar = ProgressBar(steps, file=sys.stdout)
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
    """Table of accuracy per contrast level (rows) and model (columns), then one provenance line per model."""
    names = list(results)
    table = [dict(contrast=kind, severity=sev, factor=f"{c:g}", **{n: f"{results[n][c]:.2f}" for n in names})
             for kind, sev, c in rows]
    lines = [markdown_table(table, ["contrast", "severity", "factor"] + names), ""]
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
