"""Plugin modules that load a plain checkpoint of their host strictly.

A plugin adds modules with their own parameters to a host network (the
Gaussian attention bias of a ViT block, the PreLayerNorm of a patch
embedding). A checkpoint of the plain host has no entries for them, so
``load_state_dict(plain_sd)`` (and every loader built on it: timm's
``create_model(checkpoint_path=...)``, mmengine's ``load_checkpoint``) would
fail on the missing keys. A module that mixes in
:class:`KeepsStateWhenAbsent` instead keeps its current (freshly initialised)
values when the state dict lacks *all* of its own entries, logs that once per
load, and lets the load stay strict for everything else: a checkpoint that
lacks only some of the module's entries, or any key of the host, still fails.

The mechanism reads no parameter names: every parameter and persistent
buffer registered directly on the module counts as its own.

This file needs only torch.
"""

import logging
from typing import Any, Dict, List, Optional

from torch import nn

__all__ = ["KeepsStateWhenAbsent", "keep_state_when_absent"]

_logger = logging.getLogger(__name__)

# the ``missing_keys`` list of the load that was last reported: one log line per load_state_dict call
_reported_load: List[Optional[List[str]]] = [None]


def _own_keys(module: nn.Module, prefix: str) -> List[str]:
    """State-dict keys of the parameters and persistent buffers registered directly on ``module``."""
    keys = [prefix + name for name, p in module._parameters.items() if p is not None]
    keys += [prefix + name for name, b in module._buffers.items()
             if b is not None and name not in module._non_persistent_buffers_set]
    return keys


def keep_state_when_absent(module: nn.Module, prefix: str, missing_keys: List[str]) -> List[str]:
    """Take ``module``'s own keys off ``missing_keys`` when the state dict had none of them.

    Call after ``nn.Module._load_from_state_dict`` (which lists the absent
    keys in ``missing_keys`` and leaves their values untouched).

    Args:
        module: The module being loaded.
        prefix: Its prefix in the state dict.
        missing_keys: The load's list of missing keys (edited in place).

    Returns:
        The keys that keep their current values (empty when the state dict
        had any entry of the module: then nothing is changed).
    """
    own = _own_keys(module, prefix)
    missing = set(missing_keys)
    if not own or not all(key in missing for key in own):
        return []
    kept = set(own)
    missing_keys[:] = [key for key in missing_keys if key not in kept]
    _logger.debug("%s '%s' is not in the state dict: %s keep their current values",
                  type(module).__name__, prefix.rstrip("."), own)
    if _reported_load[0] is not missing_keys:
        _reported_load[0] = missing_keys
        _logger.info("The state dict has no entries for %s '%s' (a checkpoint of the plain host): its %s "
                     "and those of every other plugin module the state dict lacks keep their current values",
                     type(module).__name__, prefix.rstrip("."), [key[len(prefix):] for key in own])
    return own


class KeepsStateWhenAbsent(nn.Module):
    """Mixin: a state dict without any of this module's own entries loads strictly, keeping the current values.

    Put it before the ``nn.Module`` base (``class Plugin(KeepsStateWhenAbsent,
    nn.LayerNorm)``); see :func:`keep_state_when_absent`.
    """

    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, local_metadata: Dict[str, Any],
                              strict: bool, missing_keys: List[str], unexpected_keys: List[str],
                              error_msgs: List[str]) -> None:
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        keep_state_when_absent(self, prefix, missing_keys)
