"""Train a segmentor: mmseg's ``tools/train.py`` with kim_plugins loaded, on GPUs or CPUs.

Same command line as mmsegmentation 1.2.2's ``tools/train.py``::

    python tools/train.py CONFIG [--work-dir DIR] [--resume] [--amp]
        [--cfg-options KEY=VALUE ...] [--launcher none|pytorch|slurm|mpi]

plus:

- ``--tiny DATA_ROOT``: shrink the config to a CPU-sized dry run on a small
  dataset in the config's layout (see ``kim_plugins.dry_run.tiny``): a few
  iterations, small crops, BN instead of SyncBN, no pretrained weights;
  ``--tiny-iters``/``--tiny-crop`` size it. ``--cfg-options`` apply after it.
- ``--trust-checkpoint``: allow ``load_from`` to unpickle an old-style runner
  checkpoint (see ``tools/test.py``); ``--resume`` needs no flag. The
  checkpoints this tool writes load safely everywhere
  (``kim_plugins.mmseg.weights_only``).

``kim_plugins.mmseg`` is imported even when the config has no
``custom_imports``. Multi-process runs (``tools/dist_train.sh``) also work
without a GPU: the launch switches to gloo, a CPU-capable DDP wrapper and BN
(``kim_plugins.mmseg.distributed``).
"""
from __future__ import annotations

import argparse
import logging
from typing import List, Optional

from mmengine.config import Config

import kim_plugins.mmseg  # noqa: F401  registrations and the resume fix, config or not
from kim_plugins.cli.common import add_run_arguments, parse_run_args
import kim_plugins.mmseg.distributed  # noqa: F401  CPU-capable launch


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a segmentor (mmseg CLI, kim_plugins loaded)")
    parser.add_argument("config", help="train config file path")
    parser.add_argument("--work-dir", help="the dir to save logs and models")
    parser.add_argument("--resume", action="store_true", default=False,
                        help="resume from the latest checkpoint in the work_dir automatically")
    parser.add_argument("--amp", action="store_true", default=False,
                        help="enable automatic-mixed-precision training")
    add_run_arguments(parser, tiny_iters=True,
                      tiny_help="dry run: shrink the config to a few CPU iterations on the small dataset at DATA_ROOT "
                                "('auto': write one in the config's layout under WORK_DIR/tiny_data)")
    return parse_run_args(parser, argv)


def build_config(args: argparse.Namespace) -> Config:
    """The config mmseg's train.py would run, with ``--tiny`` and the CPU launch applied."""
    from mmengine.logging import print_log

    from kim_plugins.cli.common import finish_tool_config, load_tool_config

    cfg = load_tool_config(args, max_iters=args.tiny_iters)

    if args.amp:
        optim_wrapper = cfg.optim_wrapper.type
        if optim_wrapper == "AmpOptimWrapper":
            print_log("AMP training is already enabled in your config.", logger="current", level=logging.WARNING)
        else:
            if optim_wrapper != "OptimWrapper":
                raise ValueError(f"--amp needs optim_wrapper.type='OptimWrapper', got {optim_wrapper!r}")
            cfg.optim_wrapper.type = "AmpOptimWrapper"
            cfg.optim_wrapper.loss_scale = "dynamic"
    cfg.resume = args.resume
    return finish_tool_config(cfg, args)


def run(args: argparse.Namespace):
    """Train; returns the runner."""
    from mmengine.runner import Runner
    from mmseg.registry import RUNNERS

    from kim_plugins.mmseg.resume import checkpoint_loading

    cfg = build_config(args)
    runner = Runner.from_cfg(cfg) if "runner_type" not in cfg else RUNNERS.build(cfg)
    with checkpoint_loading(None if cfg.resume else cfg.get("load_from"), args.trust_checkpoint):
        runner.train()
    return runner


def main(argv: Optional[List[str]] = None) -> int:
    run(parse_args(argv))
    return 0
