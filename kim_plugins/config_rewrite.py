"""In-place rewrites of mmengine config dicts shared by the tools, the launcher and the tests.

Pure dict walking: importing this module needs neither mmseg nor mmengine.
"""
from __future__ import annotations

from typing import Any, Callable, Dict

__all__ = ["TIMM_BACKBONES", "walk_dicts", "sync_bn_to_bn", "offline_weights"]

#: Backbone types that wrap ``timm.create_model`` (mmseg's, and kim_plugins' lazily pretrained one).
TIMM_BACKBONES = ("TIMMBackbone", "LazyPretrainedTIMMBackbone")


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
    ``checkpoint_path``.
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
