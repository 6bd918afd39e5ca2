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
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from kim_plugins import robustness

__all__ = ["CLS_PAIRS", "make_classifier", "train_classifier", "evaluate_top1", "run_cls_pair"]

#: pair id -> title, variants [(display name, timm name, is baseline)], metric name
CLS_PAIRS: Dict[str, Dict[str, Any]] = {
    "vit": dict(title="ViT patch 4 on 32x32: Gaussian attention bias and PreLayerNorm",
                variants=[("ViT", "vit_tiny_patch16_224", True),
                          ("ViT + GAB", "vit_tiny_patch16_gab_224", False),
                          ("ViT + PLN", "vit_tiny_patch16_pln_224", False),
                          ("ViT + GAB + PLN", "vit_small_patch16_gab_pln_224", False)]),
    "swin": dict(title="Swin (patch 2, window 4) on 32x32: Gaussian attention bias on the paper's segmentation host",
                 variants=[("Swin", "swin_tiny_patch4_window7_224", True),
                           ("Swin + GAB", "swin_tiny_patch4_window7_gab_224", False)]),
    "sap": dict(title="ResNet-18-D vs its stochastic-average-pooling version",
                variants=[("ResNet-18-D", "resnet18d", True), ("ResNet-18-D + SAP", "resnet18d_sap", False)]),
}


def model_overrides(pair: str, settings) -> Dict[str, Any]:
    """The ``timm.create_model`` overrides of a classification pair's models."""
    return {"vit": settings.vit, "swin": settings.swin}.get(pair, settings.resnet)


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


def synthetic_step(pair: str, settings) -> Tuple[Callable, Callable, int]:
    """A training step and an eval forward of one batch of the pair's baseline on random data.

    For the budget estimate. Returns ``(step, forward, batch size)``.
    """
    _, name, _ = CLS_PAIRS[pair]["variants"][0]
    return synthetic_classifier_step(name, model_overrides(pair, settings), settings.cls_batch)


def synthetic_classifier_step(timm_name: str, overrides: Dict[str, Any], batch: int) -> Tuple[Callable, Callable, int]:
    """``(step, forward, batch)`` of a 32x32 classifier on random data (one AdamW step; one eval forward)."""
    model = make_classifier(timm_name, overrides, 0)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    return (*timing_closures(model, lambda m: F.cross_entropy(m(x), y), lambda m: m(x)), len(x))


def timing_closures(model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor],
                    forward_fn: Callable[[nn.Module], Any]) -> Tuple[Callable[[], None], Callable[[], None]]:
    """``(step, forward)``: one AdamW training step on ``loss_fn(model)``, one eval ``forward_fn(model)``."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        model.train()
        loss = loss_fn(model)
        opt.zero_grad()
        loss.backward()
        opt.step()

    @torch.no_grad()
    def forward() -> None:
        model.eval()
        forward_fn(model)

    return step, forward


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


def _set_sap_train(model: nn.Module, mode: bool, only_global: bool = False) -> List[str]:
    """Eval everywhere except the stochastic pools (train mode ``mode``); returns their names."""
    from kim_plugins.layers.stochastic_pool import STOCHASTIC_POOL_TYPES

    model.eval()
    names = []
    for name, m in model.named_modules():
        if isinstance(m, STOCHASTIC_POOL_TYPES) and (not only_global or name.startswith("global_pool")):
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

def run_cls_pair(pair: str, settings, data, out_dir: str, device: str):
    """Train every variant of a classification pair for every seed; measure its mechanism."""
    from kim_plugins.suite.records import PairResult, RunRecord, count_params, forward_gflops, param_fingerprint

    spec = CLS_PAIRS[pair]
    overrides = model_overrides(pair, settings)
    test_x = data.test_images[:settings.cls_test_images]
    test_y = data.test_labels[:settings.cls_test_images]
    result = PairResult(pair=pair, title=spec["title"], description="", metric="top-1")
    robust: Dict[str, Dict[float, float]] = {}
    rows = None
    if pair == "vit":
        rows = robustness.severity_table(robustness.REDUCE_DEFAULT, robustness.ENHANCE_DEFAULT)
    probe_images = to_input(data.test_images[:256])
    for seed in range(settings.seeds):
        for name, timm_name, baseline in spec["variants"]:
            model = make_classifier(timm_name, overrides, seed)
            init = param_fingerprint(model)
            train_time, order = train_classifier(model, data.train_images, data.train_labels,
                                                 iters=settings.cls_iters, batch_size=settings.cls_batch,
                                                 lr=settings.cls_lr, seed=seed, device=device,
                                                 desc=f"[{pair}] {name} seed {seed}")
            top1 = evaluate_top1(model, test_x, test_y, device)
            model.eval()
            gflops = forward_gflops(model, torch.zeros(1, 3, 32, 32, device=device))
            extra: Dict[str, Any] = {}
            if seed == 0 and pair == "vit":
                n = settings.robustness_images
                xs, ys = to_input(data.test_images[:n]), torch.from_numpy(data.test_labels[:n])
                factors = [c for _, _, c in rows]

                def batches(xs=xs, ys=ys):
                    for i in range(0, len(ys), 500):
                        yield xs[i:i + 500], ys[i:i + 500]

                robust[name] = robustness.evaluate(model, batches, factors, len(ys), progress=False)
                extra["pln_scale_max_abs_logit_change"] = pln_scale_invariance(model, probe_images[:64].to(device))
                gab = gab_parameters(model)
                if gab:
                    result.mechanism.setdefault("gab", {})[name] = gab
            if seed == 0 and pair == "swin":
                gab = gab_parameters(model)
                if gab:
                    result.mechanism.setdefault("gab", {})[name] = gab
            if seed == 0 and pair == "sap" and not baseline:
                result.mechanism["sap"] = sap_consistency(model, spec["variants"][0][1], overrides, probe_images)
            result.runs.append(RunRecord(pair=pair, variant=name, baseline=baseline, seed=seed, metric="top-1",
                                         value=top1, train_time_s=train_time, iters=settings.cls_iters,
                                         params=count_params(model), gflops=gflops, data_order=order,
                                         init_params=init, extra=extra))
            del model
    if pair == "vit":
        result.mechanism["robustness"] = dict(rows=rows, accuracy=robust, images=settings.robustness_images)
        v = settings.vit
        result.description = (
            f"timm `vit_tiny_patch16_224` and the plugin names `vit_tiny_patch16_gab_224`, `vit_tiny_patch16_pln_224`, "
            f"`vit_small_patch16_gab_pln_224`, all created with the same overrides {v} (patch {v['patch_size']} on "
            f"{v['img_size']}x{v['img_size']}: an {v['img_size'] // v['patch_size']}x{v['img_size'] // v['patch_size']}"
            f" token grid + class token). ")
    elif pair == "swin":
        s = settings.swin
        result.description = (
            f"timm `swin_tiny_patch4_window7_224` vs `swin_tiny_patch4_window7_gab_224` (σ0 = 5, a0 = 2, one (σ, a) "
            f"per block on top of Swin's relative position bias), both with the overrides {s}: a "
            f"{s['img_size'] // s['patch_size']}x{s['img_size'] // s['patch_size']} grid in stage 1, windows of "
            f"{s['window_size']}x{s['window_size']} tokens, every second block shifted. ")
    else:
        r = settings.resnet
        result.description = (
            f"timm `resnet18d` vs `resnet18d_sap` (keep probability 0.5: global pooling and the `avg_down` shortcut "
            f"pooling stochastic in training), both with {r}: at 32x32 input the last feature map, which the global "
            f"pool averages, is 4x4 (a stock ResNet ends in 1x1 there, where global SAP does nothing). ")
    result.description += (
        f"Fashion-MNIST 28x28 zero-padded to 32x32, grey to RGB, random horizontal flip; {settings.cls_iters} "
        f"iterations x batch {settings.cls_batch} ({settings.cls_iters * settings.cls_batch / 60000:.2f} epochs of "
        f"the 60k training images), AdamW lr {settings.cls_lr:g} wd 0.05 (timm `create_optimizer_v2`: no decay on "
        f"norms, biases and `no_weight_decay()`), cosine schedule with warm-up; top-1 on the first "
        f"{len(test_y)} test images.")
    return result
