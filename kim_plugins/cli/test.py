"""Test (and evaluate) a segmentor: mmseg's ``tools/test.py`` with kim_plugins loaded, on GPUs or CPUs.

Same command line as mmsegmentation 1.2.2's ``tools/test.py``::

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--out DIR] [--show]
        [--show-dir DIR] [--wait-time S] [--cfg-options KEY=VALUE ...]
        [--launcher none|pytorch|slurm|mpi] [--tta]

plus:

- ``--trust-checkpoint``: checkpoints written with kim_plugins imported load
  safely; an old-style mmengine runner checkpoint also pickles training state,
  which torch >= 2.6's safe loading refuses. Pass this flag for such a file you
  trust; it unpickles exactly that file (``kim_plugins.mmseg.resume.checkpoint_loading``). Without
  it the load stays safe and a refusal is reported with the flag named.
- ``--tiny DATA_ROOT``: evaluate on a small dataset in the config's layout
  with the same shrinking as ``tools/train.py --tiny`` (crop ``--tiny-crop``).

Scale equalizers are folded into their convolutions before the first test
batch (``kim_plugins.mmseg.se_inference``, as in mmseg's own ``tools/test.py``
with kim_plugins imported); ``--cfg-options model.test_cfg.fold_scale_equalizers=False``
keeps them unfolded.

The metrics are written, as by mmseg, to ``WORK_DIR/<timestamp>/<timestamp>.json``,
which ``tools/summarize.py`` reads.
"""
from __future__ import annotations

import argparse
import os.path as osp
from typing import List, Optional

from mmengine.config import Config

import kim_plugins.mmseg  # noqa: F401  registrations, config or not
from kim_plugins.cli.common import add_run_arguments, parse_run_args
import kim_plugins.mmseg.distributed  # noqa: F401  CPU-capable launch


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="MMSeg test (and eval) a model, kim_plugins loaded")
    parser.add_argument("config", help="test config file path")
    parser.add_argument("checkpoint", help="checkpoint file")
    parser.add_argument("--work-dir", help="if specified, the evaluation metric results will be dumped into the "
                                           "directory as json")
    parser.add_argument("--out", type=str, help="the directory to save output prediction for offline evaluation")
    parser.add_argument("--show", action="store_true", help="show prediction results")
    parser.add_argument("--show-dir", help="directory where painted images will be saved (under "
                                           "work_dir/timestamp/show_dir)")
    parser.add_argument("--wait-time", type=float, default=2, help="the interval of show (s)")
    parser.add_argument("--tta", action="store_true", help="Test time augmentation")
    add_run_arguments(parser, tiny_help="evaluate on the small dataset at DATA_ROOT ('auto': write one) with "
                                        "tools/train.py --tiny's shrinking")
    return parse_run_args(parser, argv)


def trigger_visualization_hook(cfg: Config, args: argparse.Namespace) -> Config:
    """Turn on mmseg's SegVisualizationHook for --show / --show-dir (as mmseg does)."""
    default_hooks = cfg.default_hooks
    if "visualization" not in default_hooks:
        raise RuntimeError("--show/--show-dir need a visualization hook in default_hooks, e.g. "
                           "default_hooks.visualization=dict(type='SegVisualizationHook')")
    hook = default_hooks["visualization"]
    hook["draw"] = True
    if args.show:
        hook["show"] = True
        hook["wait_time"] = args.wait_time
    if args.show_dir:
        cfg.visualizer["save_dir"] = args.show_dir
    return cfg


def build_config(args: argparse.Namespace) -> Config:
    """The config mmseg's test.py would run, with ``--tiny`` and the CPU launch applied."""
    from kim_plugins.cli.common import finish_tool_config, load_tool_config

    cfg = load_tool_config(args)
    cfg.load_from = args.checkpoint
    cfg.resume = False

    if args.show or args.show_dir:
        cfg = trigger_visualization_hook(cfg, args)
    if args.tta:
        if cfg.get("tta_pipeline") is None or cfg.get("tta_model") is None:
            raise ValueError(f"--tta needs tta_pipeline and tta_model in the config {args.config}")
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
        cfg.tta_model.module = cfg.model
        cfg.model = cfg.tta_model
    if args.out is not None:
        cfg.test_evaluator["output_dir"] = args.out
        cfg.test_evaluator["keep_results"] = True
    return finish_tool_config(cfg, args)


def run(args: argparse.Namespace):
    """Test; returns the metrics dict of ``Runner.test``."""
    from mmengine.runner import Runner

    from kim_plugins.mmseg.resume import checkpoint_loading

    if not osp.isfile(args.checkpoint) and "://" not in args.checkpoint:
        raise FileNotFoundError(f"checkpoint {args.checkpoint!r} does not exist")
    cfg = build_config(args)
    runner = Runner.from_cfg(cfg)
    with checkpoint_loading(args.checkpoint, args.trust_checkpoint):
        return runner.test()


def main(argv: Optional[List[str]] = None) -> int:
    run(parse_args(argv))
    return 0
