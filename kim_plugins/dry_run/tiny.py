"""Shrink any mmseg config to a CPU-sized dry run on a dataset fixture.

Every config under ``configs/`` is written for its real dataset and GPUs
(SyncBN, AMP, ImageNet-pretrained backbones, 512x1024 crops, 80k iterations).
:func:`tiny_config` rewrites one so that it trains a couple of iterations and
evaluates on CPU on a fixture from :mod:`kim_plugins.dry_run.dataset_fixtures`,
without changing the model's structure (same backbone, head, norms by type,
losses, evaluator). It shrinks the data, not what the model derives from it:

- a head with ``dilations='auto'`` keeps the rates of the full config: a missing
  ``crop_size`` (which ``RAEncoderDecoder`` takes from the data preprocessor's
  ``size``) is pinned to the config's own crop before the preprocessor shrinks,
  so ``output_stride='infer'`` and the rate rule see the real training crop;
- the one exception: a fixed-size timm ViT (``img_size`` without
  ``dynamic_img_size``) gets ``img_size`` = the tiny crop, since it cannot take
  any other input size.

What it rewrites:

- ``data_root`` of every dataset (through ``RepeatDataset``/``ConcatDataset``
  wrappers), small batches, no worker processes;
- resize scales, crop and pad sizes, the data preprocessor's ``size`` and the
  slide-inference window scaled to ``crop_size``;
- ``SyncBN`` -> ``BN`` (no process group on one CPU), ``pretrained=None`` and
  ``init_cfg`` checkpoints dropped, ``TIMMBackbone(pretrained=False)``
  (nothing is downloaded);
- ``AmpOptimWrapper`` -> ``OptimWrapper`` when CUDA is absent;
- an iteration-based loop of ``max_iters`` iterations, evaluated at the end.

The same rewrite, as ``--cfg-options``, is what the README gives users for a
smoke test of a config before a long run (``tools/train.py --tiny DATA_ROOT``).
Nothing here runs at import time beyond mmengine.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Optional, Sequence, Tuple, Union

from mmengine.config import Config, ConfigDict

from kim_plugins.config.inspect import crop_size as config_crop_size
from kim_plugins.config.rewrite import TIMM_BACKBONES, offline_weights, sync_bn_to_bn, walk_dicts

__all__ = ["tiny_config", "tiny_data_root", "run_tiny"]

_RESIZE_TYPES = {"RandomResize", "Resize", "RandomChoiceResize"}


def _shrink_pipeline(pipeline: Sequence[Dict[str, Any]], crop: Tuple[int, int]) -> None:
    h, w = crop
    long_side, short_side = 2 * max(h, w), max(h, w)

    def fix(d: Dict[str, Any]) -> None:
        t = d.get("type")
        if t in _RESIZE_TYPES and "scale" in d and d.get("scale") is not None:
            if isinstance(d["scale"], (list, tuple)) and d["scale"] and isinstance(d["scale"][0], (list, tuple)):
                d["scale"] = [(long_side, short_side)]
            else:
                d["scale"] = (long_side, short_side)
        if t == "RandomCrop":
            d["crop_size"] = (h, w)
        if t == "Pad" and "size" in d:
            d["size"] = (h, w)

    walk_dicts(pipeline, fix)


def _fix_datasets(loader: Dict[str, Any], data_root: str, crop: Tuple[int, int]) -> None:
    def fix(d: Dict[str, Any]) -> None:
        if "data_root" in d:
            d["data_root"] = data_root
        if d.get("type") == "RepeatDataset":
            d["times"] = 1
        if "pipeline" in d:
            _shrink_pipeline(d["pipeline"], crop)

    walk_dicts(loader.get("dataset", {}), fix)


def _pin_auto_dilation_crops(model: Dict[str, Any], crop: Any) -> int:
    """Give every ``dilations='auto'`` head without ``crop_size`` the config's crop (in place); return how many.

    ``RAEncoderDecoder`` and ``resolve_auto_dilations`` take a missing
    ``crop_size`` from the data preprocessor's ``size``, which a tiny run
    shrinks; pinning it first keeps the rates the full config builds.
    """
    if crop is None:
        return 0
    pinned = 0
    for key in ("decode_head", "auxiliary_head"):
        heads = model.get(key)
        for head in heads if isinstance(heads, (list, tuple)) else [heads]:
            if isinstance(head, dict) and head.get("dilations") == "auto" and head.get("crop_size") is None:
                head["crop_size"] = crop if isinstance(crop, int) else tuple(int(c) for c in crop)
                pinned += 1
    return pinned


def tiny_config(cfg: Union[str, Config], data_root: str, work_dir: str, *,
                crop_size: Tuple[int, int] = (64, 64), max_iters: int = 2, batch_size: int = 2,
                seed: int = 0, val_interval: Optional[int] = None, device: Optional[str] = None) -> Config:
    """Return a copy of ``cfg`` that trains ``max_iters`` iterations on a fixture and evaluates.

    Args:
        cfg: A config path or :class:`mmengine.config.Config`.
        data_root: Fixture folder (see ``make_dataset_fixture``) in the layout the config expects.
        work_dir: Where the run writes logs and checkpoints.
        crop_size: (height, width) of training crops, preprocessor size and slide window.
        max_iters: Training iterations.
        batch_size: Training batch size (>= 2 keeps BatchNorm well defined on 1x1 maps).
        seed: Runner seed (``randomness.seed``).
        val_interval: Evaluate every this many iterations (default: once, at ``max_iters``).
        device: ``'cpu'`` forces CPU-only settings; default: CPU settings unless CUDA is available.

    Returns:
        The rewritten config.
    """
    import torch

    cfg = Config.fromfile(cfg) if isinstance(cfg, str) else copy.deepcopy(cfg)
    on_cpu = device == "cpu" or (device is None and not torch.cuda.is_available())
    crop = tuple(int(c) for c in crop_size)

    model = cfg.model
    if on_cpu:
        sync_bn_to_bn(model)
    offline_weights(model)
    backbone = model.get("backbone")
    if isinstance(backbone, dict) and backbone.get("type") in TIMM_BACKBONES and "img_size" in backbone \
            and not backbone.get("dynamic_img_size"):
        backbone["img_size"] = crop  # fixed-size timm ViTs (relpos) must match the tiny crop
    pre = model.get("data_preprocessor")
    _pin_auto_dilation_crops(model, config_crop_size(cfg))
    if isinstance(pre, dict) and pre.get("size") is not None:
        pre["size"] = crop
    if cfg.get("data_preprocessor") is not None and cfg.data_preprocessor.get("size") is not None:
        cfg.data_preprocessor.size = crop
    test_cfg = model.get("test_cfg")
    if isinstance(test_cfg, dict) and test_cfg.get("mode") == "slide":
        test_cfg["crop_size"] = crop
        test_cfg["stride"] = (max(1, crop[0] // 2), max(1, crop[1] // 2))

    for key in ("train_dataloader", "val_dataloader", "test_dataloader"):
        loader = cfg.get(key)
        if loader is None:
            continue
        loader.batch_size = batch_size if key == "train_dataloader" else 1
        loader.num_workers = 0
        loader.persistent_workers = False
        _fix_datasets(loader, data_root, crop)

    cfg.train_cfg = ConfigDict(type="IterBasedTrainLoop", max_iters=max_iters,
                               val_interval=val_interval or max_iters)
    cfg.val_cfg = ConfigDict(type="ValLoop")
    cfg.test_cfg = ConfigDict(type="TestLoop")
    schedulers = cfg.get("param_scheduler") or []
    if isinstance(schedulers, dict):
        schedulers = [schedulers]
    for s in schedulers:
        s["by_epoch"] = False
        s["begin"] = min(int(s.get("begin", 0)), max_iters - 1)
        s["end"] = max_iters
    cfg.param_scheduler = schedulers
    ow = cfg.get("optim_wrapper")
    if ow is not None and on_cpu and ow.get("type") == "AmpOptimWrapper":
        ow.type = "OptimWrapper"
        ow.pop("loss_scale", None)
        ow.pop("dtype", None)

    hooks = cfg.get("default_hooks") or ConfigDict()
    hooks.logger = ConfigDict(type="LoggerHook", interval=1, log_metric_by_epoch=False)
    hooks.checkpoint = ConfigDict(type="CheckpointHook", by_epoch=False, interval=max_iters)
    if "visualization" in hooks:
        hooks.visualization = ConfigDict(type="SegVisualizationHook", draw=False)
    cfg.default_hooks = hooks
    cfg.log_processor = ConfigDict(by_epoch=False)
    if on_cpu:
        env = cfg.get("env_cfg") or ConfigDict()
        env.cudnn_benchmark = False
        env.dist_cfg = ConfigDict(backend="gloo")
        cfg.env_cfg = env
    cfg.randomness = ConfigDict(seed=seed)
    cfg.work_dir = work_dir
    cfg.load_from = None
    cfg.resume = False
    cfg.launcher = "none"
    return cfg


def tiny_data_root(cfg: Config, spec: str) -> str:
    """The data root of ``--tiny SPEC``: a folder, or ``auto`` for a fixture written in the config's layout.

    ``auto`` writes the dataset fixture of the train dataloader's dataset class
    (:func:`kim_plugins.dry_run.dataset_fixtures.fixture_for_config`) under
    ``WORK_DIR/tiny_data/rank<RANK>/`` — one copy per process, identical
    (seeded), so parallel launches never read a half-written file.

    Raises:
        ValueError: ``auto`` for a config whose dataset class has no fixture.
        FileNotFoundError: ``SPEC`` is neither ``auto`` nor an existing folder.
    """
    import os
    import os.path as osp

    from kim_plugins.dry_run.dataset_fixtures import fixture_for_config, make_dataset_fixture

    if spec != "auto":
        if not osp.isdir(spec):
            raise FileNotFoundError(f"--tiny {spec!r}: not a folder; give a small dataset in the config's layout "
                                    f"or 'auto' to write one")
        return spec
    try:
        name = fixture_for_config(cfg)
    except ValueError as err:
        raise ValueError(f"--tiny auto: {err}. Pass --tiny DATA_ROOT instead") from None
    root = osp.join(cfg.work_dir, "tiny_data", f"rank{os.environ.get('RANK', '0')}")
    return make_dataset_fixture(name, root)


def run_tiny(cfg: Config, test: bool = False) -> Dict[str, float]:
    """Train ``cfg`` with mmengine's Runner and return the last evaluation's metrics.

    Args:
        cfg: A config from :func:`tiny_config`.
        test: Also run the test loop; its metrics are returned under ``'test/<name>'``.

    Returns:
        The metrics of the last validation (``{'mIoU': ..., 'aAcc': ..., ...}``).
    """
    import kim_plugins.mmseg  # noqa: F401  registrations, resume fix
    from mmengine.hooks import Hook
    from mmengine.runner import Runner

    caught: Dict[str, float] = {}

    class _CatchMetrics(Hook):
        priority = "LOWEST"

        def after_val_epoch(self, runner, metrics=None):
            caught.update(metrics or {})

        def after_test_epoch(self, runner, metrics=None):
            caught.update({f"test/{k}": v for k, v in (metrics or {}).items()})

    runner = Runner.from_cfg(cfg)
    runner.register_hook(_CatchMetrics())
    runner.train()
    if test:
        runner.test()
    return dict(caught)
