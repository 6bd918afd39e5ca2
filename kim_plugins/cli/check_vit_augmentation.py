"""Check ViT augmentation settings for variance shift of the positional embedding (arXiv 2405.14115).

Mixup shrinks the training images' variance (``lam^2 + (1 - lam)^2``) while test
images keep theirs, so the ratio of the positional embedding's variance to the
patch embedding's differs between training and test; constant-fill random
erasing does the same. This tool reads timm ``train.py`` settings, names every
setting that shifts the variance with its fix (the guideline: CutMix without
Mixup, pixel-mode random erasing; :mod:`kim_plugins.layers.vit_augmentation`),
and measures the shift with timm's own ``Mixup`` / ``RandomErasing`` on real
Fashion-MNIST test images, beside the guideline's settings.

Examples::

    python tools/check_vit_augmentation.py output/train/20240101-vit/args.yaml   # timm train.py writes it
    python tools/check_vit_augmentation.py mixup=0.8 cutmix=1.0 reprob=0.25 remode=const
    python tools/check_vit_augmentation.py mixup=0.8 --strict   # exit code 1 when something shifts

Settings use timm ``train.py``'s names (``mixup``, ``cutmix``, ``mixup_prob``,
``mixup_switch_prob``, ``reprob``, ``remode``, ``std``) or those of ``Mixup`` /
``RandomErasing`` / ``create_transform``; missing ones take ``train.py``'s
defaults. Writes ``<out-dir>/<name>_variance.png`` (measured vs closed-form
variance factor, settings vs guideline), ``.md`` (the printed table) and ``.json``.
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from kim_plugins.cli.common import doc_parser
from kim_plugins.layers.vit_augmentation import (Finding, check_augmentation,
                                                 expected_within_variance_factor, variance_components)
from kim_plugins.markdown import markdown_table

GUIDELINE = dict(mixup=0.0, cutmix=1.0, reprob=0.25, remode="pixel")


def read_settings(items: Sequence[str]) -> Dict[str, Any]:
    """Settings from a YAML/JSON file (timm's ``args.yaml``) or ``key=value`` pairs (Python literals)."""
    out: Dict[str, Any] = {}
    for item in items:
        if "=" in item:
            key, value = item.split("=", 1)
            try:
                out[key.replace("-", "_")] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                out[key.replace("-", "_")] = value
        elif os.path.isfile(item):
            with open(item) as f:
                if item.endswith(".json"):
                    out.update(json.load(f))
                else:
                    import yaml
                    out.update(yaml.safe_load(f) or {})
        else:
            raise SystemExit(f"{item!r} is neither a settings file nor key=value")
    return out


def _value(settings: Dict[str, Any], *names: str, default: Any) -> Any:
    for n in names:
        if settings.get(n) is not None:
            return settings[n]
    return default


def measure(settings: Dict[str, Any], images: torch.Tensor, batch: int = 500, seed: int = 0) -> Dict[str, float]:
    """Variance of ``images`` after timm's Mixup/CutMix and RandomErasing built from ``settings``, over before.

    Mixup draws one ``lam`` per image (timm's ``mode='elem'``) for a low-noise
    estimate: the mean factor is the same as with one draw per batch.
    """
    from timm.data import Mixup
    from timm.data.random_erasing import RandomErasing
    from tqdm import tqdm

    torch.manual_seed(seed)
    np.random.seed(seed)
    mixup_alpha = float(_value(settings, "mixup", "mixup_alpha", default=0.0))
    cutmix_alpha = float(_value(settings, "cutmix", "cutmix_alpha", default=0.0))
    prob = float(_value(settings, "mixup_prob", "prob", default=1.0))
    switch = float(_value(settings, "mixup_switch_prob", "switch_prob", default=0.5))
    mix = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob, switch_prob=switch,
                mode="elem", label_smoothing=0.0, num_classes=10) \
        if (mixup_alpha > 0 or cutmix_alpha > 0) else None
    re_prob = float(_value(settings, "reprob", "re_prob", "probability", default=0.0))
    erase = RandomErasing(probability=re_prob, mode=_value(settings, "remode", "re_mode", "mode", default="pixel"),
                          device="cpu") if re_prob > 0 else None
    out = []
    for b in tqdm(images.split(batch), desc="augment", unit="batch"):
        b = b.clone()
        if mix is not None:
            mix(b, torch.zeros(len(b), dtype=torch.long))
        if erase is not None:
            b = erase(b)
        out.append(b)
    before, after = variance_components(images), variance_components(torch.cat(out))
    return dict(within=after["within"] / before["within"], total=after["total"] / before["total"],
                expected_within=expected_within_variance_factor(mixup_alpha, cutmix_alpha, prob, switch)
                if re_prob == 0 else float("nan"))


def fashion_mnist(num: int, directory: Optional[str] = None) -> torch.Tensor:
    """``num`` shuffled Fashion-MNIST test images normalised by their own mean/std: ``(num, 1, 28, 28)``."""
    from kim_plugins.data.fashion_mnist import load_fashion_mnist

    images, _ = load_fashion_mnist("test", directory)
    x = torch.from_numpy(images.copy()).float()[:, None] / 255.0
    x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:num]]
    return (x - x.mean()) / x.std()


def markdown(findings: List[Finding], rows: Dict[str, Dict[str, float]]) -> str:
    table = [dict(severity=f.severity, setting=f"`{f.setting}`", value=f"`{f.value}`", message=f.message,
                  fix=f"`{f.fix}`") for f in findings]
    table = table or [dict(severity="ok", setting="-", value="-", message="no setting shifts the variance", fix="-")]
    lines = [markdown_table(table, headers=["severity", "setting", "value", "what happens", "fix"])]
    if rows:
        measured = [dict(settings=name, within=r["within"], total=r["total"],
                         expected="-" if math.isnan(r["expected_within"]) else f"{r['expected_within']:.3f}")
                    for name, r in rows.items()]
        lines += ["", markdown_table(measured, ["settings", "within", "expected", "total"],
                                     ["settings", "variance about the mean image (measured)", "closed form",
                                      "total variance (measured)"])]
    return "\n".join(lines)


def plot(rows: Dict[str, Dict[str, float]], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(6.5, 4), constrained_layout=True)
    ax.bar(x - 0.2, [rows[n]["within"] for n in names], 0.4, label="about the mean image (measured)")
    ax.bar(x + 0.2, [rows[n]["total"] for n in names], 0.4, label="total (measured)")
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xticks(x, names)
    ax.set_ylabel("training / test image variance")
    ax.set_title("Variance shift of the training images (Fashion-MNIST, timm Mixup/RandomErasing)", fontsize=9)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = doc_parser(__doc__)
    p.add_argument("settings", nargs="+", help="timm args.yaml / .json file, or key=value settings")
    p.add_argument("--data-std", type=float, nargs="+", help="per-channel pixel std of your data (0-1 scale)")
    p.add_argument("--num-images", type=int, default=2000,
                   help="Fashion-MNIST test images for the measurement (default 2000; 0 skips it)")
    p.add_argument("--fashion-mnist", help="folder of the Fashion-MNIST idx files (default: the Debian package's)")
    p.add_argument("--out-dir", default="work_dirs/vit_augmentation", help="output folder")
    p.add_argument("--name", default="augmentation", help="output file stem (default augmentation)")
    p.add_argument("--strict", action="store_true", help="exit code 1 when a setting shifts the variance")
    p.add_argument("--seed", type=int, default=0, help="seed of the augmentation draws (default 0)")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Check the settings, measure the variance shift; write the findings, numbers and plot."""
    settings = read_settings(args.settings)
    findings = check_augmentation(settings, data_std=args.data_std)
    rows: Dict[str, Dict[str, float]] = {}
    os.makedirs(args.out_dir, exist_ok=True)
    png = None
    if args.num_images > 0:
        images = fashion_mnist(args.num_images, args.fashion_mnist)
        rows = {"your settings": measure(settings, images, seed=args.seed),
                "guideline": measure(GUIDELINE, images, seed=args.seed)}
        png = os.path.join(args.out_dir, f"{args.name}_variance.png")
        plot(rows, png)
    table = markdown(findings, rows)
    md = os.path.join(args.out_dir, f"{args.name}_variance.md")
    js = os.path.join(args.out_dir, f"{args.name}_variance.json")
    with open(md, "w") as f:
        f.write(f"# ViT augmentation check\n\nSettings: `{settings}`\n\n{table}\n")
    numbers = dict(settings={k: str(v) for k, v in settings.items()}, measured=rows,
                   findings=[dict(f.__dict__, value=str(f.value)) for f in findings])
    with open(js, "w") as f:
        json.dump(numbers, f, indent=1)
    print(table)
    print(f"wrote {md}, {js}" + (f" and {png}" if png else ""))
    warnings = [f for f in findings if f.severity == "warning"]
    if args.strict and warnings:
        raise SystemExit(1)
    return dict(findings=findings, measured=rows, md=md, json=js, png=png)


def main(argv: Optional[Sequence[str]] = None) -> int:
    run(parse_args(argv))
    return 0
