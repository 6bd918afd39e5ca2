#!/usr/bin/env python
"""Benchmark: batched ERF (one backward per batch) vs the per-image loop.

Both compute the same map (checked here with allclose before timing). The
batched form runs the model once on a batch of N images and takes one backward
of the sum of the N target units; the loop runs N forwards and N backwards of
one image each. Timed with :func:`kim_plugins.benchmarking.compare_timings`
(pinned threads, interleaved rounds in shuffled order, medians, A/A control),
for a small and a large timm model, untrained (``pretrained=False``).

On a CPU the compute dominates for large models, so the gain there is small;
on a GPU the loop is launch-bound and the gain large (run with
``--device cuda``).

Usage::

    python benchmarks/erf_batched.py                    # writes benchmarks/results/erf.{md,json}
    python benchmarks/erf_batched.py --device cuda --rounds 20 --out benchmarks/results/erf_cuda
"""
from __future__ import annotations

import argparse
import json
import os
import platform
from typing import Any, Dict, List

import torch

from kim_plugins.benchmarking import compare_timings
from kim_plugins.layers.erf import erf_maps
from kim_plugins.markdown import markdown_table

# name, timm model, input size, images per ERF (the batch of the batched form), timed rounds
CASES = [
    ("small", "resnet18", 64, 16, 15),
    ("large", "resnet50", 224, 8, 6),
]


def run_case(label: str, model_name: str, size: int, num_images: int, rounds: int, device: str,
             threads: int) -> List[Dict[str, Any]]:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False).to(device).eval()
    images = torch.randn(num_images, 3, size, size, device=device)
    loop = lambda: erf_maps(model, images, batch_size=1)  # noqa: E731
    batched = lambda: erf_maps(model, images, batch_size=num_images)  # noqa: E731
    torch.testing.assert_close(batched(), loop(), rtol=1e-4, atol=1e-7)
    res = compare_timings({"per-image loop": loop, "batched": batched}, baseline="per-image loop",
                          rounds=rounds, warmup=1, num_threads=threads,
                          device=torch.device(device), progress=True)
    rows = []
    for row in res.rows():
        rows.append(dict(case=label, model=model_name, input=f"{size}x{size}", images=num_images,
                         candidate=row["name"], median_ms=row["median_ms"], ratio_vs_loop=row["ratio"],
                         ratio_q1=row["ratio_q1"], ratio_q3=row["ratio_q3"],
                         speedup=1.0 / row["ratio"]))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="pinned intra-op threads (default 1)")
    p.add_argument("--rounds", type=int, default=None, help="override the timed rounds of every case")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "erf"),
                   help="output path stem (.md and .json are written)")
    args = p.parse_args()
    rows: List[Dict[str, Any]] = []
    for label, name, size, n, rounds in CASES:
        print(f"{label}: {name} at {size}x{size}, {n} images")
        rows.extend(run_case(label, name, size, n, args.rounds or rounds, args.device, args.threads))
    cols = ["case", "model", "input", "images", "candidate", "median_ms", "ratio_vs_loop", "ratio_q1",
            "ratio_q3", "speedup"]
    table = markdown_table(rows, cols)
    env = dict(device=args.device, threads=args.threads, torch=torch.__version__, python=platform.python_version(),
               machine=platform.machine(), note="shared 2-core machine, other processes running" if
               args.device == "cpu" else "")
    md = ["# ERF: batched vs per-image loop", "",
          "One ERF = gradient of the centre unit of the last feature map w.r.t. N input images, "
          "accumulated (kim_plugins.layers.erf.erf_maps). `per-image loop`: batch_size=1 "
          "(N forwards + N backwards); `batched`: one forward and one backward of N images. "
          "Both give the same map (allclose, checked before timing). Untrained timm models "
          "(pretrained=False). Medians over interleaved rounds; `ratio_vs_loop` = time / loop time "
          "per round (median, IQR q1-q3); the `(A/A)` row is the loop timed twice per round "
          "(noise floor, ideally 1.00). `speedup` = 1 / ratio.", "",
          f"Environment: {json.dumps(env)}", "", table, ""]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(md))
    with open(args.out + ".json", "w") as f:
        json.dump(dict(env=env, rows=rows), f, indent=2)
    print(table)
    print(f"wrote {args.out}.md and {args.out}.json")


if __name__ == "__main__":
    main()
