"""Wrap a library class's method once: the one mechanism behind kim_plugins' runner and segmentor adaptations.

Importing a module twice (or reloading it) must not stack the same wrapper, so
each wrapper is marked with the name of the function that made it.
"""
from __future__ import annotations

import functools
from typing import Callable

__all__ = ["wrap_method"]

_MARK = "_kim_plugins_wrapped_by"


def wrap_method(owner: type, name: str, make_wrapper: Callable[[Callable], Callable]) -> None:
    """``owner.name = make_wrapper(owner.name)`` unless a wrapper from ``make_wrapper`` is already there.

    Args:
        owner: The class whose method is wrapped (e.g. ``mmengine.runner.Runner``).
        name: The method's name.
        make_wrapper: Takes the current method, returns the replacement (``functools.wraps`` is applied).
    """
    current = getattr(owner, name)
    tag = f"{make_wrapper.__module__}.{make_wrapper.__qualname__}"
    if getattr(current, _MARK, None) == tag:
        return
    wrapped = functools.wraps(current)(make_wrapper(current))
    setattr(wrapped, _MARK, tag)
    setattr(owner, name, wrapped)
