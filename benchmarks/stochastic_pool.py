#!/usr/bin/env python
"""Cost of stochastic average pooling: SAP backbones vs their plain counterparts, same run.

Writes ``benchmarks/results/stochastic_pool.{md,json}``. For each pair
(timm ``resnet18/50(d)`` vs ``resnet18/50(d)_sap``; mmseg ``ResNetV1d`` vs
``ResNetV1dSAP`` in the D8 layout; the full PSPNet / DeepLabV3 R-50-D8 with and
without SAP when mmseg is installed), both models hold the same weights and:

- train step = forward + cross-entropy / mean loss + backward + SGD step,
- eval = ``no_grad`` forward in eval mode (SAP is then the plain op),

are timed with :func:`kim_plugins.benchmarking.compare_timings`: pinned
threads, interleaved shuffled rounds, medians of per-round ratios against the
plain model, and the plain model run twice per round as an A/A control (its
ratio shows the noise floor). Memory is the activation memory a training
forward keeps for backward (:func:`saved_activation_bytes`, exact). Eval
outputs are checked to be bit-identical.

Usage::

    python benchmarks/stochastic_pool.py                 # CPU, 1 thread, all pairs
    python benchmarks/stochastic_pool.py --rounds 40 --only resnet50d_sap
    python benchmarks/stochastic_pool.py --device cuda --batch 32 --size 224
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Any, Callable, Dict, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import timm  # noqa: E402

import kim_plugins  # noqa: E402,F401
from kim_plugins.benchmarking import compare_timings, saved_activation_bytes  # noqa: E402
from kim_plugins.markdown import markdown_table  # noqa: E402
from kim_plugins.layers.stochastic_pool import STOCHASTIC_POOL_TYPES  # noqa: E402

TIMM_PAIRS = [("resnet18", "resnet18_sap"), ("resnet50", "resnet50_sap"),
              ("resnet18d", "resnet18d_sap"), ("resnet50d", "resnet50d_sap")]


def _timm_pair(plain_name: str, sap_name: str, device: torch.device) -> Tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    sap = timm.create_model(sap_name, num_classes=10)
    plain = timm.create_model(plain_name, num_classes=10)
    plain.load_state_dict(sap.state_dict())
    return plain.to(device), sap.to(device)


class _Backbone(nn.Module):
    """mmseg backbone with a mean over its last output, so one loss drives backward."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)[-1]


class _Segmentor(nn.Module):
    """mmseg EncoderDecoder logits (``_forward``) plus the auxiliary head's."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.model.extract_feat(x)
        out = self.model.decode_head.forward(feats)
        aux = self.model.auxiliary_head.forward(feats)
        return out.mean() + 0.4 * aux.mean() if self.training else out


def _mmseg_pairs(device: torch.device, archs: Tuple[str, ...] = ("pspnet", "deeplabv3"),
                 backbone: bool = True) -> List[Tuple[str, nn.Module, nn.Module]]:
    """(name, plain, SAP) mmseg pairs: the R-50-D8 backbone alone (``backbone``) and the segmentors ``archs``."""
    try:
        import kim_plugins.mmseg  # noqa: F401
        from mmengine.config import Config
        from mmseg.registry import MODELS
    except ImportError as e:  # pragma: no cover - depends on the installation
        print(f"mmseg pairs skipped: {e}")
        return []
    from kim_plugins.config.rewrite import sync_bn_to_bn

    pairs = []
    d8 = dict(depth=50, dilations=(1, 1, 2, 4), strides=(1, 2, 1, 1), contract_dilation=True)
    if backbone:
        torch.manual_seed(0)
        sap = MODELS.build(dict(type="ResNetV1dSAP", **d8))
        plain = MODELS.build(dict(type="ResNetV1d", **d8))
        plain.load_state_dict(sap.state_dict())
        pairs.append(("mmseg ResNetV1dSAP-50-D8", _Backbone(plain).to(device), _Backbone(sap).to(device)))
    cfg_dir = os.path.join(os.path.dirname(HERE), "configs", "stochastic_pooling")
    for arch in archs:
        cfgs = []
        for name in (f"{arch}_r50d-d8_4xb2-80k_cityscapes-512x1024.py",
                     f"{arch}-sap_r50d-d8_4xb2-80k_cityscapes-512x1024.py"):
            cfg = Config.fromfile(os.path.join(cfg_dir, name)).model
            cfg.pretrained = None
            cfg.data_preprocessor = None
            sync_bn_to_bn(cfg)
            cfgs.append(cfg)
        torch.manual_seed(0)
        sap = MODELS.build(cfgs[1])
        plain = MODELS.build(cfgs[0])
        plain.load_state_dict(sap.state_dict())
        pairs.append((f"mmseg {arch}-sap R-50-D8 (backbone + head)", _Segmentor(plain).to(device),
                      _Segmentor(sap).to(device)))
    return pairs


def _train_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step() -> None:
        model.train()
        out = model(x)
        loss = F.cross_entropy(out, target) if out.dim() == 2 else out.float().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def _eval_step(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        model.eval()
        with torch.no_grad():
            model(x)
    return step


def _median_diff(times_a: List[float], times_b: List[float]) -> float:
    """Median over rounds of the per-round difference a - b (seconds)."""
    diffs = sorted(a - b for a, b in zip(times_a, times_b))
    return diffs[len(diffs) // 2] if len(diffs) % 2 else 0.5 * (diffs[len(diffs) // 2 - 1] + diffs[len(diffs) // 2])


def _pool_level(plain: nn.Module, sap: nn.Module, x: torch.Tensor, args: argparse.Namespace,
                device: torch.device) -> Dict[str, float]:
    """Extra time of the SAP pools themselves, each timed on its real input shape.

    The whole-model ratios carry the noise of a shared machine; the pools are
    the only ops SAP changes, so the sum of their per-call extra time over the
    plain pools bounds the model overhead far more precisely.
    """
    names = [n for n, m in sap.named_modules() if isinstance(m, STOCHASTIC_POOL_TYPES)]
    shapes: Dict[str, torch.Size] = {}
    hooks = [plain.get_submodule(n).register_forward_hook(
        lambda m, i, o, n=n: shapes.__setitem__(n, i[0].shape)) for n in names]
    plain.eval()
    with torch.no_grad():
        plain(x)
    for h in hooks:
        h.remove()
    extra = {"train": 0.0, "eval": 0.0}
    for n in names:
        inp = torch.randn(shapes[n], device=device, requires_grad=True)
        mods = {"plain": plain.get_submodule(n), "sap": sap.get_submodule(n)}

        def train(m: nn.Module) -> None:
            m.train()
            out = m(inp)
            out.backward(torch.ones_like(out))

        def evaluate(m: nn.Module) -> None:
            m.eval()
            with torch.no_grad():
                m(inp)

        for mode, fn in (("train", train), ("eval", evaluate)):
            t = compare_timings({k: (lambda m=m, fn=fn: fn(m)) for k, m in mods.items()}, "plain",
                                rounds=args.pool_rounds, warmup=5, num_threads=args.threads, device=device,
                                seed=args.seed)
            extra[mode] += _median_diff(t.times["sap"], t.times["plain"])
    return dict(pools=len(names), pool_extra_train_ms=1e3 * extra["train"], pool_extra_eval_us=1e6 * extra["eval"])


def _bench(name: str, plain: nn.Module, sap: nn.Module, x: torch.Tensor, args: argparse.Namespace,
           device: torch.device) -> Dict[str, Any]:
    target = torch.randint(0, 10, (x.shape[0],), device=device)
    plain.eval(), sap.eval()
    with torch.no_grad():
        identical = bool(torch.equal(plain(x), sap(x)))
    res: Dict[str, Any] = dict(pair=name, eval_bit_identical=identical)
    for mode, make in (("train", lambda m: _train_step(m, x, target)), ("eval", lambda m: _eval_step(m, x))):
        t = compare_timings({"plain": make(plain), "sap": make(sap)}, "plain", rounds=args.rounds,
                            warmup=args.warmup, num_threads=args.threads, device=device, seed=args.seed)
        res[f"{mode}_plain_ms"] = 1e3 * t.median("plain")
        res[f"{mode}_sap_ms"] = 1e3 * t.median("sap")
        res[f"{mode}_ratio"] = t.ratio("sap")
        res[f"{mode}_ratio_iqr"] = t.ratio_iqr("sap")
        res[f"{mode}_aa"] = t.ratio(t.aa_name)
        res[f"{mode}_aa_iqr"] = t.ratio_iqr(t.aa_name)
    mem = {}
    for key, model in (("plain", plain), ("sap", sap)):
        model.train()
        mem[key] = saved_activation_bytes(lambda: model(x))
    res["act_mem_plain_MiB"] = mem["plain"] / 2 ** 20
    res["act_mem_ratio"] = mem["sap"] / mem["plain"]
    res.update(_pool_level(plain, sap, x, args, device))
    res["pool_bound_train_ratio"] = 1 + res["pool_extra_train_ms"] / res["train_plain_ms"]
    res["pool_bound_eval_ratio"] = 1 + 1e-3 * res["pool_extra_eval_us"] / res["eval_plain_ms"]
    print(markdown_table([_row(res)]), flush=True)
    return res


def _ratio(r: Dict[str, Any], key: str) -> str:
    lo, hi = r[key + "_iqr"]
    return f"{r[key]:.3f} [{lo:.3f}, {hi:.3f}]"


def _row(r: Dict[str, Any]) -> Dict[str, Any]:
    return {"pair (SAP vs plain)": r["pair"],
            "train ms plain": f"{r['train_plain_ms']:.1f}",
            "train ratio [IQR]": _ratio(r, "train_ratio"),
            "train A/A [IQR]": _ratio(r, "train_aa"),
            "eval ms plain": f"{r['eval_plain_ms']:.1f}",
            "eval ratio [IQR]": _ratio(r, "eval_ratio"),
            "eval A/A [IQR]": _ratio(r, "eval_aa"),
            "SAP pools": r["pools"],
            "pool extra train ms (bound)": f"{r['pool_extra_train_ms']:.2f} ({r['pool_bound_train_ratio']:.4f})",
            "pool extra eval us (bound)": f"{r['pool_extra_eval_us']:.1f} ({r['pool_bound_eval_ratio']:.5f})",
            "act. memory ratio": f"{r['act_mem_ratio']:.4f}",
            "eval bit-identical": r["eval_bit_identical"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads, pinned (default 1)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=128, help="input side for the timm models (default 128)")
    p.add_argument("--seg-batch", type=int, default=2, help="batch of the mmseg pairs (default 2)")
    p.add_argument("--seg-size", type=int, nargs=2, default=(128, 256),
                   help="input (H, W) for the mmseg pairs (default 128 256, a 1/4 Cityscapes crop)")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--pool-rounds", type=int, default=100, help="rounds of the pool-level timings")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="+", help="pairs whose name contains one of these")
    p.add_argument("--no-mmseg", action="store_true")
    p.add_argument("--out", default=os.path.join(HERE, "results", "stochastic_pool"))
    args = p.parse_args()
    device = torch.device(args.device)
    results = []
    pairs: List[Tuple[str, nn.Module, nn.Module, torch.Tensor]] = []
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    for plain_name, sap_name in TIMM_PAIRS:
        if args.only and not any(o in sap_name for o in args.only):
            continue
        plain, sap = _timm_pair(plain_name, sap_name, device)
        pairs.append((f"timm {sap_name}", plain, sap, x))
    if not args.no_mmseg:
        xs = torch.randn(args.seg_batch, 3, *args.seg_size, device=device)
        for name, plain, sap in _mmseg_pairs(device):
            if args.only and not any(o in name for o in args.only):
                continue
            pairs.append((name, plain, sap, xs))
    for name, plain, sap, inp in pairs:
        results.append(_bench(name, plain, sap, inp, args, device))
    env = dict(device=str(device), threads=args.threads, batch=args.batch, size=args.size,
               seg_batch=args.seg_batch, seg_size=list(args.seg_size), rounds=args.rounds, warmup=args.warmup,
               pool_rounds=args.pool_rounds,
               torch=torch.__version__,
               timm=timm.__version__, machine=platform.processor() or platform.machine(),
               cuda=torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    table = markdown_table([_row(r) for r in results])
    md = ["# Stochastic average pooling: cost vs plain (same run)", "",
          f"`python benchmarks/stochastic_pool.py` — {env['device']}, {env['threads']} pinned thread(s), batch "
          f"{env['batch']} at {env['size']}x{env['size']} for timm, batch {env['seg_batch']} at "
          f"{env['seg_size'][0]}x{env['seg_size'][1]} for mmseg, {env['rounds']} interleaved rounds (+{env['warmup']} "
          f"warm-up), torch {env['torch']}, timm {env['timm']}.", "",
          "Ratios are medians over rounds of SAP time / plain time in the same round, [IQR]; "
          "'A/A' is the plain model against itself (the noise floor). Train step = forward + loss + "
          "backward + SGD step; eval = no-grad forward in eval mode. Activation memory = bytes autograd "
          "saves for backward in a training forward.", "",
          "Pool level: the SAP pools are the only ops that differ, so each is also timed alone on its "
          "real input shape against the plain pool (train: forward + backward; eval: no-grad forward; "
          f"{env['pool_rounds']} interleaved rounds, median of per-round differences). Their summed extra "
          "time over the model's plain step time is the overhead bound in parentheses, far below the "
          "whole-model noise floor. In eval a SAP pool runs its parent's own forward (the same nn pooling "
          "call), so the eval pool-level numbers are pure timing noise of the shared machine (note the "
          "negative ones).", "", table, ""]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(md))
    with open(args.out + ".json", "w") as f:
        json.dump(dict(env=env, results=results), f, indent=2)
    print(f"\nwrote {args.out}.md and .json")


if __name__ == "__main__":
    main()
