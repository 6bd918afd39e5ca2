"""Tracing the fusions of a decoder: which ``F.interpolate`` outputs enter which concat / add.

A decode head fuses an upsampled map with others by ``torch.cat`` or an
elementwise add; both the scale-equalized heads
(:mod:`kim_plugins.mmseg.se_heads`, which equalize the operands) and the
benchmark suite's variance probe (:class:`kim_plugins.suite.seg.FusionVarianceRecorder`,
which measures them) intercept exactly these calls. :class:`FusionTracingMode`
is that one mechanism: a ``TorchFunctionMode`` that hands every
``F.interpolate`` call, every concat and every add of two tensors to
overridable methods, and remembers tensors it was told about (by identity,
through weak references, so a freed tensor whose id is reused is not
mistaken for it).
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["CONCAT_OPS", "ADD_OPS", "FusionTracingMode"]

#: The torch functions a decoder concatenates with.
CONCAT_OPS = (torch.cat, torch.concat, torch.concatenate)
#: The torch functions a decoder adds two maps with.
ADD_OPS = (torch.Tensor.add, torch.Tensor.__add__, torch.add)


class FusionTracingMode(TorchFunctionMode):
    """Routes ``F.interpolate``, concat and add calls to :meth:`on_interpolate`, :meth:`on_concat`, :meth:`on_add`.

    Subclasses override those hooks; ``on_concat`` / ``on_add`` may return
    replacement operands (``None`` keeps the call as it is). :meth:`mark` /
    :meth:`marked` attach a value to a tensor for the mode's lifetime.
    """

    def __init__(self) -> None:
        super().__init__()
        self._marks: Dict[int, Tuple[Any, Any]] = {}

    def mark(self, t: torch.Tensor, value: Any = True) -> None:
        """Remember ``value`` for tensor ``t`` (by identity)."""
        self._marks[id(t)] = (weakref.ref(t), value)

    def marked(self, t: Any) -> Any:
        """The value :meth:`mark` attached to ``t``, or None."""
        if not isinstance(t, torch.Tensor):
            return None
        entry = self._marks.get(id(t))
        return entry[1] if entry is not None and entry[0]() is t else None

    # ---- hooks --------------------------------------------------------------------------------------------
    def on_interpolate(self, func: Callable, args: Tuple, kwargs: Dict[str, Any]) -> torch.Tensor:
        """Run one ``F.interpolate`` call; the default runs it unchanged."""
        return func(*args, **kwargs)

    def on_concat(self, tensors: List[torch.Tensor]) -> Optional[Sequence[torch.Tensor]]:
        """See the operands of a concat; return replacements or None."""
        return None

    def on_add(self, a: torch.Tensor, b: torch.Tensor) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """See the two operands of an add; return replacements or None."""
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.interpolate:
            return self.on_interpolate(func, tuple(args), kwargs)
        if func in CONCAT_OPS:
            new = self.on_concat(list(args[0] if args else kwargs["tensors"]))
            if new is not None:
                if args:
                    args = (list(new),) + tuple(args[1:])
                else:
                    kwargs = dict(kwargs, tensors=list(new))
        elif func in ADD_OPS and len(args) >= 2 and all(isinstance(a, torch.Tensor) for a in args[:2]):
            new = self.on_add(args[0], args[1])
            if new is not None:
                args = tuple(new) + tuple(args[2:])
        return func(*args, **kwargs)
