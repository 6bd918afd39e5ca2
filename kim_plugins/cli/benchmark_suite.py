"""Benchmark every kim_plugins plugin against its baseline on real Fashion-MNIST data.

The README's first command: with no arguments it runs the ``quick`` suite
(sized for 2 CPU cores and 15 minutes) and writes
``results/<timestamp>/report.md`` (mechanisms first, then accuracy with seed
spread), ``results.csv``, ``runs.csv`` and PNG plots:

- ``se``     UPerHead vs SEUPerHead, ASPPHead vs SEASPPHead on Fashion scenes (mIoU),
             per-branch variance entering each fusion;
- ``rates``  ASPP rates (1, 12, 24, 36) vs resolution-aware rates at two input
             sizes (mIoU), ERF lattice of each;
- ``vit``    patch-4 ViT vs GAB, PLN, GAB+PLN on Fashion-MNIST (top-1), PLN's
             contrast-robustness curve;
- ``swin``   patch-2 Swin vs its GAB version on Fashion-MNIST (top-1), learnt σ, a;
- ``sap``    ResNet-18-D vs its SAP version (top-1), train/eval consistency.

Data: Fashion-MNIST from the Debian package ``dataset-fashion-mnist``
(``tools/setup.sh`` installs it) or ``--fashion-mnist DIR``; the Fashion scenes
are generated from it once and cached under ``--data-root``.

Examples::

    python tools/benchmark_suite.py                       # quick suite, <= 15 min on 2 cores
    python tools/benchmark_suite.py --only se,rates --seeds 3
    python tools/benchmark_suite.py --suite full --device cuda
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Dict, Optional, Sequence

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    from kim_plugins.suite.pairs import pair_groups

    groups = pair_groups()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=("quick", "full"), default="quick",
                   help="quick: 2 CPU cores, <= 15 min (default); full: sized for one GPU")
    p.add_argument("--seeds", type=int, default=None, help="seeds per variant (default: quick 2, full 3)")
    p.add_argument("--only", default=",".join(groups),
                   help=f"comma-separated pair groups to run: {', '.join(groups)} (default: all)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--budget-minutes", type=float, default=None,
                   help="wall-time budget: iterations and evaluation sizes shrink to fit it after measuring this "
                        "machine's speed, and the iterations of what is left shrink again before each pair when the "
                        "machine runs behind the plan (default: 15 for quick, none for full)")
    p.add_argument("--fashion-mnist", default=None, metavar="DIR",
                   help="folder with the four Fashion-MNIST idx files (default: /usr/share/datasets/fashion-mnist "
                        "or $FASHION_MNIST_DIR)")
    p.add_argument("--data-root", default=None, help="cache of the generated Fashion scenes (default: ./data)")
    p.add_argument("--out", default=None, help="output folder (default: results/<timestamp>)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in the report
    return args


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Run the selected pairs (:func:`kim_plugins.suite.core.run_suite`) and return its result."""
    from kim_plugins.suite.core import SuiteOptions, run_suite

    only = [s.strip() for s in args.only.split(",") if s.strip()]
    return run_suite(SuiteOptions(suite=args.suite, seeds=args.seeds, only=only, device=args.device,
                                  budget_minutes=args.budget_minutes, fashion_mnist=args.fashion_mnist,
                                  data_root=args.data_root, out=args.out, threads=args.threads, argv=args.argv))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 1 if result["failed"] else 0
