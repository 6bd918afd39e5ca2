"""Multi-process training and testing on CPUs as well as GPUs (mmengine 0.10.7).

mmseg's launch path only works on GPUs. On a machine without an accelerator,
``tools/dist_train.sh CONFIG 2`` with stock mmengine 0.10.7 fails four ways:

1. ``mmengine.dist.init_dist`` calls ``torch.cuda.set_device(local_rank)``
   unconditionally (``Found no NVIDIA driver``; with slurm it even computes
   ``proc_id % torch.cuda.device_count()``, a division by zero);
2. mmseg's ``default_runtime.py`` asks for the ``nccl`` backend, which has no
   CPU tensors;
3. ``Runner.wrap_model`` passes ``device_ids=[LOCAL_RANK]`` to
   ``DistributedDataParallel``, which DDP rejects for a CPU module;
4. ``SyncBN`` (``torch.nn.SyncBatchNorm``) raises on CPU tensors.

This module handles each one explicitly, and only when no accelerator is
present (``mmengine.device.get_device() == 'cpu'``, e.g. no GPU or
``CUDA_VISIBLE_DEVICES=''``); with a GPU nothing here changes anything:

- :func:`init_cpu_dist` initialises a ``gloo`` process group from the
  ``pytorch`` (torchrun), ``slurm`` or ``mpi`` environment, as mmengine does
  but without selecting a CUDA device. The runner then finds the group
  initialised and skips its own ``init_dist``.
- :func:`~kim_plugins.config.rewrite.prepare_cpu_distributed` (the config
  part, in :mod:`kim_plugins.config.rewrite`; re-exported here) rewrites a config for a CPU multi-process run:
  ``env_cfg.dist_cfg.backend='gloo'``, ``SyncBN`` -> ``BN`` in the model,
  ``sync_bn`` dropped, the model wrapper switched to
  :class:`CPUCapableDistributedDataParallel`, and
  :class:`SyncBuffersPerIterHook` added.
- :class:`CPUCapableDistributedDataParallel` (registered in mmengine's
  ``MODEL_WRAPPERS``) is ``MMDistributedDataParallel`` that, for a module on
  the CPU, drops ``device_ids``/``output_device`` and reverts any remaining
  ``SyncBatchNorm`` module to BN; for a module on a GPU it is exactly
  ``MMDistributedDataParallel``.
- :func:`setup_launch` does both for the tools (``tools/train.py``,
  ``tools/test.py``) before the runner is built.

BN running-statistics policy. mmseg wraps models with
``broadcast_buffers=False`` (kept here, on CPU and GPU). On GPUs the configs
use SyncBN, whose batch statistics are global, so every rank's running mean
and variance stay identical. On CPU, SyncBN becomes per-process BN, so each
rank would track its own shard. :class:`SyncBuffersPerIterHook` restores the
agreement: after every training iteration it averages the floating-point
buffers over the ranks (one coalesced all-reduce of the BN buffers, a few
kilobytes per layer). Because a running mean is an exponential moving
average, averaging it every step makes it exactly SyncBN's running mean (equal
per-rank batches); the running variance becomes the mean of the per-rank
variances (SyncBN's also counts the spread between rank means). All ranks, and
every checkpoint, then hold the same buffers. Parameters and optimizer state
agree because DDP averages gradients.
"""
from __future__ import annotations

import datetime
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as torch_dist
from mmengine.config import Config
from mmengine.device import get_device
from mmengine.dist import all_reduce_params, is_distributed
from mmengine.hooks import SyncBuffersHook
from mmengine.logging import print_log
from mmengine.model import MMDistributedDataParallel, revert_sync_batchnorm
from mmengine.registry import HOOKS, MODEL_WRAPPERS

from kim_plugins.config.rewrite import prepare_cpu_distributed

from .compat import set_launcher_environment

__all__ = [
    "accelerator_absent",
    "init_cpu_dist",
    "prepare_cpu_distributed",
    "setup_launch",
    "CPUCapableDistributedDataParallel",
    "SyncBuffersPerIterHook",
]

_LAUNCHERS = ("pytorch", "slurm", "mpi")


def accelerator_absent() -> bool:
    """True when mmengine would run on the CPU (no CUDA/NPU/MLU/MUSA device visible)."""
    return get_device() == "cpu"


# --------------------------------------------------------------------------- process group

def init_cpu_dist(launcher: str, backend: str = "gloo", port: Optional[int] = None,
                  init_backend: str = "torch", **kwargs: Any) -> None:
    """Initialise a CPU process group from a launcher's environment, without touching CUDA.

    The environment handling is mmengine's (``mmengine/dist/utils.py``, as
    :func:`kim_plugins.mmseg.compat.set_launcher_environment`): ``pytorch``
    reads torchrun's ``RANK``/``WORLD_SIZE``/``MASTER_*``; ``slurm`` derives
    them from ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_NODELIST``
    (``MASTER_PORT`` from ``port``, the environment, or 29500); ``mpi`` from
    ``OMPI_COMM_WORLD_*`` (``MASTER_ADDR`` must be set).

    Args:
        launcher: ``'pytorch'``, ``'slurm'`` or ``'mpi'``.
        backend: A CPU-capable backend: ``'gloo'`` (default) or ``'mpi'``.
        port: Master port for ``slurm``.
        init_backend: Only ``'torch'`` (``init_process_group``) is supported on CPU.
        **kwargs: Passed to ``torch.distributed.init_process_group``;
            ``timeout`` in seconds, as in mmseg's ``dist_cfg``.

    Raises:
        ValueError: Unknown launcher, a GPU-only backend, or another ``init_backend``.
        KeyError: A required environment variable is missing.
    """
    if launcher not in _LAUNCHERS:
        raise ValueError(f"launcher {launcher!r} is not one of {_LAUNCHERS}")
    if backend not in ("gloo", "mpi"):
        raise ValueError(f"backend {backend!r} cannot run on CPU; use 'gloo' (env_cfg.dist_cfg.backend='gloo')")
    if init_backend != "torch":
        raise ValueError(f"init_backend {init_backend!r} is not supported on CPU; use 'torch'")
    if kwargs.get("timeout") is not None and not isinstance(kwargs["timeout"], datetime.timedelta):
        kwargs["timeout"] = datetime.timedelta(seconds=kwargs["timeout"])
    set_launcher_environment(launcher, port)
    torch_dist.init_process_group(backend=backend, **kwargs)


# --------------------------------------------------------------------------- launch

def setup_launch(cfg: Config) -> List[str]:
    """Make a config with ``cfg.launcher != 'none'`` launchable here; a no-op on GPUs.

    On a machine without an accelerator: :func:`prepare_cpu_distributed` on
    ``cfg`` and, unless a process group already exists, :func:`init_cpu_dist`
    with ``cfg.env_cfg.dist_cfg``. Call it before ``Runner.from_cfg(cfg)``.

    Returns:
        The config changes made (empty on GPUs and for ``launcher='none'``).
    """
    launcher = cfg.get("launcher", "none")
    if launcher == "none" or not accelerator_absent():
        return []
    changes = prepare_cpu_distributed(cfg)
    if not torch_dist.is_initialized():
        init_cpu_dist(launcher, **dict(cfg.env_cfg.dist_cfg))
    if torch_dist.get_rank() == 0:
        for c in changes:
            print_log(f"CPU distributed launch: {c}", logger="current")
    return changes


# --------------------------------------------------------------------------- wrapper and hook

def _has_sync_bn(module: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.SyncBatchNorm) for m in module.modules())


@MODEL_WRAPPERS.register_module()
class CPUCapableDistributedDataParallel(MMDistributedDataParallel):
    """``MMDistributedDataParallel`` that also runs on CPU processes (gloo).

    For a module whose parameters are on the CPU, ``device_ids`` and
    ``output_device`` (which ``Runner.wrap_model`` always passes, and DDP
    rejects for CPU modules) are dropped, and any ``SyncBatchNorm`` layer is
    reverted to BN (it cannot run on CPU tensors). For a module on a GPU the
    arguments are passed through unchanged, so the wrapper is exactly
    ``MMDistributedDataParallel``.

    Args:
        module: The model (already on its device).
        detect_anomalous_params: As in ``MMDistributedDataParallel``.
        **kwargs: ``torch.nn.parallel.DistributedDataParallel`` arguments.
    """

    def __init__(self, module: torch.nn.Module, detect_anomalous_params: bool = False, **kwargs: Any) -> None:
        first = next(iter(module.parameters()), None)
        if first is not None and first.device.type == "cpu":
            kwargs.pop("device_ids", None)
            kwargs.pop("output_device", None)
            if _has_sync_bn(module):
                print_log("SyncBatchNorm cannot run on CPU: reverted to BatchNorm "
                          "(running statistics averaged by SyncBuffersPerIterHook)", logger="current")
                module = revert_sync_batchnorm(module)
        super().__init__(module=module, detect_anomalous_params=detect_anomalous_params, **kwargs)


@HOOKS.register_module()
class SyncBuffersPerIterHook(SyncBuffersHook):
    """mmengine's ``SyncBuffersHook`` that also averages the floating-point buffers after every training iteration.

    The CPU stand-in for SyncBN's agreement of running statistics across
    ranks (see the module docstring for what it equals). Runs before the
    checkpoint hook (priority ``NORMAL``, as its base), so saved checkpoints
    hold the averaged buffers. Does nothing outside a process group. The
    base class's epoch-end average of every buffer is kept; its average before
    validation is skipped after an iteration's (nothing is left to average).
    """

    def after_train_iter(self, runner, batch_idx: int, data_batch: Optional[dict] = None,
                         outputs: Optional[dict] = None) -> None:
        if not is_distributed():  # asked per call: the hook may be built before the process group
            return
        buffers = [b for b in runner.model.buffers() if b.is_floating_point()]
        if buffers:
            all_reduce_params(buffers, op="mean")
        self.called_in_train = True
