"""Loading runner checkpoints on torch >= 2.6: safe by default, trust scoped to one named file.

torch 2.6 changed ``torch.load``'s default to ``weights_only=True``. An
old-style mmengine 0.10.7 runner checkpoint pickles the message hub's
``HistoryBuffer`` objects, numpy scalars and even ``builtins.getattr``, so safe
loading refuses it; allow-listing those classes is not enough, and
allow-listing ``getattr`` would make safe loading unsafe. Checkpoints written
with :mod:`kim_plugins.mmseg` imported keep that state in safe types
(:mod:`kim_plugins.mmseg.weights_only`) and load safely everywhere; this
module handles the old-style ones:

- While :meth:`mmengine.runner.Runner.resume` runs, and only for the exact
  local file it was asked to resume from, the local-file checkpoint loader
  first loads safely and, only if torch refuses, unpickles the file fully
  (logged). ``tools/* --trust-checkpoint`` and :func:`trust_local_checkpoint`
  give a named file the same treatment.
- Every other load keeps torch's safe default: ``load_from`` (which goes
  through ``Runner.load_checkpoint``, not ``resume``), backbone ``pretrained``
  and ``init_cfg`` checkpoints, ``http(s)://`` / ``open-mmlab://`` files, and
  a resume from a URL. When safe loading refuses a local file, the error
  (:func:`weights_only_refusal`) names ``--trust-checkpoint`` and
  :func:`trust_local_checkpoint`.
- No global ``torch.load`` patch (the two patched mmengine places are listed
  in :mod:`kim_plugins.mmseg.compat`).

Security note: unpickling runs arbitrary code, so **only resume from or trust
checkpoint files you trust** — in practice the ones your own runs wrote into
their work dirs (``--resume`` / ``resume=True`` picks ``last_checkpoint``
there). Importing :mod:`kim_plugins.mmseg` applies the scope; it is idempotent.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os.path as osp
import pickle
from typing import Any, Callable, FrozenSet, Iterator, Optional

import torch
from mmengine.logging import print_log
from mmengine.runner import Runner

from .compat import is_local_checkpoint, wrap_local_checkpoint_loader, wrap_method

__all__ = ["TRUST_FLAG", "CheckpointTrustError", "trusted_resume_paths", "trust_local_checkpoint",
           "weights_only_refusal", "is_weights_only_refusal", "install_resume_fix", "checkpoint_loading"]

# Real paths of local files the running ``Runner.resume`` call was asked to load.
_TRUSTED_RESUME_PATHS: contextvars.ContextVar[FrozenSet[str]] = contextvars.ContextVar(
    "kim_plugins_trusted_resume_paths", default=frozenset())

_MARK = "_kim_plugins_resume_fix"


def trusted_resume_paths() -> FrozenSet[str]:
    """The local files that the current ``Runner.resume`` call may fully unpickle (empty outside it)."""
    return _TRUSTED_RESUME_PATHS.get()


def _realpath(filename: str) -> str:
    return osp.realpath(osp.expanduser(filename))


TRUST_FLAG = "--trust-checkpoint"


class CheckpointTrustError(pickle.UnpicklingError):
    """Safe loading refused a checkpoint; the message says why and names the ways to trust the file."""


def weights_only_refusal(path: str, err: BaseException) -> CheckpointTrustError:
    """The error for a checkpoint that safe loading refused: what it is and the two ways to trust it."""
    return CheckpointTrustError(
        f"torch's safe (weights-only) loading refused the checkpoint {path!r}: it pickles objects "
        f"beyond weights (an old-style mmengine runner checkpoint pickles its message hub and numpy "
        f"scalars; checkpoints written with kim_plugins.mmseg imported do not). If you trust this file "
        f"(e.g. your own run's work_dir) and named it on a tool's command line, add {TRUST_FLAG} "
        f"(tools/test.py, train.py, benchmark.py, erf.py, atrous_rates.py); in Python, load it inside "
        f"`with kim_plugins.mmseg.resume.trust_local_checkpoint({path!r}):`; either unpickles exactly "
        f"this file and nothing else. Original error: {str(err).splitlines()[0]}")


def is_weights_only_refusal(err: BaseException) -> bool:
    """Whether ``err`` is torch's own (unexplained) refusal to unpickle a file with ``weights_only=True``."""
    return (isinstance(err, pickle.UnpicklingError) and not isinstance(err, CheckpointTrustError)
            and "Weights only load failed" in str(err))


def _wrap_local_loader(original: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    @functools.wraps(original)
    def load_from_local(filename: str, map_location: Any = None) -> Any:
        path = _realpath(filename)
        if path in _TRUSTED_RESUME_PATHS.get():
            if not osp.isfile(path):
                raise FileNotFoundError(f"{filename} can not be found.")
            try:  # checkpoints written with kim_plugins.mmseg imported need no trust
                return torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as err:
                if not is_weights_only_refusal(err):
                    raise
            # An old-style runner checkpoint being resumed or passed with --trust-checkpoint:
            # full unpickling of exactly this file (trusted, see the module docstring).
            print_log(f"{filename}: an old-style checkpoint that safe loading refuses; unpickling it fully "
                      f"(trusted: resumed, or named with {TRUST_FLAG})", logger="current")
            return torch.load(path, map_location=map_location, weights_only=False)
        try:
            return original(filename, map_location)
        except pickle.UnpicklingError as err:
            if not is_weights_only_refusal(err):
                raise
            raise weights_only_refusal(filename, err) from err

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
    if is_local_checkpoint(filename):
        trusted = trusted | {_realpath(filename)}
    token = _TRUSTED_RESUME_PATHS.set(trusted)
    try:
        yield
    finally:
        _TRUSTED_RESUME_PATHS.reset(token)


def _wrap_resume(original: Callable[..., None]) -> Callable[..., None]:
    def resume(self: Runner, filename: str, *args: Any, **kwargs: Any) -> None:
        with trust_local_checkpoint(filename):
            return original(self, filename, *args, **kwargs)

    setattr(resume, _MARK, True)
    return resume


def install_resume_fix() -> None:
    """Scope ``weights_only=False`` to the local file of ``Runner.resume`` (idempotent)."""
    wrap_local_checkpoint_loader(_wrap_local_loader, _MARK)
    wrap_method(Runner, "resume", _wrap_resume)


install_resume_fix()


@contextlib.contextmanager
def checkpoint_loading(path: Optional[str], trusted: bool) -> Iterator[None]:
    """Run a block that loads ``path`` (``load_from``), trusted or with an explained refusal.

    Every tool that loads a checkpoint as weights stays safe by default and
    takes ``--trust-checkpoint`` for a file the user trusts, which scopes full
    unpickling to exactly that file through :func:`trust_local_checkpoint`;
    without it the refusal names the flag.

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
