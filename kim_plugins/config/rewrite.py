"""Rewriting a config: the in-place edits shared by the tools, the launcher, the dry runs and the tests.

- :func:`offline_weights`: build without downloading or reading ImageNet weights;
- :func:`sync_bn_to_bn`: ``SyncBN`` -> ``BN`` (no process group, or CPU processes);
- :func:`prepare_cpu_distributed`: a multi-process launch on CPUs (gloo, CPU DDP wrapper);
- the dry run (:func:`kim_plugins.dry_run.tiny.tiny_config`) is built from these.

What a config *says* (crop size, dataset leaves, the built segmentor) is read
by :mod:`kim_plugins.config.inspect`. Pure dict walking: importing this module
needs neither mmseg nor mmengine.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List

__all__ = ["TIMM_BACKBONES", "CPU_WRAPPER", "walk_dicts", "sync_bn_to_bn", "offline_weights",
           "prepare_cpu_distributed"]

#: Backbone types that wrap ``timm.create_model`` (mmseg's, and kim_plugins' lazily pretrained one).
TIMM_BACKBONES = ("TIMMBackbone", "LazyPretrainedTIMMBackbone")

#: The CPU-capable DDP wrapper of :mod:`kim_plugins.mmseg.distributed` (registered in ``MODEL_WRAPPERS``).
CPU_WRAPPER = "CPUCapableDistributedDataParallel"
_DDP_TYPES = ("MMDistributedDataParallel", "DistributedDataParallel", CPU_WRAPPER)


def walk_dicts(node: Any, fn: Callable[[Dict[str, Any]], None]) -> None:
    """Call ``fn(d)`` on every dict inside ``node`` (depth first), lists and tuples included."""
    if isinstance(node, dict):
        fn(node)
        for v in list(node.values()):
            walk_dicts(v, fn)
    elif isinstance(node, (list, tuple)):
        for v in node:
            walk_dicts(v, fn)


def sync_bn_to_bn(model_cfg: Dict[str, Any]) -> int:
    """Replace every ``SyncBN`` norm config inside ``model_cfg`` by ``BN`` (in place); return how many."""
    count = 0

    def fix(d: Dict[str, Any]) -> None:
        nonlocal count
        if d.get("type") == "SyncBN":
            d["type"] = "BN"
            count += 1

    walk_dicts(model_cfg, fix)
    return count


def offline_weights(model_cfg: Dict[str, Any]) -> None:
    """Build without downloading or reading ImageNet weights (in place).

    ``pretrained`` strings -> ``None``; ``init_cfg=dict(type='Pretrained', ...)``
    -> ``None``; ``TIMMBackbone`` (and ``LazyPretrainedTIMMBackbone``) -> ``pretrained=False`` without
    ``checkpoint_path``. What ``--no-pretrained`` and ``--tiny`` do to ``cfg.model``: for a run
    without network access or a from-scratch baseline; weights then start from the modules' own
    initialisation.
    """

    def fix(d: Dict[str, Any]) -> None:
        if "pretrained" in d and isinstance(d.get("pretrained"), str):
            d["pretrained"] = None
        if d.get("type") in TIMM_BACKBONES:
            d["pretrained"] = False
            d.pop("checkpoint_path", None)
        init = d.get("init_cfg")
        if isinstance(init, dict) and init.get("type") == "Pretrained":
            d["init_cfg"] = None

    walk_dicts(model_cfg, fix)


def prepare_cpu_distributed(cfg: Any) -> List[str]:
    """Rewrite ``cfg`` in place for a multi-process run on CPUs; return what was changed.

    Call it only for a CPU run with a launcher (see
    :func:`kim_plugins.mmseg.distributed.setup_launch`).

    Changes: ``env_cfg.dist_cfg.backend`` -> ``'gloo'`` (unless ``'gloo'`` or
    ``'mpi'``); every ``SyncBN`` in ``cfg.model`` -> ``BN``; ``cfg.sync_bn``
    removed; ``model_wrapper_cfg`` type -> ``CPUCapableDistributedDataParallel``
    (other arguments kept; mmseg's ``broadcast_buffers=False`` and
    ``find_unused_parameters`` when it was unset); ``SyncBuffersPerIterHook``
    appended to ``custom_hooks`` (both in :mod:`kim_plugins.mmseg.distributed`).

    Raises:
        ValueError: ``model_wrapper_cfg`` names a wrapper that is not a plain
            DDP (e.g. FSDP or ``MMSeparateDistributedDataParallel``), which
            cannot be made CPU-capable.
    """
    from mmengine.config import ConfigDict

    changes: List[str] = []
    env = cfg.get("env_cfg")
    if env is None:
        env = cfg.env_cfg = ConfigDict()
    dist_cfg = env.get("dist_cfg")
    if dist_cfg is None:
        dist_cfg = env.dist_cfg = ConfigDict()
    backend = dist_cfg.get("backend", "nccl")
    if backend not in ("gloo", "mpi"):
        dist_cfg.backend = "gloo"
        changes.append(f"env_cfg.dist_cfg.backend: {backend!r} -> 'gloo'")
    n = sync_bn_to_bn(cfg.model)
    if n:
        changes.append(f"model: {n} SyncBN norm config(s) -> BN (buffers averaged by SyncBuffersPerIterHook)")
    if cfg.get("sync_bn") is not None:
        changes.append(f"sync_bn={cfg.sync_bn!r} removed")
        cfg.sync_bn = None
    wrapper = cfg.get("model_wrapper_cfg")
    if wrapper is None:
        cfg.model_wrapper_cfg = ConfigDict(type=CPU_WRAPPER, broadcast_buffers=False,
                                           find_unused_parameters=cfg.get("find_unused_parameters", False))
        changes.append(f"model_wrapper_cfg: MMDistributedDataParallel -> {CPU_WRAPPER}")
    else:
        wtype = wrapper.get("type", "MMDistributedDataParallel")
        if wtype not in _DDP_TYPES:
            raise ValueError(f"model_wrapper_cfg.type={wtype!r} cannot run on CPU processes; only "
                             f"{_DDP_TYPES} can. Run it on GPUs, or set model_wrapper_cfg.type="
                             f"'{CPU_WRAPPER}'")
        if wtype != CPU_WRAPPER:
            wrapper.type = CPU_WRAPPER
            changes.append(f"model_wrapper_cfg: {wtype} -> {CPU_WRAPPER}")
    hooks = list(cfg.get("custom_hooks") or [])
    if not any(h.get("type") == "SyncBuffersPerIterHook" for h in hooks):
        hooks.append(ConfigDict(type="SyncBuffersPerIterHook"))
        cfg.custom_hooks = hooks
        changes.append("custom_hooks: + SyncBuffersPerIterHook")
    return changes
