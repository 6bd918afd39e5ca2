"""Scale equalizers folded automatically where an mmseg segmentor is used for inference only.

Paper: Bum Jun Kim, Sang Woo Kim, "Scale Equalization for Multi-Level Feature
Fusion", TMLR 2024, arXiv 2402.01149 -- in eval an equalizer is a constant
affine map, so it folds into the convolution that reads it and inference costs
what the plain head costs (:func:`kim_plugins.layers.scale_equalizer.fold_scale_equalizers`).

When [decision]: on a segmentor's first ``test_step``. mmengine and mmseg call
``test_step`` only where a model is used for inference only:
``Runner.test`` (mmseg's and our ``tools/test.py``, ``dist_test.sh``, TTA
through ``SegTTAModel``) and ``mmseg.apis.inference_model`` (after
``init_model``); validation during training goes through ``val_step`` and
keeps the equalizers, so training can continue after it. ``tools/benchmark.py``
folds the models it builds (and times the unfolded ones beside them). A model
used through ``model(...)`` / ``predict`` directly is not folded; call
``fold_scale_equalizers(model)`` there.

The alternatives were rejected: folding on the first eval-mode forward would
also fold at validation in the middle of training (a folded head cannot
train); patching ``init_model`` would miss the common ``from mmseg.apis import
init_model`` done before ``kim_plugins.mmseg`` is imported (the config's
``custom_imports`` import it only inside ``init_model``).

What is folded: every equalizer of every SE head, when the model is in eval
mode and every ``'dataset'`` equalizer is calibrated (or built with
``allow_uncalibrated``); otherwise nothing is folded and the head's own error
(uncalibrated) is what the forward reports. Folded logits equal the unfolded
ones up to float rounding (rtol 1e-4, tested); folding is logged once.

Opt-out: ``model = dict(test_cfg=dict(mode='whole', fold_scale_equalizers=False))``
(the segmentor's inference settings; ``--cfg-options
model.test_cfg.fold_scale_equalizers=False`` on the tools,
``init_model(cfg, ckpt, cfg_options={'model.test_cfg.fold_scale_equalizers': False})``).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import torch.nn as nn
from mmengine.logging import print_log
from mmseg.models.segmentors import BaseSegmentor

from kim_plugins.layers.scale_equalizer import ScaleEqualizer, fold_scale_equalizers

from .compat import wrap_method

__all__ = ["FOLD_KEY", "scale_equalizer_count", "fold_for_inference", "install_inference_folding"]

#: ``test_cfg`` key that turns automatic folding off when False.
FOLD_KEY = "fold_scale_equalizers"
_DONE = "_kim_plugins_inference_fold"


def scale_equalizer_count(model: nn.Module) -> int:
    """How many equalizers of ``model`` still run (0 once all are folded)."""
    return sum(isinstance(m, ScaleEqualizer) for m in model.modules())


def _fold_enabled(model: nn.Module) -> bool:
    test_cfg = getattr(model, "test_cfg", None)
    if test_cfg is None or not hasattr(test_cfg, "get"):
        return True
    value = test_cfg.get(FOLD_KEY, True)
    if not isinstance(value, bool):
        raise TypeError(f"test_cfg.{FOLD_KEY} must be True or False, got {value!r}")
    return value


def fold_for_inference(model: nn.Module) -> Optional[Dict[str, List[str]]]:
    """Fold the equalizers of an eval-mode model used for inference only, once; return what was folded.

    Does nothing (returns None) when the model is training, has no running
    equalizer, opted out (``test_cfg.fold_scale_equalizers=False``), holds an
    uncalibrated ``'dataset'`` equalizer that may not run, or was handled before.
    """
    if getattr(model, _DONE, False) or model.training:
        return None
    equalizers = [m for m in model.modules() if isinstance(m, ScaleEqualizer)]
    if not equalizers or not _fold_enabled(model):
        setattr(model, _DONE, True)
        return None
    if any(m.mode == "dataset" and not m.is_calibrated and not m.allow_uncalibrated for m in equalizers):
        return None  # the forward raises the head's own error, naming the calibration hook; asked again next time
    setattr(model, _DONE, True)
    result = fold_scale_equalizers(model)
    print_log(f"scale equalizers folded for inference: {len(result['folded'])} folded, "
              f"{len(result['unfolded'])} still running (test_cfg.{FOLD_KEY}=False keeps them unfolded)",
              logger="current")
    return result


def _test_step_folding_first(original: Callable[..., Any]) -> Callable[..., Any]:
    def test_step(self: BaseSegmentor, data: Any) -> Any:
        fold_for_inference(self)
        return original(self, data)

    return test_step


def install_inference_folding() -> None:
    """Make every mmseg segmentor fold its equalizers on its first ``test_step`` (idempotent)."""
    wrap_method(BaseSegmentor, "test_step", _test_step_folding_first)


install_inference_folding()
