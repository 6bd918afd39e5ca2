"""Pieces shared by the command-line tools of :mod:`kim_plugins.cli` (``train``, ``test``, ``benchmark``, ``erf``, ...).

Checkpoint trust policy (torch >= 2.6 loads with ``weights_only=True``):
checkpoints written with :mod:`kim_plugins.mmseg` imported load safely
(:mod:`kim_plugins.mmseg.weights_only`). An old-style runner checkpoint
pickles its message hub (``HistoryBuffer``, numpy scalars,
``builtins.getattr``), so safe loading refuses it. Resuming one's own run is
trusted automatically (:mod:`kim_plugins.mmseg.resume`). Every tool that
loads a checkpoint as weights stays safe by default and takes
``--trust-checkpoint`` (:func:`add_trust_argument`) for a file the user
trusts, which scopes full unpickling to exactly that file through
:func:`kim_plugins.mmseg.resume.checkpoint_loading`; without it the refusal
names the flag.

Importing this module needs neither mmseg nor mmengine.
"""
from __future__ import annotations

import argparse
import os
from typing import List, Optional

__all__ = ["REPO_ROOT", "LazyDictAction", "doc_parser", "add_trust_argument", "add_run_arguments", "parse_run_args",
           "fresh_visualizer_name", "load_tool_config", "finish_tool_config", "add_threads_and_seed", "start_run"]


#: The source checkout the package is installed from (``pip install -e``, as ``tools/setup.sh`` does):
#: ``configs/`` and ``README.md`` live there.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class LazyDictAction(argparse.Action):
    """``key=value`` pairs (mmengine's ``DictAction``, imported lazily so timm-only use needs no mmengine)."""

    def __call__(self, parser, namespace, values, option_string=None):
        from mmengine.config import DictAction
        DictAction(self.option_strings, self.dest)(parser, namespace, values, option_string)


def doc_parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose description is the first paragraph of a tool's docstring and whose epilog is the rest."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 1)[1],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_trust_argument(parser) -> None:
    """``--trust-checkpoint``, worded the same in every tool that loads a checkpoint."""
    from kim_plugins.mmseg.resume import TRUST_FLAG

    parser.add_argument(TRUST_FLAG, action="store_true",
                        help="fully unpickle the named checkpoint(s) if safe loading refuses them (old-style runner "
                             "checkpoints you trust, e.g. from your own work_dir); nothing else is unpickled")


def add_run_arguments(parser: argparse.ArgumentParser, tiny_help: str, tiny_iters: bool = False) -> None:
    """The options ``train`` and ``test`` share: mmseg's ``--cfg-options``/``--launcher``, then kim_plugins' own.

    ``--tiny DATA_ROOT`` (``tiny_help``), ``--tiny-iters`` (with ``tiny_iters``),
    ``--tiny-crop``, ``--trust-checkpoint``, ``--no-pretrained`` and mmseg's
    ``--local_rank``; read them with :func:`parse_run_args`.
    """
    from mmengine.config import DictAction

    parser.add_argument("--cfg-options", nargs="+", action=DictAction,
                        help="override some settings in the used config, the key-value pair in xxx=yyy "
                             "format will be merged into config file (as in mmseg)")
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none",
                        help="job launcher")
    parser.add_argument("--tiny", metavar="DATA_ROOT", help=tiny_help)
    if tiny_iters:
        parser.add_argument("--tiny-iters", type=int, default=2, help="iterations of a --tiny run (default 2)")
    parser.add_argument("--tiny-crop", type=int, nargs=2, default=(64, 64), metavar=("H", "W"),
                        help="crop size of a --tiny run (default 64 64)")
    add_trust_argument(parser)
    parser.add_argument("--no-pretrained", action="store_true",
                        help="build without ImageNet weights (offline): pretrained/init_cfg checkpoints dropped, "
                             "TIMMBackbone(pretrained=False)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0)


def parse_run_args(parser: argparse.ArgumentParser, argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse, and export ``LOCAL_RANK`` from ``--local_rank`` unless the launcher set it (as mmseg's tools do)."""
    args = parser.parse_args(argv)
    if "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)
    return args


def fresh_visualizer_name(cfg) -> None:
    """Give ``cfg.visualizer`` a new name if this process already built one with its name (in place).

    mmseg's runtime names its visualizer ``'visualizer'``, and mmengine returns
    an existing instance of that name — with the first run's ``save_dir``. A
    second run in the same Python process (``tools/train.py``'s ``main`` called
    twice, a notebook) would then log its ``vis_data/scalars.json`` into the
    first run's work dir. A command-line run (one run per process) is unchanged.
    """
    import uuid

    from mmseg.registry import VISUALIZERS

    vis = cfg.get("visualizer")
    if not isinstance(vis, dict) or not vis.get("name"):
        return
    cls = VISUALIZERS.get(vis.get("type", "Visualizer"))
    if cls is not None and cls.check_instance_created(vis["name"]):
        vis["name"] = f"{vis['name']}_{uuid.uuid4().hex[:8]}"


def load_tool_config(args, **tiny_kwargs):
    """The head shared by ``tools/train.py`` and ``tools/test.py``: load, work_dir, ``--tiny``, overrides.

    work_dir is resolved as in mmseg (CLI > config > ``./work_dirs/<config name>``);
    ``--tiny`` shrinks the config (``tiny_kwargs`` go to :func:`tiny_config`) before
    ``--cfg-options`` apply, so user overrides win.
    """
    import os.path as osp

    from mmengine.config import Config

    from kim_plugins.dry_run.tiny import tiny_config, tiny_data_root

    cfg = Config.fromfile(args.config)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get("work_dir", None) is None:
        cfg.work_dir = osp.join("./work_dirs", osp.splitext(osp.basename(args.config))[0])
    if args.tiny:
        cfg = tiny_config(cfg, tiny_data_root(cfg, args.tiny), cfg.work_dir, crop_size=tuple(args.tiny_crop),
                          **tiny_kwargs)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    return cfg


def finish_tool_config(cfg, args):
    """The tail shared by the train and test tools: ``--no-pretrained``, visualizer name, launch set-up."""
    from kim_plugins.config.rewrite import offline_weights
    from kim_plugins.mmseg.distributed import setup_launch

    if args.no_pretrained:
        offline_weights(cfg.model)
    fresh_visualizer_name(cfg)
    setup_launch(cfg)
    return cfg


def add_threads_and_seed(parser: argparse.ArgumentParser, seed_help: str) -> None:
    """``--threads`` (torch intra-op threads) and ``--seed`` (default 0), as every diagnostic tool takes them."""
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0, help=seed_help)


def start_run(args: argparse.Namespace) -> None:
    """Check ``--num-images`` (where the tool has it), then apply ``--threads`` and seed torch with ``--seed``.

    Raises:
        SystemExit: ``--num-images`` below 1, with the value given.
    """
    import torch

    if getattr(args, "num_images", 1) < 1:
        raise SystemExit(f"--num-images must be >= 1, got {args.num_images}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # untrained weights are drawn from the global generator

