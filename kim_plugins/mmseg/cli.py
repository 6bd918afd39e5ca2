"""Pieces shared by the command-line tools (``tools/train.py``, ``test.py``, ``benchmark.py``, ``erf.py``, ...).

Checkpoint trust policy (torch >= 2.6 loads with ``weights_only=True``):
checkpoints written with :mod:`kim_plugins.mmseg` imported load safely
(:mod:`kim_plugins.mmseg.weights_only`). An old-style runner checkpoint
pickles its message hub (``HistoryBuffer``, numpy scalars,
``builtins.getattr``), so safe loading refuses it. Resuming one's own run is
trusted automatically (:mod:`kim_plugins.mmseg.resume`). Every tool that
loads a checkpoint as weights stays safe by default and takes
``--trust-checkpoint`` for a file the user trusts, which scopes full
unpickling to exactly that file through
:func:`~kim_plugins.mmseg.resume.trust_local_checkpoint`; without it the
refusal names the flag.
"""
from __future__ import annotations

import contextlib
import pickle
from typing import Iterator, Optional

from kim_plugins.config_rewrite import offline_weights

from .resume import TRUST_FLAG, is_weights_only_refusal, trust_local_checkpoint, weights_only_refusal

__all__ = ["TRUST_FLAG", "add_trust_argument", "checkpoint_loading", "fresh_visualizer_name", "drop_pretrained",
           "tiny_data_root"]


def add_trust_argument(parser) -> None:
    """``--trust-checkpoint``, worded the same in every tool that loads a checkpoint."""
    parser.add_argument(TRUST_FLAG, action="store_true",
                        help="fully unpickle the named checkpoint(s) if safe loading refuses them (old-style runner "
                             "checkpoints you trust, e.g. from your own work_dir); nothing else is unpickled")


@contextlib.contextmanager
def checkpoint_loading(path: Optional[str], trusted: bool) -> Iterator[None]:
    """Run a block that loads ``path`` (``load_from``), trusted or with an explained refusal.

    Args:
        path: The checkpoint the block loads (``None``: nothing to load).
        trusted: The user passed ``--trust-checkpoint``: fully unpickle exactly
            ``path`` if safe loading refuses it.

    Raises:
        pickle.UnpicklingError: Safe loading refused a file and ``trusted`` is
            False; the message names ``--trust-checkpoint`` (the original error
            is chained).
    """
    if not path:
        yield
        return
    if trusted:
        with trust_local_checkpoint(path):
            yield
        return
    try:
        yield
    except pickle.UnpicklingError as err:
        if not is_weights_only_refusal(err):
            raise  # already explained by the local loader, or another failure
        raise weights_only_refusal(path, err) from err


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


def drop_pretrained(cfg) -> None:
    """``--no-pretrained``: build the model without downloading or reading ImageNet weights (in place).

    ``pretrained`` strings -> ``None``, ``init_cfg=dict(type='Pretrained', ...)``
    -> ``None``, ``TIMMBackbone(pretrained=False)`` without ``checkpoint_path`` —
    the same rewrite as ``tools/train.py --tiny``. For a run without network
    access or a from-scratch baseline; weights then start from the modules'
    own initialisation.
    """
    offline_weights(cfg.model)


def tiny_data_root(cfg, spec: str) -> str:
    """The data root of ``--tiny SPEC``: a folder, or ``auto`` for a fixture written in the config's layout.

    ``auto`` writes the dataset fixture of the train dataloader's dataset class
    (``kim_plugins.testing.dataset_fixtures``) under
    ``WORK_DIR/tiny_data/rank<RANK>/`` — one copy per process, identical
    (seeded), so parallel launches never read a half-written file.

    Raises:
        ValueError: ``auto`` for a config whose dataset class has no fixture.
        FileNotFoundError: ``SPEC`` is neither ``auto`` nor an existing folder.
    """
    import os
    import os.path as osp

    from kim_plugins.testing.dataset_fixtures import FIXTURES, make_dataset_fixture

    if spec != "auto":
        if not osp.isdir(spec):
            raise FileNotFoundError(f"--tiny {spec!r}: not a folder; give a small dataset in the config's layout "
                                    f"or 'auto' to write one")
        return spec

    def leaves(ds):
        if "datasets" in ds:
            return [t for d in ds["datasets"] for t in leaves(d)]
        if "dataset" in ds:
            return leaves(ds["dataset"])
        return [ds.get("type")]

    by_class = {s.mmseg_class: name for name, s in FIXTURES.items()}
    types = set(leaves(cfg.train_dataloader.dataset))
    names = {by_class.get(t) for t in types}
    if len(names) != 1 or None in names:
        raise ValueError(f"--tiny auto: no dataset fixture for {sorted(types)}; fixtures exist for "
                         f"{sorted(by_class)}. Pass --tiny DATA_ROOT instead")
    root = osp.join(cfg.work_dir, "tiny_data", f"rank{os.environ.get('RANK', '0')}")
    return make_dataset_fixture(names.pop(), root)


def load_tool_config(args, **tiny_kwargs):
    """The head shared by ``tools/train.py`` and ``tools/test.py``: load, work_dir, ``--tiny``, overrides.

    work_dir is resolved as in mmseg (CLI > config > ``./work_dirs/<config name>``);
    ``--tiny`` shrinks the config (``tiny_kwargs`` go to :func:`tiny_config`) before
    ``--cfg-options`` apply, so user overrides win.
    """
    import os.path as osp

    from mmengine.config import Config

    from kim_plugins.testing.tiny import tiny_config

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
    from .distributed import setup_launch

    if args.no_pretrained:
        drop_pretrained(cfg)
    fresh_visualizer_name(cfg)
    setup_launch(cfg)
    return cfg
