"""Runner checkpoints that ``torch.load(weights_only=True)`` accepts, so every loader reads them safely.

torch >= 2.6 loads with ``weights_only=True`` by default, and a checkpoint that
mmengine 0.10.7's runner writes is refused: besides tensors and plain Python
values it pickles the message hub's training state -- ``HistoryBuffer``
objects holding numpy arrays, and numpy scalars (the runtime info's ``eta``,
a ``save_best`` score) -- whose unpickling needs ``numpy``'s reconstructors
and ``builtins.getattr``.
So mmseg's own ``tools/test.py``, ``mmseg.apis.init_model``, ``load_from`` and
any script calling ``torch.load`` fail on a checkpoint of one's own run.

The fix is at the source: :class:`WeightsOnlyCheckpointHook` rewrites, in
``before_save_checkpoint`` (after every other hook added its part), each such
object into a tagged dict of tensors and plain values
(:func:`to_weights_only`), and turns the tags back into the original objects
in ``after_load_checkpoint`` (:func:`from_weights_only`), so ``Runner.resume``
restores exactly what was saved: numpy arrays and scalars keep their dtype and
value bit for bit. Only these types are rewritten: the weights, the optimizer
and the scheduler states already are tensors and plain values and are left as
they are. Anything else that safe loading would refuse is reported when the
checkpoint is written, naming its place in the checkpoint.

Importing :mod:`kim_plugins.mmseg` adds the hook to every runner as the
default hook ``weights_only_checkpoint`` (visible in the runner's hook list);
``default_hooks = dict(weights_only_checkpoint=None)`` in a config turns it
off (mmengine's way of removing a default hook). A reader without kim_plugins
still loads the weights; only the log history of a resumed run would then be
skipped by mmengine (with its own warning).
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from mmengine.hooks import Hook
from mmengine.logging import HistoryBuffer, print_log
from mmengine.registry import HOOKS
from mmengine.runner import Runner

from .compat import history_buffer_arrays, wrap_method

__all__ = ["TAG", "to_weights_only", "from_weights_only", "WeightsOnlyCheckpointHook",
           "install_weights_only_checkpoints"]

#: Key marking a dict that stands for an object safe loading would refuse.
TAG = "__kim_plugins_weights_only__"
_DEFAULT_HOOK_NAME = "weights_only_checkpoint"
_PLAIN = (str, bytes, int, float, bool, complex, type(None), torch.Tensor, torch.dtype, torch.device, torch.Size)


def _numpy_to_tensor(value: np.ndarray) -> Optional[torch.Tensor]:
    """An exact tensor copy of a numeric numpy array, or None when torch has no such dtype."""
    try:
        return torch.from_numpy(np.array(value, order="C", copy=True))  # 0-d stays 0-d
    except TypeError:
        return None


def _values(obj: Any) -> List[Any]:
    return list(obj.values()) if isinstance(obj, dict) else list(obj)


def _rebuilt(obj: Any, items: List[Tuple[Any, Any]], changed: bool) -> Any:
    """``obj`` itself when nothing inside changed (keeps e.g. a state dict's ``_metadata``), else a copy."""
    if not changed:
        return obj
    if isinstance(obj, dict):
        return OrderedDict(items) if isinstance(obj, OrderedDict) else dict(items)
    return type(obj)(v for _, v in items)


def to_weights_only(obj: Any, path: str = "checkpoint", unsafe: Optional[List[str]] = None) -> Any:
    """``obj`` with ``HistoryBuffer``s and numeric numpy arrays / scalars replaced by tagged dicts.

    The result holds only what ``torch.load(weights_only=True)`` accepts,
    except objects of other types, which are kept and whose places are
    appended to ``unsafe``. A container is copied only when something inside
    it changed (an ``OrderedDict`` stays one, another dict subclass becomes a
    dict); tensors are shared, never copied.

    Args:
        obj: A checkpoint or any part of one.
        path: Where ``obj`` sits (for the ``unsafe`` report).
        unsafe: Collects the places of objects that stay unsafe.

    Returns:
        The rewritten object (``obj`` itself when nothing needed rewriting).
    """
    unsafe = [] if unsafe is None else unsafe
    if isinstance(obj, _PLAIN) and not isinstance(obj, np.generic):  # np.float64 is a float subclass
        return obj
    if isinstance(obj, HistoryBuffer):
        log, count = (_numpy_to_tensor(a) for a in history_buffer_arrays(obj))
        if log is not None and count is not None:
            return {TAG: "HistoryBuffer", "log_history": log, "count_history": count,
                    "max_length": int(obj.max_length)}
    elif isinstance(obj, np.ndarray):
        t = _numpy_to_tensor(obj)
        if t is not None:
            return {TAG: "ndarray", "data": t}
    elif isinstance(obj, np.generic):
        t = _numpy_to_tensor(np.asarray(obj))
        if t is not None:
            return {TAG: "numpy_scalar", "data": t}
    elif isinstance(obj, (dict, list, tuple)):
        pairs = obj.items() if isinstance(obj, dict) else enumerate(obj)
        items = [(k, to_weights_only(v, f"{path}[{k!r}]", unsafe)) for k, v in pairs]
        plain_type = type(obj) in (dict, OrderedDict, list, tuple)
        return _rebuilt(obj, items, not plain_type or any(a is not b for (_, a), b in zip(items, _values(obj))))
    unsafe.append(f"{path}: {type(obj).__module__}.{type(obj).__qualname__}")
    return obj


def from_weights_only(obj: Any) -> Any:
    """The inverse of :func:`to_weights_only`: tagged dicts back to ``HistoryBuffer`` / numpy objects.

    Raises:
        ValueError: A tag this version does not know.
    """
    if isinstance(obj, dict) and TAG in obj:
        kind = obj[TAG]
        if kind == "HistoryBuffer":
            return HistoryBuffer(obj["log_history"].numpy(), obj["count_history"].numpy(), obj["max_length"])
        if kind == "ndarray":
            return obj["data"].numpy()
        if kind == "numpy_scalar":
            return obj["data"].numpy()[()]
        raise ValueError(f"unknown {TAG} entry {kind!r} in a checkpoint (written by a newer kim_plugins?)")
    if isinstance(obj, (dict, list, tuple)) and type(obj) in (dict, OrderedDict, list, tuple):
        pairs = obj.items() if isinstance(obj, dict) else enumerate(obj)
        items = [(k, from_weights_only(v)) for k, v in pairs]
        return _rebuilt(obj, items, any(a is not b for (_, a), b in zip(items, _values(obj))))
    return obj


@HOOKS.register_module()
class WeightsOnlyCheckpointHook(Hook):
    """Write runner checkpoints that ``torch.load(weights_only=True)`` reads; restore them on load.

    ``before_save_checkpoint``: the message hub's ``HistoryBuffer``s and any
    numpy array or scalar become tagged dicts of tensors (exact values and
    dtypes); objects of any other type that safe loading would refuse are
    named in a warning. ``after_load_checkpoint`` (``Runner.resume`` and
    ``load_from``) turns the tags back. Added to every runner by importing
    :mod:`kim_plugins.mmseg` (default hook ``weights_only_checkpoint``; set it
    to ``None`` in ``default_hooks`` to write mmengine's plain format).
    """

    priority = "LOWEST"  # after every hook that adds to the checkpoint (EMA, ...)

    def before_save_checkpoint(self, runner: Any, checkpoint: dict) -> None:
        unsafe: List[str] = []
        for key in list(checkpoint):
            checkpoint[key] = to_weights_only(checkpoint[key], f"checkpoint[{key!r}]", unsafe)
        if unsafe:
            print_log(f"WeightsOnlyCheckpointHook: this checkpoint still holds objects that torch.load("
                      f"weights_only=True) refuses, so loading it will need trust (--trust-checkpoint): "
                      f"{unsafe}", logger="current", level=logging.WARNING)

    def after_load_checkpoint(self, runner: Any, checkpoint: dict) -> None:
        for key in list(checkpoint):
            checkpoint[key] = from_weights_only(checkpoint[key])


def _register_hooks_with_weights_only(original: Callable[..., None]) -> Callable[..., None]:
    def register_hooks(self: Runner, default_hooks: Optional[Dict[str, Any]] = None,
                       custom_hooks: Optional[List[Any]] = None) -> None:
        hooks = dict(default_hooks or {})
        listed = any(isinstance(h, WeightsOnlyCheckpointHook) or (isinstance(h, dict) and h.get("type") in (
            "WeightsOnlyCheckpointHook", WeightsOnlyCheckpointHook)) for h in (custom_hooks or []))
        if _DEFAULT_HOOK_NAME in hooks and hooks[_DEFAULT_HOOK_NAME] is None:
            del hooks[_DEFAULT_HOOK_NAME]  # opted out (mmengine asserts on None for names it does not know)
        elif not listed:
            hooks.setdefault(_DEFAULT_HOOK_NAME, WeightsOnlyCheckpointHook())
        return original(self, hooks, custom_hooks)

    return register_hooks


def install_weights_only_checkpoints() -> None:
    """Add :class:`WeightsOnlyCheckpointHook` to every runner built from now on (idempotent)."""
    wrap_method(Runner, "register_hooks", _register_hooks_with_weights_only)


install_weights_only_checkpoints()
