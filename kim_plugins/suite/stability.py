"""The training-stability pairs of the suite: dropout placement, BN-gamma decay, temperature-free InfoNCE, NaN-safe depth.

Same conventions as :mod:`kim_plugins.suite.cls` (its data pipeline, seeds,
batch order and evaluation): every variant of a pair is created after
``torch.manual_seed(seed)`` and reads the same batches, so the only difference
is the plugin.

- ``dropout``: pre-activation ResNet (timm ``resnetv2_50`` layout, small
  widths, output stride 8 so the pooled map is 4x4): no dropout vs timm's
  ``drop_rate=0.2`` (after pooling) vs ``resnetv2_50_dropout`` (branch 0.1 +
  0.2 before pooling). Mechanism: the logit variance over dropout masks of
  each trained model (BN in eval, only the dropouts random), measured and
  closed form for the head.
- ``gamma``: ResNet-18-D (the SAP pair's widths), SGD with weight decay on no
  gamma / every gamma / the guideline's categories
  (:func:`~kim_plugins.timm.gamma_param_groups.bn_gamma_param_groups`).
  Mechanism: mean |gamma| per category after training.
- ``infonce``: SimCLR-style pre-training of the same ResNet-18-D encoder +
  MLP projector on two augmented views, InfoNCE at tau = 0.5 (baseline) and
  0.07 vs temperature-free; metric: kNN top-1 (k = 20, cosine) of the
  encoder features. A tuned tau may win: the paper's claim is "no tuning
  needed", not "always better".
- ``depth``: :mod:`kim_plugins.suite.depth_pair` (sparse-depth Fashion scenes,
  mmseg's ``SiLogLoss`` vs the NaN-safe loss and head).
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from kim_plugins import robustness
from kim_plugins.markdown import markdown_table
from kim_plugins.suite.cls import _CLS_OVERHEAD_S, evaluate_top1, make_classifier, to_input, train_classifier
from kim_plugins.suite.pairs import Cost, Pair, Variant, register

__all__ = ["STABILITY_PAIRS", "StabilityPair", "DropoutPair", "GammaPair", "InfoNCEPair", "report_lines"]

_GAMMA_OFF = dict(branch_last=0.0, branch_inner=0.0, shortcut=0.0, outside=0.0)
_GAMMA_ALL = dict(branch_last=1.0, branch_inner=1.0, shortcut=1.0, outside=1.0)

_SGD_LR, _SGD_WD = 0.05, 5e-4


def _preact_overrides(settings) -> Dict[str, Any]:
    r = settings.resnet
    return dict(layers=[1, 1, 1, 1], channels=tuple(4 * c for c in r["channels"]), stem_chs=r["stem_width"],
                output_stride=8)


def _sgd_with_gamma_groups(mult: Optional[Dict[str, float]]) -> Callable[[nn.Module], torch.optim.Optimizer]:
    from kim_plugins.timm.gamma_param_groups import bn_gamma_param_groups

    def make(model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(bn_gamma_param_groups(model, _SGD_WD, mult), lr=_SGD_LR, momentum=0.9)
    return make


# --------------------------------------------------------------------------------------------------- mechanisms

@torch.no_grad()
def logit_variance_over_masks(model: nn.Module, images: torch.Tensor, draws: int = 32) -> float:
    """Mean over images and logits of the logit variance over dropout masks (BN in eval, dropouts random)."""
    normalize = robustness.normalizer(model)
    model.eval()
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout) and m.p > 0]   # timm's drop_rate included
    if not drops:
        return 0.0
    for m in drops:
        m.train()
    x = normalize(images)
    out = torch.stack([model(x) for _ in range(draws)])
    model.eval()
    return float(out.var(dim=0, unbiased=True).mean())


@torch.no_grad()
def head_variance_closed_form(model: nn.Module, images: torch.Tensor, p: float, placement: str) -> float:
    """The closed form of :func:`~kim_plugins.layers.dropout_placement.head_dropout_logit_variance`, averaged."""
    from kim_plugins.layers.dropout_placement import head_dropout_logit_variance

    model.eval()
    feats = model.forward_features(robustness.normalizer(model)(images))
    return float(head_dropout_logit_variance(feats, model.head.fc.weight, p, placement).mean())


def gamma_means(model: nn.Module) -> Dict[str, float]:
    """Mean |gamma| per category."""
    from kim_plugins.layers.bn_gamma_decay import classify_bn_gammas

    modules = dict(model.named_modules())
    acc: Dict[str, List[float]] = {}
    for bn, cat in classify_bn_gammas(model).items():
        acc.setdefault(cat, []).extend(modules[bn].weight.detach().abs().flatten().tolist())
    return {c: float(np.mean(v)) for c, v in acc.items()}


# --------------------------------------------------------------------------------------------------- contrastive

class _Projected(nn.Module):
    """Encoder (features) + SimCLR's 2-layer MLP projector."""

    def __init__(self, encoder: nn.Module, dim: int = 64) -> None:
        super().__init__()
        self.encoder = encoder
        width = encoder.num_features
        self.projector = nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(x))


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop (pad 4), horizontal flip and brightness/contrast jitter, per image, from ``gen``."""
    n = x.shape[0]
    padded = F.pad(x, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (n,), generator=gen)
    dx = torch.randint(0, 9, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(32))[:, None, :, None].expand(n, 3, 32, 40)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(32))[:, None, None, :].expand(n, 3, 32, 32)
    out = out.gather(3, cols)
    flip = torch.rand(n, generator=gen) < 0.5
    out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    bright = 0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=gen)
    contrast = 0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=gen)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    return ((out - mean) * contrast + mean * bright).clamp(0, 1)


def train_contrastive(model: _Projected, images: np.ndarray, *, temperature: Optional[float], iters: int,
                      batch_size: int, lr: float, seed: int, device: str) -> Tuple[float, str, List[float]]:
    """SimCLR steps with InfoNCE (``temperature``) or the temperature-free loss (None)."""
    from timm.optim import create_optimizer_v2

    from kim_plugins.layers.temperature_free_infonce import TemperatureFreeInfoNCE

    criterion = TemperatureFreeInfoNCE(temperature=temperature)
    model.to(device).train()
    normalize = robustness.normalizer(model.encoder)
    opt = create_optimizer_v2(model, "adamw", lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    digest = hashlib.sha1()
    losses = []
    t0 = time.perf_counter()
    for _ in range(iters):
        idx = torch.randint(0, len(images), (batch_size,), generator=gen)
        digest.update(idx.numpy().tobytes())
        x = to_input(images[idx.numpy()])
        v1, v2 = _augment(x, gen).to(device), _augment(x, gen).to(device)
        loss = criterion(model(normalize(v1)), model(normalize(v2)))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite contrastive loss (temperature={temperature})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return time.perf_counter() - t0, digest.hexdigest(), losses


@torch.no_grad()
def knn_top1(encoder: nn.Module, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
             test_y: np.ndarray, device: str, k: int = 20) -> float:
    """Top-1 (%) of a cosine k-nearest-neighbour vote on the encoder features."""
    encoder.eval()
    normalize = robustness.normalizer(encoder)

    def embed(images: np.ndarray) -> torch.Tensor:
        return torch.cat([F.normalize(encoder(normalize(to_input(images[i:i + 500]).to(device))), dim=1).cpu()
                          for i in range(0, len(images), 500)])

    bank, queries = embed(train_x), embed(test_x)
    labels = torch.from_numpy(train_y)
    top = (queries @ bank.t()).topk(min(k, len(bank)), dim=1).indices
    votes = F.one_hot(labels[top], 10).sum(dim=1)
    return 100.0 * float((votes.argmax(dim=1) == torch.from_numpy(test_y)).double().mean())


# --------------------------------------------------------------------------------------------------- pairs

def _encoder(settings, seed: int) -> nn.Module:
    encoder = make_classifier("resnet18d", settings.resnet, seed)
    encoder.reset_classifier(0)  # features; the classifier's init drew after every encoder weight
    return encoder


def _common(settings, n_test: int) -> str:
    return (f"Fashion-MNIST 28x28 zero-padded to 32x32, grey to RGB; {settings.stab_iters} iterations x batch "
            f"{settings.cls_batch}; evaluated on the first {n_test} test images. ")


@dataclass
class StabilityPair(Pair):
    """A training-stability pair on Fashion-MNIST: same initialisation and batches for every variant."""

    metric: str = "top-1"
    iters_field: str = "stab_iters"
    timing_views: int = 1  # images per training sample in the timed step (two views for contrastive pairs)

    def make_model(self, spec: Dict[str, Any], settings, seed: int) -> nn.Module:
        return make_classifier("resnet18d", settings.resnet, seed)

    def timing_setup(self, settings):
        model = self.make_model(self.baseline.spec, settings, 0)
        x = torch.randn(settings.cls_batch * self.timing_views, 3, 32, 32)
        y = torch.randint(0, 10, (len(x),))
        return model, lambda m: F.cross_entropy(m(x), y), lambda m: m(x[:settings.cls_batch]), settings.cls_batch

    def eval_images(self, settings) -> int:
        return settings.stab_test_images

    def probe_cost(self, settings, cost: Dict[str, float]) -> float:
        return 0.0

    def estimate_cost(self, settings, cost, seen):
        runs = settings.seeds * len(self.variants)
        fixed = runs * (_CLS_OVERHEAD_S + self.eval_images(settings) * cost["image_s"]) + self.probe_cost(settings,
                                                                                                           cost)
        return Cost(fixed, runs * 1.1 * settings.stab_iters * cost["step_s"])

    def train_and_evaluate(self, variant: Variant, settings, data, seed: int, test_x, test_y, device: str):
        """Train one variant; returns ``(net, init digests, train time, data-order digest, value, extra)``."""
        raise NotImplementedError

    def mechanism_row(self, net: nn.Module, variant: Variant, probe: torch.Tensor, device: str
                      ) -> Optional[Dict[str, Any]]:
        """The mechanism on the trained seed-0 model (a row of the pair's table), or None."""
        return None

    def description(self, settings, n_test: int) -> str:
        raise NotImplementedError

    def run(self, settings, data, out_dir, device, cache):
        from kim_plugins.suite.records import PairResult, RunRecord, count_params, forward_gflops

        test_x = data.test_images[:settings.stab_test_images]
        test_y = data.test_labels[:settings.stab_test_images]
        result = PairResult(pair=self.name, title=self.title, description="", metric=self.metric)
        probe = to_input(data.test_images[:256])
        rows: List[Dict[str, Any]] = []
        for seed in range(settings.seeds):
            for v in self.variants:
                net, init, train_time, order, value, extra = self.train_and_evaluate(v, settings, data, seed, test_x,
                                                                                      test_y, device)
                row = self.mechanism_row(net, v, probe, device) if seed == 0 else None
                if row is not None:
                    rows.append(row)
                net.eval()
                gflops = forward_gflops(net, torch.zeros(1, 3, 32, 32, device=device))
                result.runs.append(RunRecord(pair=self.name, variant=v.name, baseline=v.baseline, seed=seed,
                                             metric=self.metric, value=value, train_time_s=train_time,
                                             iters=settings.stab_iters, params=count_params(net), gflops=gflops,
                                             data_order=order, init_params=init, extra=extra))
                del net
        result.mechanism["table"] = rows
        result.description = self.description(settings, len(test_y))
        return result

    def section_lines(self, result):
        return report_lines(result)


@dataclass
class _SupervisedPair(StabilityPair):
    """Supervised training of a timm classifier (:func:`~kim_plugins.suite.cls.train_classifier`)."""

    def optimizer(self, spec: Dict[str, Any]) -> Optional[Callable[[nn.Module], torch.optim.Optimizer]]:
        return None  # AdamW at settings.cls_lr

    def lr(self, settings) -> float:
        return settings.cls_lr

    def train_and_evaluate(self, variant, settings, data, seed, test_x, test_y, device):
        from kim_plugins.suite.records import param_fingerprint

        model = self.make_model(variant.spec, settings, seed)
        init = param_fingerprint(model)
        train_time, order = train_classifier(
            model, data.train_images, data.train_labels, iters=settings.stab_iters, batch_size=settings.cls_batch,
            lr=self.lr(settings), seed=seed, device=device, desc=f"[{self.name}] {variant.name} seed {seed}",
            make_optimizer=self.optimizer(variant.spec))
        return model, init, train_time, order, evaluate_top1(model, test_x, test_y, device), {}


@dataclass
class DropoutPair(_SupervisedPair):
    """Dropout placement: the logit variance over dropout masks of each trained model."""

    def make_model(self, spec, settings, seed):
        extra = {k: v for k, v in spec.items() if k not in ("timm", "head_closed_form_p")}
        return make_classifier(spec["timm"], dict(_preact_overrides(settings), **extra), seed)

    def probe_cost(self, settings, cost):
        return len(self.variants) * 32 * 256 * cost["image_s"]

    def mechanism_row(self, net, variant, probe, device):
        row = dict(variant=variant.name, logit_var_over_masks=logit_variance_over_masks(net, probe.to(device)))
        p = variant.spec.get("head_closed_form_p")  # the guideline model: its head dropout in closed form
        if p is not None:
            for placement in ("before_pool", "after_pool"):
                row[f"head_only_closed_form_{placement}"] = head_variance_closed_form(net, probe.to(device), p,
                                                                                      placement)
        return row

    def description(self, settings, n_test):
        return (f"timm `resnetv2_50` layout with {_preact_overrides(settings)} (pre-activation bottlenecks, pooled "
                f"map 4x4), trained with AdamW lr {settings.cls_lr:g} (as the `cls` pairs), random flips. "
                + _common(settings, n_test) +
                "Mechanism: logit variance over 32 dropout masks on 256 test images (BN in eval mode, only the "
                "dropouts random), and for the guideline model the closed-form head variance of p = 0.2 before vs "
                "after pooling on its own trained features.")


@dataclass
class GammaPair(_SupervisedPair):
    """Weight decay on BN gammas by category: mean |gamma| per category after training."""

    def optimizer(self, spec):
        return _sgd_with_gamma_groups(spec["mult"])

    def lr(self, settings):
        return _SGD_LR

    def mechanism_row(self, net, variant, probe, device):
        return dict(variant=variant.name, **{f"mean_abs_gamma_{k}": v for k, v in gamma_means(net).items()})

    def description(self, settings, n_test):
        return (f"timm `resnet18d` with {settings.resnet}, SGD lr {_SGD_LR} momentum 0.9, weight decay {_SGD_WD} "
                "on conv/linear weights, none on biases and betas (timm's rule), and on the BN gammas: none / all "
                "/ the categories of `classify_bn_gammas` with the project's default multipliers (branch_last 1, "
                "branch_inner 1, shortcut 0, outside 0 — a decision: the paper's rules were not available). "
                + _common(settings, n_test) + "Mechanism: mean |gamma| per category after training (seed 0).")


@dataclass
class InfoNCEPair(StabilityPair):
    """SimCLR-style pre-training with InfoNCE vs the temperature-free loss; kNN top-1 of the encoder."""

    metric: str = "kNN top-1"
    timing_views: int = 2

    def eval_images(self, settings):
        return settings.stab_test_images + settings.knn_train_images

    def train_and_evaluate(self, variant, settings, data, seed, test_x, test_y, device):
        from kim_plugins.suite.records import param_fingerprint

        model = _Projected(_encoder(settings, seed))
        init = param_fingerprint(model)
        train_time, order, losses = train_contrastive(
            model, data.train_images, temperature=variant.spec["temperature"], iters=settings.stab_iters,
            batch_size=settings.cls_batch, lr=settings.cls_lr, seed=seed, device=device)
        n = settings.knn_train_images
        value = knn_top1(model.encoder, data.train_images[:n], data.train_labels[:n], test_x, test_y, device)
        return (model.encoder, init, train_time, order, value,
                dict(loss_first=round(losses[0], 4), loss_last=round(losses[-1], 4)))

    def description(self, settings, n_test):
        return (f"timm `resnet18d` encoder with {settings.resnet} (global-pooled features) + a 2-layer MLP projector "
                f"to 64 dims, two views per image (random crop from 4-pixel padding, flip, brightness/contrast), "
                f"AdamW lr {settings.cls_lr:g}; NT-Xent over 2 x batch embeddings. " + _common(settings, n_test) +
                f"kNN top-1: cosine 20-nearest-neighbour vote of the encoder features against the first "
                f"{settings.knn_train_images} training images. A tuned tau may beat the temperature-free loss; its "
                "claim is that no tau has to be tuned.")

    def section_lines(self, result):
        lines = report_lines(result)
        return lines + ([""] if lines[-1] else []) + [markdown_table(
            [dict(v=r.variant, s=r.seed, a=r.extra.get("loss_first"), b=r.extra.get("loss_last")) for r in result.runs],
            ["v", "s", "a", "b"], ["variant", "seed", "loss first", "loss last"], floatfmt=str)]


def report_lines(pr) -> List[str]:
    """The mechanism section of one stability pair for report.md: its table of seed-0 measurements."""
    lines = [f"### {pr.pair}: {pr.title}", ""]
    rows = pr.mechanism.get("table") or []
    if rows:
        lines.append(markdown_table(rows, floatfmt="{:.4g}", missing="—"))
    return lines


DROPOUT = register(DropoutPair(
    name="dropout", group="dropout",
    title="Pre-activation ResNet: no dropout vs timm drop_rate (after pooling) vs the guideline placement",
    variants=(Variant("no dropout", True, dict(timm="resnetv2_50")),
              Variant("timm drop_rate 0.2 (after pooling)", False, dict(timm="resnetv2_50", drop_rate=0.2)),
              Variant("guideline: branch 0.1 + head 0.2 before pooling", False,
                      dict(timm="resnetv2_50_dropout", head_closed_form_p=0.2)))))
GAMMA = register(GammaPair(
    name="gamma", group="gamma",
    title="ResNet-18-D, SGD: weight decay on no BN gamma / every gamma / the guideline's categories",
    variants=(Variant("no gamma decay", True, dict(mult=_GAMMA_OFF)),
              Variant("decay on every gamma", False, dict(mult=_GAMMA_ALL)),
              Variant("guideline categories (decision)", False, dict(mult=None)))))
INFONCE = register(InfoNCEPair(
    name="infonce", group="infonce", title="SimCLR-style ResNet-18-D: InfoNCE tau 0.5 / tau 0.07 vs temperature-free",
    variants=(Variant("InfoNCE tau 0.5", True, dict(temperature=0.5)),
              Variant("InfoNCE tau 0.07", False, dict(temperature=0.07)),
              Variant("temperature-free", False, dict(temperature=None)))))

from kim_plugins.suite.depth_pair import DEPTH  # noqa: E402  (a stability pair of its own module)

#: The stability pairs, by name (``depth`` is :mod:`kim_plugins.suite.depth_pair`).
STABILITY_PAIRS: Dict[str, Pair] = {p.name: p for p in (DROPOUT, GAMMA, INFONCE, DEPTH)}
