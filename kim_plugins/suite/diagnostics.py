"""The diagnostics pairs of the suite on Fashion-MNIST: the dead pixel test and variance-safe ViT augmentation.

- ``deadpixel`` ("Dead Pixel Test Using Effective Receptive Field";
  :mod:`kim_plugins.layers.dead_pixel`): timm ``resnet18`` vs ``resnet18_even``
  (even stride-2 kernels) trained on the garments. Mechanism: the ERF lattice
  ratio of every stage of both trained models, and the logits' response to one
  pure red pixel (the authors' micro object) by the parity ``(y mod 2, x mod
  2)`` of its location. The paper expects a difference only for tasks that
  detect tiny perturbations; the report prints what was measured. (Training
  the authors' detect-the-red-pixel task itself stayed at chance accuracy
  within 400 CPU iterations, so the suite measures the trained classifier's
  response instead.)
- ``vitaug`` ("Configuring Data Augmentations to Reduce Variance Shift in
  Positional Embedding of Vision Transformers";
  :mod:`kim_plugins.layers.vit_augmentation`): a patch-4 ViT trained with
  timm's usual Mixup 0.8 + CutMix 1.0 + constant random erasing 0.25 vs the
  guideline (CutMix 1.0 + pixel random erasing 0.25). Mechanism: the
  PE-to-patch variance ratio on augmented training batches over the one on
  clean test images (1 = no variance shift).

Both reuse :mod:`kim_plugins.suite.cls` (same models, batches and flips per
variant; one seed: a mechanism check, not an accuracy claim).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from kim_plugins import robustness
from kim_plugins.markdown import markdown_table
from kim_plugins.suite import cls
from kim_plugins.suite.cls import ClassifierPair
from kim_plugins.suite.pairs import Cost, Variant, register

__all__ = ["DIAG_PAIRS", "DiagPair", "DeadPixelPair", "ViTAugPair", "sensitivity_by_parity", "pe_patch_shift"]

_OVERHEAD_S = 1.0
PARITIES = ("even/even", "even/odd", "odd/even", "odd/odd")  # (row, column) parity


# ----------------------------------------------------------------------------- dead pixel test
def _red(model) -> torch.Tensor:
    """The authors' micro object, a pure red pixel (1, 0, 0), normalised as the model expects."""
    return robustness.normalizer(model)(torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1))[0, :, 0, 0]


@torch.no_grad()
def sensitivity_by_parity(model, images: np.ndarray, device: str, per_image: int = 8,
                          seed: int = 123) -> Dict[str, float]:
    """Response of a trained classifier to one red pixel, by the pixel's parity ``(y mod 2, x mod 2)``.

    Every image gets ``per_image`` single-pixel perturbations (a uniform
    location each); the response is the L2 change of the logits. Returns the
    mean response per parity class, its max/min ratio, and the share of
    perturbations that flip the predicted class.
    """
    model.eval()
    normalize = robustness.normalizer(model)
    gen = torch.Generator().manual_seed(seed)
    red = _red(model)
    sums = {k: [0.0, 0] for k in PARITIES}
    flips = total = 0
    for i in range(0, len(images), 250):
        x = normalize(cls.to_input(images[i:i + 250])).to(device)
        base = model(x)
        b, _, h, w = x.shape
        for _ in range(per_image):
            ys = torch.randint(0, h, (b,), generator=gen)
            xs = torch.randint(0, w, (b,), generator=gen)
            xp = x.clone()
            xp[torch.arange(b), :, ys, xs] = red.to(x.device, x.dtype)
            out = model(xp)
            resp = (out - base).float().norm(dim=1).cpu()
            flips += int((out.argmax(-1) != base.argmax(-1)).sum())
            total += b
            for yy, xx, r in zip(ys.tolist(), xs.tolist(), resp.tolist()):
                key = f"{'odd' if yy % 2 else 'even'}/{'odd' if xx % 2 else 'even'}"
                sums[key][0] += r
                sums[key][1] += 1
    means = {k: a / max(n, 1) for k, (a, n) in sums.items()}
    out = {f"response {k}": v for k, v in means.items()}
    lo, hi = min(means.values()), max(means.values())
    out.update({"response max/min": hi / lo if lo > 0 else float("inf"),
                "prediction flips (%)": 100.0 * flips / max(total, 1)})
    return out


def _lattice(model, images: torch.Tensor) -> Dict[str, Dict[str, float]]:
    from kim_plugins.layers.dead_pixel import stage_dead_pixel_reports

    reps = stage_dead_pixel_reports(model, images, batch_size=8)
    return {stage: dict(ratio=r.ratio, ratio_y=r.axis_ratios[0], ratio_x=r.axis_ratios[1],
                        dead=100.0 * r.dead_fraction) for stage, (_, r) in reps.items()}


# ----------------------------------------------------------------------------- variance-safe ViT augmentation
def _vit_augment(guideline: bool, device: str) -> Callable:
    from timm.data import Mixup
    from timm.data.random_erasing import RandomErasing

    from kim_plugins.layers.vit_augmentation import variance_safe_mixup_args, variance_safe_random_erasing_args

    if guideline:
        mix = Mixup(**variance_safe_mixup_args(num_classes=10, label_smoothing=0.1))
        erase = RandomErasing(**variance_safe_random_erasing_args(probability=0.25, device=device))
    else:
        mix = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10)
        erase = RandomErasing(probability=0.25, mode="const", device=device)

    def augment(x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = erase(x.clone())  # per image, as timm's transform does, then Mixup on the batch
        return mix(x, y)
    return augment


@torch.no_grad()
def pe_patch_shift(model, train_x: torch.Tensor, test_x: torch.Tensor, augment: Callable) -> Dict[str, float]:
    """PE-to-patch variance ratio on augmented training batches, on clean test images, and their quotient."""
    from kim_plugins.layers.vit_augmentation import pe_to_patch_variance_ratio, variance_components

    model.eval()
    aug, _ = augment(train_x, torch.zeros(len(train_x), dtype=torch.long, device=train_x.device))
    npt = getattr(model, "num_prefix_tokens", 1) if not getattr(model, "no_embed_class", False) else 0
    r_train = pe_to_patch_variance_ratio(model.patch_embed(aug), model.pos_embed, npt)
    r_test = pe_to_patch_variance_ratio(model.patch_embed(test_x), model.pos_embed, npt)
    return {"PE/patch train": r_train, "PE/patch test": r_test, "train / test": r_train / r_test,
            "image variance train / test": variance_components(aug)["total"] / variance_components(test_x)["total"]}


# ----------------------------------------------------------------------------- the pairs
@dataclass
class DiagPair(ClassifierPair):
    """A diagnostics pair: both variants trained once (seed 0) on the same batches; a mechanism check."""

    iters_field: str = "diag_iters"

    def probe_cost(self, settings, cost):
        return 4 * 256 * cost["image_s"]

    def estimate_cost(self, settings, cost, seen):
        n = len(self.variants)
        return Cost(n * (_OVERHEAD_S + settings.diag_test_images * cost["image_s"] + self.probe_cost(settings, cost)),
                    n * 1.1 * settings.diag_iters * cost["step_s"])

    def augment(self, variant: Variant, device: str) -> Optional[Callable]:
        """The batch augmentation of ``variant`` (None: flips only)."""
        return None

    def measure_diag(self, model, variant: Variant, settings, data, augment: Optional[Callable], device: str
                     ) -> Dict[str, Any]:
        """The mechanism on the trained model (a row of the pair's table)."""
        raise NotImplementedError

    def run(self, settings, data, out_dir, device, cache):
        from kim_plugins.suite.records import PairResult, RunRecord, count_params, forward_gflops, param_fingerprint

        overrides = self.model_overrides(settings)
        result = PairResult(pair=self.name, title=self.title, description="", metric=self.metric)
        n_test = settings.diag_test_images
        test_x, test_y = data.test_images[:n_test], data.test_labels[:n_test]
        rows = []
        seed = 0
        base_shapes: Dict[str, Tuple[int, ...]] = {}
        for v in self.variants:
            model = cls.make_classifier(v.spec["timm"], overrides, seed)
            shapes = {k: tuple(p.shape) for k, p in model.named_parameters()}
            base_shapes = shapes if v.baseline else base_shapes
            # the enlarged kernels of the even model are the plugin itself: compare the parameters of equal shape
            init = {k: h for k, h in param_fingerprint(model).items() if shapes[k] == base_shapes.get(k)}
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
            augment = self.augment(v, device)
            train_time, order = cls.train_classifier(model, data.train_images, data.train_labels,
                                                     iters=settings.diag_iters, batch_size=settings.cls_batch,
                                                     lr=settings.cls_lr, seed=seed, device=device,
                                                     desc=f"[{self.name}] {v.name}", augment=augment)
            model.eval()
            value = cls.evaluate_top1(model, test_x, test_y, device)
            rows.append(dict(variant=v.name, **self.measure_diag(model, v, settings, data, augment, device)))
            gflops = forward_gflops(model, torch.zeros(1, 3, 32, 32, device=device))
            result.runs.append(RunRecord(pair=self.name, variant=v.name, baseline=v.baseline, seed=seed,
                                         metric=self.metric, value=value, train_time_s=train_time,
                                         iters=settings.diag_iters, params=count_params(model), gflops=gflops,
                                         data_order=order, init_params=init))
            del model
        result.mechanism[self.name] = rows
        common = (f"{settings.diag_iters} iterations x batch {settings.cls_batch}, AdamW lr {settings.cls_lr:g}, one "
                  f"seed (the same batches, flips and initialisation in both variants); {n_test} test images.")
        result.description = self.describe_diag(overrides, n_test) + common
        return result

    def describe_diag(self, overrides: Dict[str, Any], n_test: int) -> str:
        raise NotImplementedError


@dataclass
class DeadPixelPair(DiagPair):
    """ResNet-18 vs its even-kernel version: ERF lattice and single-pixel response by parity."""

    def model_overrides(self, settings):
        return dict(channels=tuple(settings.resnet["channels"]))

    def probe_cost(self, settings, cost):
        return (12 * 16 + 9 * (settings.diag_test_images // 4)) * cost["image_s"]

    def measure_diag(self, model, variant, settings, data, augment, device):
        n_test = settings.diag_test_images
        sens = sensitivity_by_parity(model, data.test_images[:n_test // 4], device)
        probe = robustness.normalizer(model)(cls.to_input(data.test_images[:16])).to(device)
        return dict(**sens, lattice=_lattice(model, probe))

    def describe_diag(self, overrides, n_test):
        return (f"timm `resnet18` vs `resnet18_even` with channels {overrides['channels']} on 32x32 inputs "
                f"(Fashion-MNIST padded, grey to RGB), trained on the garments (top-1). Response: the L2 change of the "
                f"logits when one pixel of a test image is set to pure red (the authors' micro object), "
                f"{8 * (n_test // 4)} single-pixel perturbations at uniform locations, grouped by the pixel's parity. "
                f"(Training the authors' detect-the-red-pixel task itself stayed at chance accuracy within 400 CPU "
                f"iterations, so the suite measures the trained classifier's response instead.) ")

    def section_lines(self, result):
        return deadpixel_lines(result.mechanism[self.name])


@dataclass
class ViTAugPair(DiagPair):
    """A ViT trained with timm's usual augmentation vs the variance-safe guideline: PE-to-patch variance shift."""

    overrides: str = "vit"

    def augment(self, variant, device):
        return _vit_augment(not variant.baseline, device)

    def measure_diag(self, model, variant, settings, data, augment, device):
        random.seed(1)
        np.random.seed(1)
        torch.manual_seed(1)
        normalize = robustness.normalizer(model)
        train_probe = normalize(cls.to_input(data.train_images[:256])).to(device)
        test_probe = normalize(cls.to_input(data.test_images[:256])).to(device)
        return pe_patch_shift(model, train_probe, test_probe, augment)

    def describe_diag(self, overrides, n_test):
        return (f"timm `vit_tiny_patch16_224` with {overrides} trained with timm's `Mixup(mixup_alpha=0.8, "
                f"cutmix_alpha=1.0)` + `RandomErasing(0.25, mode='const')` vs `Mixup(**variance_safe_mixup_args(...))` "
                f"(CutMix only) + `RandomErasing(**variance_safe_random_erasing_args(0.25))` (pixel mode); label "
                f"smoothing 0.1 in both. ")

    def section_lines(self, result):
        return vitaug_lines(result.mechanism[self.name])


DEADPIXEL = register(DeadPixelPair(
    name="deadpixel", group="deadpixel",
    title="ResNet-18 vs even-kernel ResNet-18: ERF lattice and single-pixel response",
    variants=(Variant("ResNet-18", True, dict(timm="resnet18")),
              Variant("ResNet-18 even kernels", False, dict(timm="resnet18_even")))))
VITAUG = register(ViTAugPair(
    name="vitaug", group="vitaug",
    title="ViT patch 4: timm's Mixup+CutMix+const erasing vs the variance-safe guideline",
    variants=(Variant("Mixup 0.8 + CutMix 1.0 + const erasing", True, dict(timm="vit_tiny_patch16_224")),
              Variant("CutMix 1.0 + pixel erasing (guideline)", False, dict(timm="vit_tiny_patch16_224")))))

#: The diagnostics pairs, by name.
DIAG_PAIRS: Dict[str, DiagPair] = {p.name: p for p in (DEADPIXEL, VITAUG)}


def deadpixel_lines(rows) -> List[str]:
    """The dead pixel test's mechanism section of report.md."""
    stages = list(rows[0]["lattice"])
    table = [dict(variant=r["variant"], **{f"l{i}": f"{r['lattice'][st]['ratio']:.2f}" for i, st in enumerate(stages)},
                  **{f"r{i}": f"{r[f'response {p}']:.3f}" for i, p in enumerate(PARITIES)},
                  ratio=f"{r['response max/min']:.3f}", flips=f"{r['prediction flips (%)']:.2f} %") for r in rows]
    columns = (["variant"] + [f"l{i}" for i in range(len(stages))] + [f"r{i}" for i in range(len(PARITIES))]
               + ["ratio", "flips"])
    headers = (["variant"] + [f"lattice {st}" for st in stages] + [f"response {p}" for p in PARITIES]
               + ["response max/min", "prediction flips"])
    return ["### Dead pixel test: ERF lattice and single-pixel response by pixel parity", "",
            "Lattice ratio: max/min of the mean ERF over the pixel-parity classes of each stage's centre unit "
            "(1 = no lattice; 16 test images; the trained models). Response: mean L2 change of the logits when "
            "one pixel of the given (row/column) parity is set to pure red.", "",
            markdown_table(table, columns, headers), "",
            "The paper expects the even kernels to matter only for tasks that detect tiny perturbations; "
            "one short seed is a mechanism check, and small differences are noise."]


def vitaug_lines(rows) -> List[str]:
    """The variance-safe ViT augmentation's mechanism section of report.md."""
    columns = ["variant", "PE/patch train", "PE/patch test", "train / test", "image variance train / test"]
    fmt = ["", "{:.4f}", "{:.4f}", "{:.3f}", "{:.3f}"]
    table = [{c: f.format(r[c]) if f else r[c] for c, f in zip(columns, fmt)} for r in rows]
    return ["### Variance-safe ViT augmentation: PE-to-patch variance ratio, training vs test", "",
            "Var(positional embedding) / Var(patch embeddings) on 256 augmented training images and on 256 clean "
            "test images, measured on the trained model; `train / test` = 1 means no variance shift.", "",
            markdown_table(table, columns)]
