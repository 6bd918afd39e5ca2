#!/usr/bin/env python
"""Cost of the scale-equalized heads vs their mmseg parents: writes benchmarks/results/scale_equalizer.{md,json}.

For each of the five heads, with the channel counts of the paper's configs
(R-50-D8 for PSP / ASPP / DeepLabV3+, Swin-T for UPer, HRNet-W18 for FCN), at
the feature sizes of their crops scaled by ``--feature-scale`` per side (CPU):

- train step (forward + cross-entropy + backward) of the calibrated SE head vs
  the parent head, and the activation memory each keeps for backward
  (``saved_activation_bytes``);
- eval forward of the folded SE head (``fold_scale_equalizers``) vs the
  parent head, and of the unfolded SE head for reference.

Both heads hold the same weights; every ratio comes from the same
interleaved run (``kim_plugins.benchmarking.compare_timings``: pinned threads,
shuffled order per round, medians of per-round ratios) next to its A/A
control (the parent timed twice per round), which shows the noise floor.

Usage::

    python benchmarks/scale_equalizer.py                  # all heads, 1 thread
    python benchmarks/scale_equalizer.py --heads psp uper --rounds 30 --feature-scale 0.5
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
from typing import Any, Callable, Dict, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kim_plugins.benchmarking import compare_timings, saved_activation_bytes  # noqa: E402
from kim_plugins.markdown import markdown_table  # noqa: E402

BN = dict(type="BN", requires_grad=True)


def _cases(scale: float) -> Dict[str, Tuple[str, str, Dict[str, Any], List[Tuple[int, ...]]]]:
    """key -> (SE type, parent type, head kwargs, input shapes at batch 2)."""
    def s(h: int, w: int) -> Tuple[int, int]:
        return max(2, round(h * scale)), max(2, round(w * scale))

    city8, city4 = s(64, 128), s(128, 256)   # Cityscapes 512x1024 at output stride 8 / 4
    ade = [s(128, 128), s(64, 64), s(32, 32), s(16, 16)]  # ADE20K 512x512, Swin-T strides 4..32
    hr = [s(128, 256), s(64, 128), s(32, 64), s(16, 32)]   # HRNet-W18 on Cityscapes
    r50 = dict(in_channels=2048, in_index=0, channels=512, num_classes=19, norm_cfg=BN)
    return {
        "psp": ("SEPSPHead", "PSPHead", dict(r50, pool_scales=(1, 2, 3, 6)), [(2, 2048) + city8]),
        "aspp": ("SEASPPHead", "ASPPHead", dict(r50, dilations=(1, 12, 24, 36)), [(2, 2048) + city8]),
        "sepaspp": ("SEDepthwiseSeparableASPPHead", "DepthwiseSeparableASPPHead",
                    dict(r50, dilations=(1, 12, 24, 36), c1_in_channels=256, c1_channels=48, in_index=1),
                    [(2, 256) + city4, (2, 2048) + city8]),
        "uper": ("SEUPerHead", "UPerHead", dict(in_channels=[96, 192, 384, 768], in_index=[0, 1, 2, 3], channels=512,
                                                pool_scales=(1, 2, 3, 6), num_classes=150, norm_cfg=BN),
                 [(2, c) + hw for c, hw in zip([96, 192, 384, 768], ade)]),
        "fcn": ("SEFCNHead", "FCNHead", dict(in_channels=[18, 36, 72, 144], in_index=(0, 1, 2, 3), channels=270,
                                             input_transform="resize_concat", kernel_size=1, num_convs=1,
                                             concat_input=False, dropout_ratio=-1, num_classes=19, norm_cfg=BN),
                [(2, c) + hw for c, hw in zip([18, 36, 72, 144], hr)]),
    }


def _train_step(head: torch.nn.Module, inputs: List[torch.Tensor], target: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        head.zero_grad(set_to_none=True)
        F.cross_entropy(head(inputs), target).backward()
    return step


def _eval(head: torch.nn.Module, inputs: List[torch.Tensor]) -> Callable[[], None]:
    def fwd() -> None:
        with torch.no_grad():
            head(inputs)
    return fwd


def bench_head(key: str, case: Tuple, args: argparse.Namespace) -> List[Dict[str, Any]]:
    from mmseg.registry import MODELS
    from kim_plugins.layers.scale_equalizer import calibrate_scale_equalizers, fold_scale_equalizers

    se_type, parent_type, kwargs, shapes = case
    torch.manual_seed(0)
    se = MODELS.build(dict(type=se_type, **kwargs))
    parent = MODELS.build(dict(type=parent_type, **kwargs))
    parent.load_state_dict(se.state_dict(), strict=False)
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(*sh, generator=g) for sh in shapes]
    with torch.no_grad():
        out_shape = parent.eval()(inputs).shape
    target = torch.randint(0, kwargs["num_classes"], (out_shape[0],) + tuple(out_shape[2:]), generator=g)
    calibrate_scale_equalizers(se, [inputs])
    rows = []
    sizes = " ".join("x".join(map(str, sh[1:])) for sh in shapes)

    se.train(), parent.train()
    res = compare_timings({"parent": _train_step(parent, inputs, target), "SE": _train_step(se, inputs, target)},
                          "parent", rounds=args.rounds, warmup=args.warmup, num_threads=args.threads)
    mem_p = saved_activation_bytes(lambda: parent(inputs))
    mem_s = saved_activation_bytes(lambda: se(inputs))
    rows.append(dict(head=key, what="train step (fwd+bwd)", inputs=sizes, parent_ms=1e3 * res.median("parent"),
                     se_ms=1e3 * res.median("SE"), ratio=res.ratio("SE"), ratio_q1=res.ratio_iqr("SE")[0],
                     ratio_q3=res.ratio_iqr("SE")[1], aa_ratio=res.ratio(res.aa_name),
                     aa_q1=res.ratio_iqr(res.aa_name)[0], aa_q3=res.ratio_iqr(res.aa_name)[1],
                     saved_act_MiB_parent=mem_p / 2 ** 20, saved_act_ratio=mem_s / mem_p))

    se.eval(), parent.eval()
    folded = copy.deepcopy(se)
    report = fold_scale_equalizers(folded)
    with torch.no_grad():
        err = (folded(inputs) - se(inputs)).abs().max().item()
    res = compare_timings({"parent": _eval(parent, inputs), "SE folded": _eval(folded, inputs),
                           "SE unfolded": _eval(se, inputs)}, "parent", rounds=args.eval_rounds,
                          warmup=args.warmup, num_threads=args.threads)
    for name in ("SE folded", "SE unfolded"):
        rows.append(dict(head=key, what=f"eval forward, {name}", inputs=sizes, parent_ms=1e3 * res.median("parent"),
                         se_ms=1e3 * res.median(name), ratio=res.ratio(name), ratio_q1=res.ratio_iqr(name)[0],
                         ratio_q3=res.ratio_iqr(name)[1], aa_ratio=res.ratio(res.aa_name),
                         aa_q1=res.ratio_iqr(res.aa_name)[0], aa_q3=res.ratio_iqr(res.aa_name)[1],
                         folded_max_abs_err=err if name == "SE folded" else "",
                         unfolded_sites=len(report["unfolded"]) if name == "SE folded" else ""))
    return rows


def main(argv: List[str] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--heads", nargs="+", default=["psp", "aspp", "sepaspp", "uper", "fcn"])
    p.add_argument("--rounds", type=int, default=15, help="rounds of the train-step comparison")
    p.add_argument("--eval-rounds", type=int, default=40, help="rounds of the (cheaper) eval comparison")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--feature-scale", type=float, default=0.15,
                   help="per-side factor on the real feature sizes (1.0 = the configs' crops; CPU default 0.15)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "scale_equalizer"))
    args = p.parse_args(argv)
    import kim_plugins.mmseg  # noqa: F401  registrations

    cases = _cases(args.feature_scale)
    rows: List[Dict[str, Any]] = []
    for key in args.heads:
        print(f"== {key}", flush=True)
        rows.extend(bench_head(key, cases[key], args))
        print(markdown_table(rows[-3:]), flush=True)
    meta = dict(rounds=args.rounds, eval_rounds=args.eval_rounds, warmup=args.warmup, threads=args.threads,
                feature_scale=args.feature_scale,
                torch=torch.__version__, machine=platform.machine(), processor=platform.processor(),
                cpu_count=os.cpu_count())
    cols = ["head", "what", "inputs", "parent_ms", "se_ms", "ratio", "ratio_q1", "ratio_q3", "aa_ratio", "aa_q1",
            "aa_q3", "saved_act_MiB_parent", "saved_act_ratio", "folded_max_abs_err"]
    md = ["# Scale-equalized heads vs mmseg parents", "",
          f"CPU, {args.threads} pinned thread(s), batch 2, {args.rounds} (train) / {args.eval_rounds} (eval) "
          f"interleaved rounds (+{args.warmup} warm-up), "
          f"medians of per-round ratios (IQR), A/A = parent vs itself in the same run. Feature sizes = the "
          f"configs' crops x {args.feature_scale} per side (inputs: channels x H x W per level). torch "
          f"{torch.__version__}. Produced by `python benchmarks/scale_equalizer.py`.", "",
          markdown_table(rows, cols, floatfmt="{:.4g}"), ""]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(md))
    with open(args.out + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print("\n".join(md))
    return dict(meta=meta, rows=rows)


if __name__ == "__main__":
    main()
