"""What a config says: its training crop, its datasets, its normalisation, and the segmentor it builds.

One reader per question, shared by the tools (``kim_plugins.cli``), the
resolution-aware heads (:func:`kim_plugins.mmseg.ra_aspp_heads.resolve_auto_dilations`)
and the dry runs (:mod:`kim_plugins.dry_run`):

- :func:`crop_size`: the training crop, with one precedence;
- :func:`dataset_leaves`: the datasets a loader reads, through ``RepeatDataset``
  (``dataset``) and ``ConcatDataset`` (``datasets``) wrappers;
- :func:`segmentor_norm`: the data preprocessor's mean and std;
- :func:`build_segmentor`: the config's segmentor, offline, through
  ``mmseg.apis.init_model``.

Rewriting a config is :mod:`kim_plugins.config.rewrite`. Importing this module
needs neither mmseg nor mmengine (:func:`build_segmentor` imports them).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

__all__ = ["crop_size", "dataset_leaves", "segmentor_norm", "build_segmentor"]

_RESIZE_TYPES = ("Resize", "RandomResize")


def _hw(size: Any) -> Tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _get(d: Any, key: str) -> Any:
    """``d.get(key)`` for a dict, ``ConfigDict`` or ``Config`` (not a dict subclass); else ``None``."""
    return d.get(key) if isinstance(d, dict) or type(d).__name__ == "Config" else None


def _pipeline_crop(cfg: Any) -> Optional[Tuple[int, int]]:
    """``RandomCrop.crop_size`` of the train pipeline, else a fixed ``Resize`` (``keep_ratio=False``)."""
    loader = _get(cfg, "train_dataloader")
    if not isinstance(_get(loader, "dataset"), dict):
        return None
    pipelines = [leaf.get("pipeline") or [] for leaf in dataset_leaves(loader["dataset"])]
    steps = [s for p in pipelines for s in p if isinstance(s, dict)]
    for step in steps:
        if step.get("type") == "RandomCrop" and step.get("crop_size") is not None:
            return _hw(step["crop_size"])
    for step in steps:
        scale = step.get("scale")
        if step.get("type") in _RESIZE_TYPES and step.get("keep_ratio") is False and scale is not None \
                and not isinstance(scale, int) and len(scale) == 2 and all(isinstance(v, int) for v in scale):
            return int(scale[1]), int(scale[0])  # mmcv scales are (w, h)
    return None


def crop_size(cfg: Any) -> Optional[Tuple[int, int]]:
    """The training crop ``(H, W)`` of an mmseg config, or ``None`` when it names none.

    Precedence (the first that is set):

    1. ``model.data_preprocessor.size`` (what the model is fed; what
       ``RAEncoderDecoder`` reads at build time);
    2. the top-level ``data_preprocessor.size``;
    3. the top-level ``crop_size`` variable of mmseg's configs;
    4. the train pipeline's ``RandomCrop.crop_size``, else a fixed-size
       ``Resize(scale=(W, H), keep_ratio=False)`` (through dataset wrappers).

    An int size ``s`` is ``(s, s)``.
    """
    model = _get(cfg, "model")
    for size in (_get(_get(model, "data_preprocessor"), "size"), _get(_get(cfg, "data_preprocessor"), "size"),
                 _get(cfg, "crop_size")):
        if size is not None:
            return _hw(size)
    return _pipeline_crop(cfg)


def dataset_leaves(dataset: Any) -> List[Dict[str, Any]]:
    """The dataset configs a loader's ``dataset`` reads, depth first, through the wrappers.

    A wrapper with ``dataset`` (``RepeatDataset``, ``ClassBalancedDataset``,
    ``MultiImageMixDataset``) or ``datasets`` (``ConcatDataset``) is opened;
    every other dict is a leaf.

    Raises:
        ValueError: A node that is not a dict, or a leaf without ``type``.
    """
    if not isinstance(dataset, dict):
        raise ValueError(f"a dataset config must be a dict, got {type(dataset).__name__}: {dataset!r}")
    if dataset.get("datasets") is not None:
        return [leaf for d in dataset["datasets"] for leaf in dataset_leaves(d)]
    if dataset.get("dataset") is not None:
        return dataset_leaves(dataset["dataset"])
    if not dataset.get("type"):
        raise ValueError(f"dataset config without 'type' (nor a 'dataset'/'datasets' wrapper): {dict(dataset)!r}")
    return [dataset]


def segmentor_norm(cfg: Any) -> Tuple[List[float], List[float], float]:
    """(mean, std, scale): images in [0, scale] RGB are normalised as ``(x - mean) / std``."""
    pre = cfg.model.get("data_preprocessor") or {}
    mean = pre.get("mean") or [0.0, 0.0, 0.0]
    std = pre.get("std") or [1.0, 1.0, 1.0]
    return list(mean), list(std), 255.0


def build_segmentor(cfg: Any, checkpoint: Optional[str] = None, device: Any = "cpu", trust: bool = False) -> Any:
    """The config's segmentor in eval mode on ``device``, SyncBN reverted to BN, nothing downloaded.

    Built by ``mmseg.apis.init_model`` (default scope, ``pretrained=None``,
    ``train_cfg=None``, ``model.cfg``) on a copy of ``cfg`` whose model has
    :func:`~kim_plugins.config.rewrite.offline_weights`. Without ``checkpoint``
    the model gets mmseg's own ``init_weights`` (an untrained initialisation).

    The checkpoint is loaded here rather than by ``init_model``, which reads
    ``checkpoint['meta']`` unconditionally and so fails on a plain state dict;
    ``trust`` (``--trust-checkpoint``) unpickles exactly ``checkpoint`` if safe
    loading refuses it (:func:`kim_plugins.mmseg.resume.checkpoint_loading`).

    Args:
        cfg: A config path or ``mmengine.config.Config`` (not modified).
        checkpoint: Weights to load (``None`` or ``'none'``: none).
        device: Where the model goes.
        trust: Fully unpickle ``checkpoint`` if safe loading refuses it.
    """
    import copy

    from mmengine.config import Config
    from mmengine.model import revert_sync_batchnorm
    from mmengine.runner import load_checkpoint
    from mmseg.apis import init_model

    import kim_plugins.mmseg  # noqa: F401  registrations
    from kim_plugins.config.rewrite import offline_weights
    from kim_plugins.mmseg.resume import checkpoint_loading

    cfg = Config.fromfile(cfg) if isinstance(cfg, str) else copy.deepcopy(cfg)
    offline_weights(cfg.model)
    model = init_model(cfg, checkpoint=None, device="cpu")
    if checkpoint and str(checkpoint).lower() != "none":
        with checkpoint_loading(checkpoint, trust):
            load_checkpoint(model, checkpoint, map_location="cpu")
    else:
        model.init_weights()
    return revert_sync_batchnorm(model).to(device).eval()

