"""The suite's NaN-safe depth pair: monocular depth on Fashion scenes with sparse ground truth.

Scenes are composed in memory from real Fashion-MNIST garments
(:func:`kim_plugins.data.fashion_scenes.compose_scene`, 64x64): every garment
pixel gets a depth from its class (``1 + 0.8 * class`` metres, 1.0–8.2) and
the background 9.5 m. Training ground truth is *sparse*, as from a depth
sensor: each scene keeps a random fraction of its pixels, drawn log-uniformly
in [1e-4, 0.3], so some scenes have 0 or 1 valid pixel (where the NaN-safe
loss skips the sample; mmseg's in-place masking gives an empty sample a zero
gradient, and its nan needs an exact prediction, D = 0). Validation ground
truth is dense.

Variants (same model initialisation, same batches):

- ``mmseg SiLogLoss`` (baseline): ``sigmoid(x) * max_depth`` and mmseg 1.2.2's
  own ``SiLogLoss``;
- ``StableSiLogLoss``: the same head, the NaN-safe loss (guarded sqrt,
  two-pass variance, < 2 valid pixels -> 0);
- ``StableSiLogLoss + log-sigmoid``: the loss on ``log(max_depth) +
  logsigmoid(x)`` (the log-space head).

Counted: steps with a non-finite loss or gradient (skipped, as a grad scaler
would), the fraction of valid pixels of the last batch whose logit gradient
is exactly 0 (stuck), and mmseg's ``DepthMetric`` on the dense validation
scenes (metric: d1 in %).
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from kim_plugins.suite.pairs import Cost, Pair, Variant, register

__all__ = ["DEPTH_VARIANTS", "DepthPair", "DEPTH", "make_depth_scenes", "run_depth_pair"]

MAX_DEPTH = 10.0
BACKGROUND_DEPTH = 9.5
SCENE = 64

DEPTH_VARIANTS: Tuple[Variant, ...] = (
    Variant("mmseg SiLogLoss", True, dict(loss="mmseg", log_space=False)),
    Variant("StableSiLogLoss", False, dict(loss="stable", log_space=False)),
    Variant("StableSiLogLoss + log-sigmoid", False, dict(loss="stable", log_space=True)),
)


def make_depth_scenes(images: np.ndarray, labels: np.ndarray, count: int, seed: int, sparse: bool
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``count`` scenes: (N, 3, 64, 64) float images in [0, 1] and (N, 1, 64, 64) depth (0 = no measurement)."""
    from kim_plugins.data.fashion_scenes import compose_scene

    rng = np.random.default_rng(seed)
    xs, ds = [], []
    for _ in range(count):
        img, lab, _ = compose_scene(images, labels, rng, size=(SCENE, SCENE), scale_range=(0.5, 1.5))
        depth = np.where(lab > 0, 1.0 + 0.8 * (lab.astype(np.float32) - 1), BACKGROUND_DEPTH).astype(np.float32)
        if sparse:
            frac = float(np.exp(rng.uniform(np.log(1e-4), np.log(0.3))))
            depth = depth * (rng.random(depth.shape) < frac)
        xs.append(img.transpose(2, 0, 1))
        ds.append(depth[None])
    return torch.from_numpy(np.stack(xs)).float().div_(255.0), torch.from_numpy(np.stack(ds))


class TinyDepthNet(nn.Module):
    """A small encoder-decoder that outputs one logit per pixel."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                                 nn.ReLU(inplace=True))

        self.enc = nn.Sequential(block(3, width), block(width, 2 * width, 2), block(2 * width, 2 * width),
                                 block(2 * width, 4 * width, 2), block(4 * width, 4 * width))
        self.dec = nn.Sequential(block(4 * width, 2 * width), nn.Conv2d(2 * width, 1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dec(self.enc(x))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


def _loss_fn(spec: Dict[str, Any]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    from kim_plugins.layers.nan_safe_depth import StableSiLogLoss, log_depth_from_logits

    if spec["loss"] == "mmseg":
        from mmseg.models.losses import SiLogLoss

        mmseg_loss = SiLogLoss()
        return lambda logits, gt: mmseg_loss(torch.sigmoid(logits) * MAX_DEPTH, gt)
    stable = StableSiLogLoss()
    if spec["log_space"]:
        return lambda logits, gt: stable(log_depth_from_logits(logits, MAX_DEPTH), gt, pred_is_log=True)
    return lambda logits, gt: stable(torch.sigmoid(logits) * MAX_DEPTH, gt)


def train_depth(model: nn.Module, spec: Dict[str, Any], x: torch.Tensor, d: torch.Tensor, *, iters: int,
                batch_size: int, seed: int, device: str) -> Dict[str, Any]:
    """Adam steps; non-finite steps are counted and skipped. Returns timing, digest and counters."""
    import warnings

    loss_fn = _loss_fn(spec)
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    digest = hashlib.sha1()
    non_finite, stuck = 0, float("nan")
    t0 = time.perf_counter()
    for it in range(iters):
        idx = torch.randint(0, len(x), (batch_size,), generator=gen)
        digest.update(idx.numpy().tobytes())
        xb, db = x[idx].to(device), d[idx].to(device)
        logits = model(xb)
        logits.retain_grad()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the stable loss warns about scenes with < 2 valid pixels
            loss = loss_fn(logits, db)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grads_ok = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in model.parameters())
        if not (bool(torch.isfinite(loss)) and grads_ok):
            non_finite += 1
            continue
        opt.step()
        if it == iters - 1:  # valid pixels of samples that have a loss (>= 2 valid) whose gradient is exactly 0
            valid = db > 1e-6
            valid &= valid.flatten(1).sum(1).view(-1, 1, 1, 1) >= 2
            stuck = float(((logits.grad == 0) & valid).sum()) / max(1, int(valid.sum()))
    return dict(train_time_s=time.perf_counter() - t0, order=digest.hexdigest(), non_finite_steps=non_finite,
                stuck_frac_last_batch=stuck)


@torch.no_grad()
def evaluate_depth(model: nn.Module, x: torch.Tensor, d: torch.Tensor, device: str) -> Dict[str, float]:
    """mmseg's ``DepthMetric`` (per-scene metrics averaged) on dense validation scenes."""
    from mmseg.evaluation.metrics import DepthMetric

    metric = DepthMetric(min_depth_eval=1e-3, max_depth_eval=MAX_DEPTH)
    model.eval()
    for i in range(0, len(x), 16):
        pred = torch.sigmoid(model(x[i:i + 16].to(device))).cpu() * MAX_DEPTH
        pred = torch.nan_to_num(pred, nan=MAX_DEPTH / 2).clamp(min=1e-3)
        metric.process({}, [dict(pred_depth_map=dict(data=p), gt_depth_map=dict(data=g))
                            for p, g in zip(pred, d[i:i + 16])])
    out = metric.compute_metrics(metric.results)
    return {k: float(v) for k, v in out.items()}


def _batch(settings) -> int:
    """Half the classification batch: a 64x64 dense prediction costs more per image."""
    return max(2, settings.cls_batch // 2)


@dataclass
class DepthPair(Pair):
    """mmseg's ``SiLogLoss`` vs the NaN-safe loss and head on sparse depth (see the module docstring)."""

    metric: str = "d1"
    iters_field: str = "stab_iters"

    def timing_setup(self, settings):
        model = TinyDepthNet()
        x = torch.rand(_batch(settings), 3, SCENE, SCENE)
        d = torch.rand(_batch(settings), 1, SCENE, SCENE) * 9 + 0.5
        return model, lambda m: F.l1_loss(torch.sigmoid(m(x)) * MAX_DEPTH, d), lambda m: m(x), len(x)

    def estimate_cost(self, settings, cost, seen):
        from kim_plugins.suite.cls import _CLS_OVERHEAD_S

        runs = settings.seeds * len(self.variants)
        return Cost(runs * (_CLS_OVERHEAD_S + settings.depth_val_scenes * cost["image_s"]),
                    runs * 1.1 * settings.stab_iters * cost["step_s"])

    def run(self, settings, data, out_dir, device, cache):
        return run_depth_pair(self, settings, data, device)

    def section_lines(self, result):
        from kim_plugins.suite.stability import report_lines

        return report_lines(result)


def run_depth_pair(pair: DepthPair, settings, data, device: str):
    """Train the three depth variants for every seed on sparse Fashion-scene depth; count failures."""
    from kim_plugins.suite.records import PairResult, RunRecord, count_params, forward_gflops, param_fingerprint

    train_x, train_d = make_depth_scenes(data.train_images, data.train_labels, settings.depth_train_scenes, 0, True)
    val_x, val_d = make_depth_scenes(data.test_images, data.test_labels, settings.depth_val_scenes, 1, False)
    valid_counts = (train_d > 0).flatten(1).sum(1)
    result = PairResult(pair=pair.name, title=pair.title, description="", metric=pair.metric)
    rows = []
    for seed in range(settings.seeds):
        for v in pair.variants:
            name, spec, baseline = v.name, v.spec, v.baseline
            torch.manual_seed(seed)
            model = TinyDepthNet()
            init = param_fingerprint(model)
            stats = train_depth(model, spec, train_x, train_d, iters=settings.stab_iters,
                                batch_size=_batch(settings), seed=seed, device=device)
            metrics = evaluate_depth(model, val_x, val_d, device)
            model.eval()
            extra = dict(non_finite_steps=stats["non_finite_steps"],
                         stuck_frac_last_batch=round(stats["stuck_frac_last_batch"], 5),
                         rmse=round(metrics["rmse"], 4), abs_rel=round(metrics["abs_rel"], 4))
            rows.append(dict(variant=name, seed=seed, **extra))
            result.runs.append(RunRecord(pair=pair.name, variant=name, baseline=baseline, seed=seed,
                                         metric=pair.metric,
                                         value=100.0 * metrics["d1"], train_time_s=stats["train_time_s"],
                                         iters=settings.stab_iters, params=count_params(model),
                                         gflops=forward_gflops(model, torch.zeros(1, 3, SCENE, SCENE, device=device)),
                                         data_order=stats["order"], init_params=init, extra=extra))
    result.mechanism["table"] = rows
    result.description = (
        f"{settings.depth_train_scenes} training / {settings.depth_val_scenes} validation Fashion scenes "
        f"({SCENE}x{SCENE}, garments scaled 0.5-1.5x) with depth 1 + 0.8 * class metres per garment and "
        f"{BACKGROUND_DEPTH} m background; training depth kept at a log-uniform random fraction of pixels per scene "
        f"(median {int(valid_counts.median())} valid pixels; {int((valid_counts < 2).sum())} scenes with fewer than "
        f"2), validation depth dense. A {count_params(TinyDepthNet())}-parameter encoder-decoder, Adam lr 2e-3, "
        f"{settings.stab_iters} iterations x batch {_batch(settings)}; steps with a non-finite loss or gradient "
        "are skipped and counted. Metrics: mmseg's `DepthMetric` (d1 in %, rmse, abs_rel).")
    return result


DEPTH = register(DepthPair(
    name="depth", group="depth", variants=DEPTH_VARIANTS,
    title="Monocular depth on sparse Fashion scenes: mmseg SiLogLoss vs NaN-safe"))
