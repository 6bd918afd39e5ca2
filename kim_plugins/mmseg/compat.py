"""Every place where kim_plugins reaches into mmengine / mmseg internals, and the versions it was checked against.

Checked against **mmengine 0.10.7**, **mmsegmentation 1.2.2** and **mmcv
2.1.0** (the versions ``setup.py`` pins; torch >= 2.6 for the checkpoint
entries). ``tests/test_compat.py`` asserts, for each entry, the library
features it relies on (the attribute exists, the signature, the lines of
source the entry imitates), so a different version fails there first, naming
the entry to re-check. Feature modules reach the libraries' internals only
through the functions below.

1. **Local checkpoint loader** (:func:`wrap_local_checkpoint_loader`,
   :func:`is_local_checkpoint`; used by :mod:`.resume`). Why: torch >= 2.6
   loads with ``weights_only=True``, which refuses an old-style runner
   checkpoint; the local-file loader is wrapped so that exactly one trusted
   file may be unpickled fully. Relies on: ``CheckpointLoader._schemes['']``
   is the local loader ``load_from_local(filename, map_location)``;
   ``CheckpointLoader.register_scheme(prefixes, loader, force)`` replaces it;
   ``CheckpointLoader._get_checkpoint_loader(path)`` returns the loader
   function a path goes to.
2. **``Runner.resume(filename, ...)``** (:func:`wrap_method`; :mod:`.resume`).
   Why: the file ``resume`` loads is the one trusted file (entry 1). Relies
   on: ``resume``'s first argument is the checkpoint path and it loads it
   through ``CheckpointLoader`` (``load_checkpoint``); ``load_from`` goes
   through ``Runner.load_checkpoint``, not ``resume``.
3. **``Runner.register_hooks(default_hooks, custom_hooks)``**
   (:func:`wrap_method`, :func:`history_buffer_arrays`; :mod:`.weights_only`).
   Why: every runner gets the default hook ``weights_only_checkpoint`` that
   writes checkpoints torch's safe loading accepts. Relies on: that signature; ``HistoryBuffer(
   log_history, count_history, max_length)`` and its ``_log_history`` /
   ``_count_history`` / ``max_length`` attributes (numpy arrays, int).
4. **mmseg ``BaseSegmentor.test_step(data)``** (:func:`wrap_method`;
   :mod:`.se_inference`). Why: fold the scale equalizers where a segmentor is
   used for inference only. Relies on: ``Runner.test`` and
   ``mmseg.apis.inference_model`` call ``test_step``, validation calls
   ``val_step`` (mmseg 1.2.2).
5. **FLOP / activation op tables** (:func:`register_op_handle`;
   :mod:`.complexity`). Why: mmengine's ``FlopAnalyzer`` has no handle for
   ``aten::scaled_dot_product_attention``, so fused attention counted 0.
   Relies on: the module dicts ``mmengine.analysis.complexity_analysis.
   _DEFAULT_SUPPORTED_FLOP_OPS`` / ``_DEFAULT_SUPPORTED_ACT_OPS`` (copied by
   every ``FlopAnalyzer``), ``jit_handles.get_shape``,
   ``generic_activation_jit``.
6. **Launcher environment** (:func:`set_launcher_environment`;
   :mod:`.distributed`). Why: ``mmengine.dist.init_dist`` calls
   ``torch.cuda.set_device`` unconditionally, so a CPU machine cannot start a
   process group; this is the environment handling of mmengine's
   ``_init_dist_slurm`` / ``_init_dist_mpi`` without the CUDA calls. Also
   :class:`~.distributed.CPUCapableDistributedDataParallel` drops the
   ``device_ids`` that ``Runner.wrap_model`` always passes. Relies on: the
   variables those functions read and set (``SLURM_PROCID``,
   ``SLURM_NTASKS``, ``SLURM_NODELIST``, ``SLURM_LOCALID``, ``scontrol show
   hostname``, ``OMPI_COMM_WORLD_{SIZE,RANK,LOCAL_RANK}``, ``MASTER_PORT``
   default ``29500``) and ``wrap_model``'s ``device_ids=[LOCAL_RANK]``.
7. **Runner device** (:func:`runner_device`; the benchmark suite). Why: the
   runner puts models on CUDA whenever it exists; a suite run on the CPU of a
   GPU machine has to say otherwise. Relies on: the module global
   ``mmengine.device.utils.DEVICE``, which ``get_device()`` returns.
8. **``InfiniteSampler._indices_of_rank()``** (:func:`infinite_sampler_indices`;
   :mod:`.se_hook`). Why: the calibration sampler is mmengine's infinite
   sampler restarted on every pass (the public ``__iter__`` continues one
   generator made in ``__init__``). Relies on: the method yielding the
   seeded, rank-strided stream of ``self.rank`` / ``self.world_size``.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
from typing import Any, Callable, Iterator, Optional, Tuple

from mmengine.runner.checkpoint import CheckpointLoader

from .method_wrapping import wrap_method

__all__ = ["CHECKED_VERSIONS", "wrap_method", "wrap_local_checkpoint_loader", "is_local_checkpoint",
           "history_buffer_arrays", "register_op_handle", "set_launcher_environment", "runner_device",
           "infinite_sampler_indices"]

#: The library versions every entry of this module was checked against.
CHECKED_VERSIONS = {"mmengine": "0.10.7", "mmseg": "1.2.2", "mmcv": "2.1.0"}


# 1. ------------------------------------------------------------------ local checkpoint loader

def wrap_local_checkpoint_loader(make_loader: Callable[[Callable[..., Any]], Callable[..., Any]],
                                 mark: str) -> None:
    """Replace mmengine's local-file checkpoint loader by ``make_loader(current)``, unless it carries ``mark``."""
    local = CheckpointLoader._schemes[""]
    if not getattr(local, mark, False):
        CheckpointLoader.register_scheme(prefixes="", loader=make_loader(local), force=True)


def is_local_checkpoint(filename: Any) -> bool:
    """Whether mmengine loads ``filename`` with its local-file loader (not ``http://``, ``open-mmlab://``, ...)."""
    return (isinstance(filename, str)
            and CheckpointLoader._get_checkpoint_loader(filename).__name__ == "load_from_local")


# 3. ------------------------------------------------------------------ message hub history

def history_buffer_arrays(buffer: Any) -> Tuple[Any, Any]:
    """The ``(log_history, count_history)`` numpy arrays of an mmengine ``HistoryBuffer``."""
    return buffer._log_history, buffer._count_history


# 5. ------------------------------------------------------------------ FLOP / activation op tables

def register_op_handle(op: str, flop_handle: Callable[..., Any]) -> None:
    """Count ``op`` with ``flop_handle`` in every mmengine ``FlopAnalyzer``; activations: the output size."""
    from mmengine.analysis import complexity_analysis as ca
    from mmengine.analysis.jit_handles import generic_activation_jit

    ca._DEFAULT_SUPPORTED_FLOP_OPS[op] = flop_handle
    ca._DEFAULT_SUPPORTED_ACT_OPS.setdefault(op, generic_activation_jit())


# 6. ------------------------------------------------------------------ launcher environment

def set_launcher_environment(launcher: str, port: Optional[int] = None) -> None:
    """Set ``MASTER_*``, ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` from a launcher as mmengine does, without CUDA.

    ``pytorch`` (torchrun) sets them itself; ``slurm`` derives them from
    ``SLURM_*`` (``MASTER_PORT``: ``port``, the environment, or 29500);
    ``mpi`` from ``OMPI_COMM_WORLD_*`` (``MASTER_ADDR`` must be set).

    Raises:
        KeyError: A required environment variable is missing.
    """
    env = os.environ
    if launcher == "slurm":
        proc_id = int(env["SLURM_PROCID"])
        if port is not None:
            env["MASTER_PORT"] = str(port)
        env.setdefault("MASTER_PORT", "29500")
        if "MASTER_ADDR" not in env:
            node_list = env["SLURM_NODELIST"]
            env["MASTER_ADDR"] = subprocess.getoutput(f"scontrol show hostname {node_list} | head -n1")
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env["RANK"] = str(proc_id)
    elif launcher == "mpi":
        env.setdefault("MASTER_PORT", "29500")
        if "MASTER_ADDR" not in env:
            raise KeyError("The environment variable MASTER_ADDR is not set")
        env["WORLD_SIZE"] = env["OMPI_COMM_WORLD_SIZE"]
        env["RANK"] = env["OMPI_COMM_WORLD_RANK"]
        env["LOCAL_RANK"] = env["OMPI_COMM_WORLD_LOCAL_RANK"]


# 7. ------------------------------------------------------------------ runner device

@contextlib.contextmanager
def runner_device(device: str) -> Iterator[None]:
    """Within the block, mmengine's ``get_device()`` (so the runner) answers ``'cuda'`` or ``'cpu'`` per ``device``."""
    import mmengine.device.utils as du

    old = du.DEVICE
    du.DEVICE = "cuda" if device.startswith("cuda") else "cpu"
    try:
        yield
    finally:
        du.DEVICE = old


# 8. ------------------------------------------------------------------ infinite sampler

def infinite_sampler_indices(sampler: Any) -> Iterator[int]:
    """A fresh pass of an mmengine ``InfiniteSampler``'s seeded, rank-strided index stream."""
    return sampler._indices_of_rank()
