"""The classification pairs of the suite on Fashion-MNIST: GAB/PLN ViTs, GAB Swins and SAP ResNets.

Plain torch training loops over timm models: images padded from 28 to 32
pixels, grey replicated to RGB, normalised with the model's
``pretrained_cfg`` mean/std (as :mod:`kim_plugins.robustness` does); AdamW through
``timm.optim.create_optimizer_v2`` (which honours ``no_weight_decay()``, so the
GAB parameters are not decayed), cosine schedule with warm-up from
``timm.scheduler``. Inside a pair every variant is created after
``torch.manual_seed(seed)`` and reads the same batches in the same order with
the same flips (an index generator of its own), so the only difference is the
plugin; the runs record digests of both to show it.

Mechanisms measured here:

- ViT: PLN's contrast-robustness curve (:mod:`kim_plugins.robustness`'s
  ``contrast_change``/``evaluate``); the PLN invariance model(a*x) = model(x)
  checked on the trained models by scaling the normalised images; the learnt
  GAB sigma and amplitude per block.
- Swin: the learnt GAB sigma and amplitude per block (window attention).
- SAP: the pooled map size; eval output bit-identical to the plain ResNet with
  the same weights; train-mode output (only the SAP pools stochastic) differs
  from eval (asserted); mean and variance of the pooled features in train vs
  eval mode, beside inverted dropout at the same place.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from kim_plugins import robustness
from kim_plugins.markdown import markdown_table
from kim_plugins.suite.pairs import Cost, Pair, Variant, register
from kim_plugins.suite.records import PairResult
from kim_plugins.suite.report import pyplot

__all__ = ["ClassifierPair", "ViTPair", "SwinPair", "SAPPair", "make_classifier", "train_classifier", "evaluate_top1"]

def make_classifier(timm_name: str, overrides: Dict[str, Any], seed: int) -> nn.Module:
    """``timm.create_model(timm_name, num_classes=10, **overrides)`` after ``torch.manual_seed(seed)``."""
    import timm

    import kim_plugins  # noqa: F401  registers the plugin names

    torch.manual_seed(seed)
    return timm.create_model(timm_name, pretrained=False, num_classes=10, **overrides)


def to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float (N, 3, 32, 32) in [0, 1], zero-padded by 2 pixels."""
    x = torch.tensor(images, dtype=torch.float32).div_(255.0)
    return F.pad(x, (2, 2, 2, 2)).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def train_classifier(model: nn.Module, images: np.ndarray, labels: np.ndarray, *, iters: int, batch_size: int,
                     lr: float, seed: int, device: str, desc: str,
                     make_optimizer: Optional[Callable[[nn.Module], torch.optim.Optimizer]] = None,
                     augment: Optional[Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]] = None
                     ) -> Tuple[float, str]:
    """Train ``model`` for ``iters`` steps (AdamW unless ``make_optimizer``); returns (wall seconds, digest of
    the batch order and flips).

    ``augment(x, y) -> (x, y)`` acts on each normalised batch before the loss
    (``y`` may become soft targets ``(B, 10)``, e.g. timm's ``Mixup``); its own
    randomness does not touch the batch order.
    """
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler
    from tqdm import tqdm

    model.to(device).train()
    normalize = robustness.normalizer(model)
    opt = make_optimizer(model) if make_optimizer else create_optimizer_v2(model, "adamw", lr=lr, weight_decay=0.05)
    warmup = max(1, iters // 10)
    sched = CosineLRScheduler(opt, t_initial=iters, warmup_t=warmup, warmup_lr_init=lr * 0.01, lr_min=lr * 0.01,
                              t_in_epochs=False)
    gen = torch.Generator().manual_seed(seed)
    n = len(images)
    order = torch.randperm(n, generator=gen)
    pos = 0
    digest = hashlib.sha1()
    y_all = torch.from_numpy(labels)
    t0 = time.perf_counter()
    bar = tqdm(total=iters, desc=desc, unit="it", dynamic_ncols=True)
    for it in range(iters):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        flip = torch.rand(len(idx), generator=gen) < 0.5
        digest.update(idx.numpy().tobytes() + flip.numpy().tobytes())
        x = to_input(images[idx.numpy()])
        x = normalize(torch.where(flip[:, None, None, None], x.flip(-1), x).to(device))
        y = y_all[idx].to(device)
        if augment is not None:
            x, y = augment(x, y)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step_update(it + 1)
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0, digest.hexdigest()


@torch.no_grad()
def evaluate_top1(model: nn.Module, images: np.ndarray, labels: np.ndarray, device: str,
                  batch_size: int = 500) -> float:
    """Top-1 accuracy (%) in eval mode."""
    model.eval()
    normalize = robustness.normalizer(model)
    correct = 0
    for i in range(0, len(images), batch_size):
        x = to_input(images[i:i + batch_size]).to(device)
        correct += int((model(normalize(x)).argmax(-1).cpu() == torch.from_numpy(labels[i:i + batch_size])).sum())
    return 100.0 * correct / len(images)


# ---------------------------------------------------------------------------------------------------------
# mechanisms
# ---------------------------------------------------------------------------------------------------------

@torch.no_grad()
def pln_scale_invariance(model: nn.Module, images: torch.Tensor,
                         alphas: Sequence[float] = (0.25, 0.5, 2.0, 4.0)) -> float:
    """Max |logit change| of ``model(alpha * x)`` against ``model(x)`` for normalised images x, eval mode.

    The PreLayerNorm paper's property at its level (the image's colour scale):
    a bias-free projection followed by LN gives LN(alpha*W x) = LN(W x), so
    the change is ~0 for the PLN models; a plain ViT changes.
    """
    model.eval()
    x = robustness.normalizer(model)(images)
    ref = model(x)
    return max(float((model(a * x) - ref).abs().max()) for a in alphas)


def gab_parameters(model: nn.Module) -> List[Dict[str, float]]:
    """The learnt sigma (patch units) and amplitude of every Gaussian attention bias, in block order."""
    from kim_plugins.layers.gaussian_attention_bias import GaussianAttentionBias

    out = []
    for name, m in model.named_modules():
        if isinstance(m, GaussianAttentionBias):
            out.append(dict(module=name, sigma=[round(float(s), 4) for s in m.sigma.detach().flatten()],
                            amplitude=[round(float(a), 4) for a in m.gab_amplitude.detach().flatten()]))
    return out


def _set_sap_train(model: nn.Module, mode: bool) -> List[str]:
    """Eval everywhere except the stochastic pools (train mode ``mode``); returns their names."""
    from kim_plugins.layers.stochastic_pool import STOCHASTIC_POOL_TYPES

    model.eval()
    names = []
    for name, m in model.named_modules():
        if isinstance(m, STOCHASTIC_POOL_TYPES):
            m.train(mode)
            names.append(name)
    return names


@torch.no_grad()
def sap_consistency(sap_model: nn.Module, plain_name: str, overrides: Dict[str, Any], images: torch.Tensor,
                    draws: int = 32, drop_p: float = 0.5) -> Dict[str, Any]:
    """SAP's train/eval behaviour on a trained SAP ResNet (see the module docstring).

    Raises:
        AssertionError: the SAP model's train-mode output equals its eval output (SAP inactive, e.g. a
            1x1 pooled map) or its eval output differs from the plain ResNet's with the same weights.
    """
    device = next(sap_model.parameters()).device
    normalize = robustness.normalizer(sap_model)
    x = normalize(images.to(device))
    sap_model.eval()
    feats = sap_model.forward_features(x)
    eval_out = sap_model(x)
    plain = make_classifier(plain_name, overrides, 0).to(device)
    missing = plain.load_state_dict(sap_model.state_dict(), strict=True)
    plain.eval()
    plain_out = plain(x)
    identical = bool(torch.equal(plain_out, eval_out))
    pools = _set_sap_train(sap_model, True)
    torch.manual_seed(1234)
    train_out = sap_model(x)
    sap_model.eval()
    diff = (train_out - eval_out).abs()
    if not identical:
        raise AssertionError(f"SAP eval output differs from the plain {plain_name} with the same weights "
                             f"(max |diff| {float((plain_out - eval_out).abs().max()):.3g})")
    if bool(torch.equal(train_out, eval_out)):
        raise AssertionError(f"SAP train-mode output equals its eval output: the stochastic pools {pools} did "
                             f"nothing (pooled map {tuple(feats.shape[-2:])}; needs >= 2x2, the suite uses >= 4x4)")
    # pooled features: SAP global pool in train mode vs eval; inverted dropout at the same place for contrast
    pool = sap_model.global_pool
    pooled_eval = pool.eval()(feats)
    pool.train()
    pooled_train = torch.stack([pool(feats) for _ in range(draws)])
    pool.eval()
    dropped = torch.stack([F.dropout(pooled_eval, drop_p, training=True) for _ in range(draws)])

    def var_ratio(samples: torch.Tensor) -> float:  # per-feature variance over images, train / eval, median
        v_train = samples.var(dim=1, unbiased=False).mean(dim=0)
        v_eval = pooled_eval.var(dim=0, unbiased=False)
        keep = v_eval > 1e-12
        return float((v_train[keep] / v_eval[keep]).median())

    def mean_err(samples: torch.Tensor) -> float:
        return float((samples.mean(dim=0) - pooled_eval).abs().mean() / pooled_eval.abs().mean())

    del missing
    return dict(pooled_map=list(feats.shape[-2:]), stochastic_pools=pools, eval_bit_identical_to_plain=identical,
                train_differs_from_eval=True, max_abs_logit_diff_train_vs_eval=float(diff.max()),
                frac_logits_changed=float((diff > 0).double().mean()),
                keep_prob=float(getattr(sap_model, "sap_keep_prob", float("nan"))), draws=draws,
                sap_mean_rel_err=mean_err(pooled_train), sap_var_ratio=var_ratio(pooled_train),
                dropout_p=drop_p, dropout_mean_rel_err=mean_err(dropped), dropout_var_ratio=var_ratio(dropped))


# ---------------------------------------------------------------------------------------------------------
# the pairs
# ---------------------------------------------------------------------------------------------------------

_CLS_OVERHEAD_S = 0.5


def _timm_variant(name: str, timm_name: str, baseline: bool = False) -> Variant:
    return Variant(name, baseline, dict(timm=timm_name))


@dataclass
class ClassifierPair(Pair):
    """A timm classifier pair on 32x32 Fashion-MNIST: the same overrides, seeds and batches for every variant.

    Attributes:
        overrides: The :class:`~kim_plugins.suite.settings.SuiteSettings` field with the ``timm.create_model``
            overrides of its models (``'vit'``, ``'swin'``, ``'resnet'``).
    """

    overrides: str = "resnet"
    metric: str = "top-1"
    iters_field: str = "cls_iters"

    def model_overrides(self, settings) -> Dict[str, Any]:
        return getattr(settings, self.overrides)

    def timing_setup(self, settings):
        model = make_classifier(self.baseline.spec["timm"], self.model_overrides(settings), 0)
        x = torch.randn(settings.cls_batch, 3, 32, 32)
        y = torch.randint(0, 10, (settings.cls_batch,))
        return model, lambda m: F.cross_entropy(m(x), y), lambda m: m(x), len(x)

    def estimate_cost(self, settings, cost, seen):
        runs = settings.seeds * len(self.variants)
        fixed = runs * (_CLS_OVERHEAD_S + settings.cls_test_images * cost["image_s"]) + self.probe_cost(settings, cost)
        return Cost(fixed, runs * 1.1 * settings.cls_iters * cost["step_s"])

    def probe_cost(self, settings, cost: Dict[str, float]) -> float:
        """Seconds of the mechanism measurements."""
        return 0.0

    # hooks of :meth:`run`
    def begin(self, result, settings, data) -> None:
        """Before the first run."""

    def measure(self, model: nn.Module, variant: Variant, result, settings, data, device: str,
                probe_images: torch.Tensor) -> Dict[str, Any]:
        """The mechanism on a trained seed-0 model; returns extra numbers for its run record."""
        return {}

    def finish(self, result, settings) -> None:
        """After the last run."""

    def describe(self, settings) -> str:
        """What the models are (the description's first sentences)."""
        return ""

    def run(self, settings, data, out_dir, device, cache):
        from kim_plugins.suite.records import PairResult, RunRecord, count_params, forward_gflops, param_fingerprint

        overrides = self.model_overrides(settings)
        test_x = data.test_images[:settings.cls_test_images]
        test_y = data.test_labels[:settings.cls_test_images]
        result = PairResult(pair=self.name, title=self.title, description="", metric=self.metric)
        self.begin(result, settings, data)
        probe_images = to_input(data.test_images[:256])
        for seed in range(settings.seeds):
            for v in self.variants:
                model = make_classifier(v.spec["timm"], overrides, seed)
                init = param_fingerprint(model)
                train_time, order = train_classifier(model, data.train_images, data.train_labels,
                                                     iters=settings.cls_iters, batch_size=settings.cls_batch,
                                                     lr=settings.cls_lr, seed=seed, device=device,
                                                     desc=f"[{self.name}] {v.name} seed {seed}")
                top1 = evaluate_top1(model, test_x, test_y, device)
                model.eval()
                gflops = forward_gflops(model, torch.zeros(1, 3, 32, 32, device=device))
                extra = self.measure(model, v, result, settings, data, device, probe_images) if seed == 0 else {}
                result.runs.append(RunRecord(pair=self.name, variant=v.name, baseline=v.baseline, seed=seed,
                                             metric=self.metric, value=top1, train_time_s=train_time,
                                             iters=settings.cls_iters, params=count_params(model), gflops=gflops,
                                             data_order=order, init_params=init, extra=extra))
                del model
        self.finish(result, settings)
        result.description = self.describe(settings) + (
            f"Fashion-MNIST 28x28 zero-padded to 32x32, grey to RGB, random horizontal flip; {settings.cls_iters} "
            f"iterations x batch {settings.cls_batch} ({settings.cls_iters * settings.cls_batch / 60000:.2f} epochs "
            f"of the 60k training images), AdamW lr {settings.cls_lr:g} wd 0.05 (timm `create_optimizer_v2`: no "
            f"decay on norms, biases and `no_weight_decay()`), cosine schedule with warm-up; top-1 on the first "
            f"{len(test_y)} test images.")
        return result


def _record_gab(model: nn.Module, variant: Variant, result) -> None:
    gab = gab_parameters(model)
    if gab:
        result.mechanism.setdefault("gab", {})[variant.name] = gab


@dataclass
class ViTPair(ClassifierPair):
    """ViT vs GAB / PLN: contrast robustness, PLN's scale invariance, the learnt GAB parameters."""

    overrides: str = "vit"
    plots: Tuple[str, ...] = ("robustness.png",)

    def probe_cost(self, settings, cost):
        return len(self.variants) * 11 * settings.robustness_images * cost["image_s"]

    def begin(self, result, settings, data):
        result.mechanism["robustness"] = dict(
            rows=robustness.severity_table(robustness.REDUCE_DEFAULT, robustness.ENHANCE_DEFAULT), accuracy={},
            images=settings.robustness_images)

    def measure(self, model, variant, result, settings, data, device, probe_images):
        rob = result.mechanism["robustness"]
        n = settings.robustness_images
        xs, ys = to_input(data.test_images[:n]), torch.from_numpy(data.test_labels[:n])

        def batches(xs=xs, ys=ys):
            for i in range(0, len(ys), 500):
                yield xs[i:i + 500], ys[i:i + 500]

        rob["accuracy"][variant.name] = robustness.evaluate(model, batches, [c for _, _, c in rob["rows"]], len(ys),
                                                            progress=False)
        _record_gab(model, variant, result)
        return dict(pln_scale_max_abs_logit_change=pln_scale_invariance(model, probe_images[:64].to(device)))

    def describe(self, settings):
        v = settings.vit
        return (f"timm `vit_tiny_patch16_224` and the plugin names `vit_tiny_patch16_gab_224`, "
                f"`vit_tiny_patch16_pln_224`, `vit_small_patch16_gab_pln_224`, all created with the same overrides "
                f"{v} (patch {v['patch_size']} on {v['img_size']}x{v['img_size']}: an "
                f"{v['img_size'] // v['patch_size']}x{v['img_size'] // v['patch_size']} token grid + class token). ")

    def section_lines(self, result):
        return vit_section(result)

    def plot(self, name, results, path):
        from kim_plugins.robustness import plot as plot_robustness

        pr = results[0]
        rob = pr.mechanism["robustness"]
        plot_robustness(rob["accuracy"], rob["rows"],
                        f"Fashion-MNIST test ({rob['images']} images), models trained {pr.runs[0].iters} iterations "
                        f"here (seed 0)", path)


@dataclass
class SwinPair(ClassifierPair):
    """Swin vs its GAB version: the learnt sigma and amplitude of every block."""

    overrides: str = "swin"

    def measure(self, model, variant, result, settings, data, device, probe_images):
        _record_gab(model, variant, result)
        return {}

    def describe(self, settings):
        s = settings.swin
        return (f"timm `swin_tiny_patch4_window7_224` vs `swin_tiny_patch4_window7_gab_224` (σ0 = 5, a0 = 2, one "
                f"(σ, a) per block on top of Swin's relative position bias), both with the overrides {s}: a "
                f"{s['img_size'] // s['patch_size']}x{s['img_size'] // s['patch_size']} grid in stage 1, windows of "
                f"{s['window_size']}x{s['window_size']} tokens, every second block shifted. ")

    def section_lines(self, result):
        return swin_section(result)


@dataclass
class SAPPair(ClassifierPair):
    """ResNet-18-D vs its SAP version: SAP's train/eval consistency."""

    plots: Tuple[str, ...] = ("sap_consistency.png",)

    def measure(self, model, variant, result, settings, data, device, probe_images):
        if not variant.baseline:
            result.mechanism["sap"] = sap_consistency(model, self.baseline.spec["timm"],
                                                      self.model_overrides(settings), probe_images)
        return {}

    def describe(self, settings):
        return (f"timm `resnet18d` vs `resnet18d_sap` (keep probability 0.5: global pooling and the `avg_down` "
                f"shortcut pooling stochastic in training), both with {settings.resnet}: at 32x32 input the last "
                f"feature map, which the global pool averages, is 4x4 (a stock ResNet ends in 1x1 there, where "
                f"global SAP does nothing). ")

    def section_lines(self, result):
        return sap_section(result)

    def plot(self, name, results, path):
        m = results[0].mechanism.get("sap")
        if not m:
            return False
        plot_sap(m, path)


VIT = register(ViTPair(
    name="vit", group="vit", title="ViT patch 4 on 32x32: Gaussian attention bias and PreLayerNorm",
    variants=(_timm_variant("ViT", "vit_tiny_patch16_224", True),
              _timm_variant("ViT + GAB", "vit_tiny_patch16_gab_224"),
              _timm_variant("ViT + PLN", "vit_tiny_patch16_pln_224"),
              _timm_variant("ViT + GAB + PLN", "vit_small_patch16_gab_pln_224"))))
SWIN = register(SwinPair(
    name="swin", group="swin",
    title="Swin (patch 2, window 4) on 32x32: Gaussian attention bias on the paper's segmentation host",
    variants=(_timm_variant("Swin", "swin_tiny_patch4_window7_224", True),
              _timm_variant("Swin + GAB", "swin_tiny_patch4_window7_gab_224"))))
SAP = register(SAPPair(
    name="sap", group="sap", title="ResNet-18-D vs its stochastic-average-pooling version",
    variants=(_timm_variant("ResNet-18-D", "resnet18d", True), _timm_variant("ResNet-18-D + SAP", "resnet18d_sap"))))


# ---------------------------------------------------------------------------------------------------------
# report section and plots
# ---------------------------------------------------------------------------------------------------------

def vit_section(pr: PairResult) -> List[str]:
    rob = pr.mechanism.get("robustness", {})
    acc = rob.get("accuracy", {})
    rows_def = rob.get("rows", [])
    lines = ["### PreLayerNorm: accuracy under contrast change",
             "",
             f"Top-1 (%) of the seed-0 models on the first {rob.get('images')} Fashion-MNIST test images under "
             "ImageNet-C contrast change `clip((x - mean) * c + mean, 0, 1)` (reduction c < 1, enhancement c > 1; "
             "`tools/robustness.py`). A contrast change scales the patch embedding but not the positional "
             "embedding; PLN normalises the projected patch tokens before the positional embedding is added.",
             ""]
    names = list(acc)
    table_rows = []
    for kind, sev, c in rows_def:
        row = dict(kind=kind, sev=str(sev), c=f"{c:g}")
        for i, n in enumerate(names):
            row[f"m{i}"] = f"{acc[n][c]:.2f}"
        table_rows.append(row)
    lines.append(markdown_table(table_rows, ["kind", "sev", "c"] + [f"m{i}" for i in range(len(names))],
                        ["contrast", "severity", "factor c"] + names))
    inv = [(r.variant, r.extra.get("pln_scale_max_abs_logit_change")) for r in pr.runs
           if r.seed == 0 and "pln_scale_max_abs_logit_change" in r.extra]
    if inv:
        lines += ["", "Invariance to the image's scale, model(α·x) = model(x): largest |logit change| of the "
                      "trained model when its normalised input images are multiplied by α ∈ {0.25, 0.5, 2, 4} "
                      "(PLN's projection is bias-free, so LN(α·xE) = LN(xE)):", "",
                  markdown_table([dict(v=v, d=f"{d:.3g}") for v, d in inv], ["v", "d"], ["variant", "max |Δ logit|"])]
    lines += _gab_table(pr)
    lines += ["", "![contrast robustness](robustness.png)"]
    return lines


def _gab_table(pr: PairResult) -> List[str]:
    """The learnt σ and a of every GAB block (seed 0), if the pair has GAB variants."""
    gab = pr.mechanism.get("gab", {})
    if not gab:
        return []
    grows = [dict(v=v, sig=", ".join(f"{s:.2f}" for g in blocks for s in g["sigma"]),
                  amp=", ".join(f"{a:.2f}" for g in blocks for a in g["amplitude"]))
             for v, blocks in gab.items()]
    return ["", "Learnt Gaussian attention bias (σ in patches, initialised 5; amplitude a, initialised 2: "
                "supplement §C), seed 0, block by block:", "",
            markdown_table(grows, ["v", "sig", "amp"], ["variant", "σ per block", "a per block"])]


def swin_section(pr: PairResult) -> List[str]:
    lines = ["### Gaussian attention bias on Swin",
             "",
             "Every window attention of the GAB Swin adds a² · exp(-(dh² + dw²) / (2σ²)) of the in-window "
             "offsets to Swin's relative position bias (the paper's ADE20K / COCO host)."]
    return lines + _gab_table(pr)


def sap_section(pr: PairResult) -> List[str]:
    m = pr.mechanism.get("sap", {})
    if not m:
        return []
    lines = ["### Stochastic average pooling: train/eval consistency",
             "",
             f"On the trained seed-0 SAP model ({len(m['stochastic_pools'])} stochastic pools, keep probability "
             f"{m['keep_prob']:g}), 256 test images:",
             "",
             markdown_table([
                 dict(k="pooled map before the global pool", v=f"{m['pooled_map'][0]}x{m['pooled_map'][1]}"),
                 dict(k="eval output bit-identical to the plain ResNet-18-D with the same weights",
                      v="yes" if m["eval_bit_identical_to_plain"] else "**NO**"),
                 dict(k="train-mode output (only the SAP pools stochastic) differs from eval (asserted)",
                      v=f"yes: max |Δ logit| {m['max_abs_logit_diff_train_vs_eval']:.3g}, "
                        f"{100 * m['frac_logits_changed']:.1f} % of logits changed"),
                 dict(k=f"global pool, train mode: |E[train] - eval| / |eval| over {m['draws']} draws",
                      v=f"SAP {m['sap_mean_rel_err']:.3f} vs inverted dropout (p={m['dropout_p']:g}) "
                        f"{m['dropout_mean_rel_err']:.3f}"),
                 dict(k="global pool: variance over images, train / eval (median over features; 1 = no shift)",
                      v=f"SAP {m['sap_var_ratio']:.3f} vs inverted dropout {m['dropout_var_ratio']:.3f}"),
             ], ["k", "v"], ["check", "result"]),
             "",
             "Both estimators are unbiased in the mean; SAP averages a random half of each window, so its "
             "train-mode features keep nearly the eval-mode variance, while dropout's rescaled zeros inflate "
             "it — the train/test variance shift SAP is designed to avoid.",
             "",
             "![SAP consistency](sap_consistency.png)"]
    return lines


def plot_sap(m: Dict[str, Any], path: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(7, 3))
    axes[0].bar(["SAP", f"dropout p={m['dropout_p']:g}"], [m["sap_var_ratio"], m["dropout_var_ratio"]],
                color=["#3b75af", "#c44e52"])
    axes[0].axhline(1.0, color="k", lw=0.8)
    axes[0].set_title("feature variance train / eval (1 = no shift)", fontsize=8)
    axes[1].bar(["SAP", f"dropout p={m['dropout_p']:g}"], [m["sap_mean_rel_err"], m["dropout_mean_rel_err"]],
                color=["#3b75af", "#c44e52"])
    axes[1].set_title(f"|E[train] - eval| / |eval| ({m['draws']} draws)", fontsize=8)
    fig.suptitle("Global pooling of the trained SAP ResNet: train vs eval mode", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
