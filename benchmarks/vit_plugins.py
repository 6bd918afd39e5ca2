#!/usr/bin/env python
"""Throughput of the GAB / PLN ViTs and GAB Swins vs their plain timm hosts (benchmarks/results/vit_plugins.*).

For every plugin name of ``kim_plugins.timm.kim_vit`` and ``kim_plugins.timm.kim_swin``, the plugin model and
its plain timm host (same widths, same input) are timed in the same run with
:func:`kim_plugins.benchmarking.compare_timings`: pinned threads, the
candidates interleaved in a shuffled order every round, medians of per-round
ratios, and the host timed twice per round (the A/A control, which should be
1.00 and shows the noise floor). Two workloads:

- ``eval``: ``model.eval()``, ``torch.no_grad()`` forward of a batch;
- ``train``: forward, cross-entropy, backward and an SGD step.

Throughput ratio = host time / plugin time (>= 1 means the plugin is not
slower). Target: eval >= 0.97, train >= 0.95. Two clocks, from the same calls:
wall time (what ``compare_timings`` records) and the calling thread's CPU time
(``time.thread_time``), which does not count the time the thread waits while
other processes hold the cores; on a shared machine the CPU-time ratio is the
one to trust, on a quiet one they agree.

Usage::

    python benchmarks/vit_plugins.py                         # all thirteen names, 224 px, 1 thread
    python benchmarks/vit_plugins.py --only vit_small_patch16_gab_224 --rounds 20 --threads 2
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Dict, List

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import timm  # noqa: E402

import kim_plugins  # noqa: E402,F401  registers the names
from kim_plugins.benchmarking import compare_timings  # noqa: E402
from kim_plugins.markdown import markdown_table  # noqa: E402

PAIRS = [  # plugin name -> plain timm host
    ("vit_tiny_patch16_gab_224", "vit_tiny_patch16_224"),
    ("vit_small_patch16_gab_224", "vit_small_patch16_224"),
    ("vit_base_patch16_gab_224", "vit_base_patch16_224"),
    ("vit_relpos_small_patch16_gab_224", "vit_relpos_small_patch16_224"),
    ("vit_relpos_medium_patch16_gab_224", "vit_relpos_medium_patch16_224"),
    ("vit_relpos_base_patch16_gab_224", "vit_relpos_base_patch16_224"),
    ("vit_tiny_patch16_pln_224", "vit_tiny_patch16_224"),
    ("vit_small_patch16_pln_224", "vit_small_patch16_224"),
    ("vit_base_patch16_pln_224", "vit_base_patch16_224"),
    ("vit_small_patch16_gab_pln_224", "vit_small_patch16_224"),
    ("swin_tiny_patch4_window7_gab_224", "swin_tiny_patch4_window7_224"),
    ("swin_small_patch4_window7_gab_224", "swin_small_patch4_window7_224"),
    ("swin_base_patch4_window7_gab_224", "swin_base_patch4_window7_224"),
]
TARGET = {"eval": 0.97, "train": 0.95}


def _workload(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str) -> Callable[[], Any]:
    if mode == "eval":
        model.eval()

        def run() -> None:
            with torch.no_grad():
                model(x)
        return run
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def _cpu_timed(fn: Callable[[], Any], store: List[float]) -> Callable[[], Any]:
    def run() -> None:
        t0 = time.thread_time()
        fn()
        store.append(time.thread_time() - t0)
    return run


def _median_ratio(num: List[float], den: List[float]) -> float:
    return statistics.median(n / d for n, d in zip(num, den))


def bench_pair(plugin: str, host: str, mode: str, batch: int, img: int, rounds: int, warmup: int,
               threads: int) -> Dict[str, Any]:
    torch.manual_seed(0)
    twin = host + " (2nd instance)"  # B/B control: same architecture, separately allocated weights
    models = {host: timm.create_model(host, img_size=img), plugin: timm.create_model(plugin, img_size=img),
              twin: timm.create_model(host, img_size=img)}
    x = torch.randn(batch, 3, img, img)
    y = torch.randint(0, 1000, (batch,))
    cpu: Dict[str, List[float]] = {k: [] for k in models}
    res = compare_timings({k: _cpu_timed(_workload(m, x, y, mode), cpu[k]) for k, m in models.items()}, host,
                          rounds=rounds, warmup=warmup, num_threads=threads)
    # the host runs twice per round (A and A/A) through the same callable: split its CPU times per round
    host_cpu = cpu[host][2 * warmup:]
    host_a, host_aa, plugin_cpu = host_cpu[0::2], host_cpu[1::2], cpu[plugin][warmup:]
    q1, q3 = res.ratio_iqr(plugin)
    aa_q1, aa_q3 = res.ratio_iqr(res.aa_name)
    cpu_ratio = _median_ratio(host_a, plugin_cpu)
    return dict(
        plugin=plugin, host=host, mode=mode, batch=batch, img=img,
        host_img_s_cpu=batch / statistics.median(host_a), plugin_img_s_cpu=batch / statistics.median(plugin_cpu),
        cpu_ratio=cpu_ratio, cpu_aa=_median_ratio(host_a, host_aa), cpu_bb=_median_ratio(host_a, cpu[twin][warmup:]),
        wall_ratio=1.0 / res.ratio(plugin), wall_iqr=f"{1 / q3:.3f}-{1 / q1:.3f}",
        wall_aa=1.0 / res.ratio(res.aa_name), wall_aa_iqr=f"{1 / aa_q3:.3f}-{1 / aa_q1:.3f}",
        target=TARGET[mode], meets_target=cpu_ratio >= TARGET[mode],
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", help="subset of the plugin names")
    p.add_argument("--modes", nargs="+", default=["eval", "train"], choices=["eval", "train"])
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-eval", type=int, default=8)
    p.add_argument("--batch-train", type=int, default=4)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join(HERE, "results", "vit_plugins"))
    p.add_argument("--rounds-eval", type=int, default=None, help="rounds for eval (default: --rounds)")
    p.add_argument("--update", action="store_true",
                   help="with --only: replace those rows in an existing <out>.json instead of starting anew")
    args = p.parse_args()

    rows: List[Dict[str, Any]] = []
    if args.update and os.path.exists(args.out + ".json"):
        with open(args.out + ".json") as f:
            previous = json.load(f)
        rows = previous["rows"]
        for r in rows:
            r.setdefault("rounds", previous["env"]["rounds"])
    hosts = dict(PAIRS)
    unknown = [n for n in args.only or [] if n not in hosts]
    if unknown:
        p.error(f"--only: unknown plugin names {unknown}; choose from {list(hosts)}")
    for plugin in args.only or list(hosts):  # in the order given
        host = hosts[plugin]
        for mode in args.modes:
            batch = args.batch_eval if mode == "eval" else args.batch_train
            rounds = (args.rounds_eval or args.rounds) if mode == "eval" else args.rounds
            row = bench_pair(plugin, host, mode, batch, args.img_size, rounds, args.warmup, args.threads)
            row["rounds"] = rounds
            row["measured"] = time.strftime("%Y-%m-%d")
            old = [i for i, r in enumerate(rows) if (r["plugin"], r["mode"]) == (plugin, mode)]
            if old:
                rows[old[0]] = row
            else:
                rows.append(row)
            print(f"{plugin:36s} {mode:5s} cpu {row['cpu_ratio']:.3f} (A/A {row['cpu_aa']:.3f})  "
                  f"wall {row['wall_ratio']:.3f} ({row['wall_iqr']}, A/A {row['wall_aa']:.3f})", flush=True)
            _write(rows, args)  # after every row: a long run keeps what it measured


def _write(rows: List[Dict[str, Any]], args: argparse.Namespace) -> None:
    columns = ["plugin", "host", "mode", "batch", "host_img_s_cpu", "plugin_img_s_cpu", "cpu_ratio", "cpu_aa", "cpu_bb",
               "wall_ratio", "wall_iqr", "wall_aa", "wall_aa_iqr", "rounds", "target", "meets_target", "measured"]
    env = dict(torch=torch.__version__, timm=timm.__version__, threads=args.threads, rounds=args.rounds,
               img_size=args.img_size, cpu=platform.processor() or platform.machine(),
               device="cpu", load_avg=os.getloadavg()[0])
    md = ["# GAB / PLN ViTs and GAB Swins vs their plain timm hosts: throughput (CPU)", "",
          f"`python benchmarks/vit_plugins.py` — torch {env['torch']}, timm {env['timm']}, {args.threads} thread(s), "
          f"{args.img_size} px, `rounds` interleaved rounds (+{args.warmup} warm-up), medians of per-round "
          f"ratios. Ratios are host time / plugin time (throughput of the plugin relative to its host), by the "
          f"thread's CPU time (`cpu_*`) and by wall time (`wall_*`, IQR beside it); `*_aa` is the host against "
          f"itself in the same rounds (noise floor), `cpu_bb` the host against a second, separately allocated instance of the same model (weight placement alone moves MKL's speed by a few percent). `meets_target` uses the CPU-time ratio; `measured`: the date of the row's run "
          f"(`--update` keeps the rows of earlier runs; empty: before dates were recorded). Load average at the "
          f"end of the last run: {env['load_avg']:.1f} (a shared machine: wall-time ratios are noisy).", "",
          markdown_table(rows, columns), ""]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(md))
    with open(args.out + ".json", "w") as f:
        json.dump(dict(env=env, rows=rows), f, indent=2)
    print("\n".join(md[:3]), flush=True)


if __name__ == "__main__":
    main()
