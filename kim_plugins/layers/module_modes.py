"""Switch a model's train / eval modes for a while and put every submodule's mode back afterwards.

One helper for the places that run a model in another mode than its caller
left it in (the ERF measurement, the dummy forward that infers a head's
output stride, the scale-equalizer calibration).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch.nn as nn

__all__ = ["restored_modes", "eval_mode"]


@contextlib.contextmanager
def restored_modes(*modules: Optional[nn.Module]) -> Iterator[None]:
    """On exit, set the ``training`` flag of every submodule of ``modules`` back to its value on entry.

    The block may switch modes freely. The flags are restored directly, not
    through ``train()``, so a ``train()`` override (frozen stages, norm_eval)
    does not run again and each submodule gets exactly its old flag back.
    ``None`` entries are ignored.
    """
    saved = [(m, m.training) for module in modules if module is not None for m in module.modules()]
    try:
        yield
    finally:
        for m, mode in saved:
            m.training = mode


@contextlib.contextmanager
def eval_mode(*modules: Optional[nn.Module]) -> Iterator[None]:
    """Put ``modules`` (every submodule, through ``eval()``) in eval mode and restore each mode after."""
    with restored_modes(*modules):
        for module in modules:
            if module is not None:
                module.eval()
        yield
