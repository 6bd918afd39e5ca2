"""Checkpoint resume for mmengine 0.10.7 on torch >= 2.6, scoped to ``Runner.resume``.

torch 2.6 changed ``torch.load``'s default to ``weights_only=True``. mmengine
0.10.7 does not pass the argument, so ``Runner(resume=True)`` fails on the
runner's own checkpoints (``Weights only load failed ... HistoryBuffer``):
a full runner checkpoint pickles the message hub's ``HistoryBuffer`` objects,
numpy scalars and even ``builtins.getattr``. Allow-listing those classes is not
enough, and allow-listing ``getattr`` would make safe loading unsafe.

What this module does (the same choice as mmengine's later fix, narrower):

- While :meth:`mmengine.runner.Runner.resume` runs, and only for the exact
  local file it was asked to resume from, the local-file checkpoint loader
  uses ``torch.load(..., weights_only=False)``.
- Every other load keeps torch's safe default: ``load_from`` (which goes
  through ``Runner.load_checkpoint``, not ``resume``), backbone ``pretrained``
  and ``init_cfg`` checkpoints, ``http(s)://`` / ``open-mmlab://`` files, and
  a resume from a URL.
- No global ``torch.load`` patch.

Security note: resuming unpickles arbitrary objects, so **only resume from
checkpoint files you trust** — in practice the ones your own runs wrote into
their work dirs (``--resume`` / ``resume=True`` picks ``last_checkpoint``
there). Importing :mod:`kim_plugins.mmseg` applies the scope; it is idempotent.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os.path as osp
from typing import Any, Callable, FrozenSet, Iterator

import torch
from mmengine.runner import Runner
from mmengine.runner.checkpoint import CheckpointLoader

__all__ = ["trusted_resume_paths", "trust_local_checkpoint", "install_resume_fix"]

# Real paths of local files the running ``Runner.resume`` call was asked to load.
_TRUSTED_RESUME_PATHS: contextvars.ContextVar[FrozenSet[str]] = contextvars.ContextVar(
    "kim_plugins_trusted_resume_paths", default=frozenset())

_MARK = "_kim_plugins_resume_fix"


def trusted_resume_paths() -> FrozenSet[str]:
    """The local files that the current ``Runner.resume`` call may fully unpickle (empty outside it)."""
    return _TRUSTED_RESUME_PATHS.get()


def _realpath(filename: str) -> str:
    return osp.realpath(osp.expanduser(filename))


def _wrap_local_loader(original: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    @functools.wraps(original)
    def load_from_local(filename: str, map_location: Any = None) -> Any:
        path = _realpath(filename)
        if path in _TRUSTED_RESUME_PATHS.get():
            if not osp.isfile(path):
                raise FileNotFoundError(f"{filename} can not be found.")
            # A runner checkpoint being resumed: full unpickling (trusted file, see module docstring).
            return torch.load(path, map_location=map_location, weights_only=False)
        return original(filename, map_location)

    setattr(load_from_local, _MARK, True)
    return load_from_local


@contextlib.contextmanager
def trust_local_checkpoint(filename: str) -> Iterator[None]:
    """Within this block, mmengine's local loader fully unpickles exactly ``filename``.

    ``Runner.resume`` runs inside it for the file it resumes; ``tools/test.py
    --trust-checkpoint`` uses it for the checkpoint named on its command line.
    Other files, and non-local paths (``http://``, ``open-mmlab://``, ...), keep
    safe loading. Only use it for files you trust.
    """
    trusted = _TRUSTED_RESUME_PATHS.get()
    if isinstance(filename, str) and CheckpointLoader._get_checkpoint_loader(filename).__name__ \
            == "load_from_local":
        trusted = trusted | {_realpath(filename)}
    token = _TRUSTED_RESUME_PATHS.set(trusted)
    try:
        yield
    finally:
        _TRUSTED_RESUME_PATHS.reset(token)


def _wrap_resume(original: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(original)
    def resume(self: Runner, filename: str, *args: Any, **kwargs: Any) -> None:
        with trust_local_checkpoint(filename):
            return original(self, filename, *args, **kwargs)

    setattr(resume, _MARK, True)
    return resume


def install_resume_fix() -> None:
    """Scope ``weights_only=False`` to the local file of ``Runner.resume`` (idempotent)."""
    local = CheckpointLoader._schemes[""]
    if not getattr(local, _MARK, False):
        CheckpointLoader.register_scheme(prefixes="", loader=_wrap_local_loader(local), force=True)
    if not getattr(Runner.resume, _MARK, False):
        Runner.resume = _wrap_resume(Runner.resume)


install_resume_fix()
