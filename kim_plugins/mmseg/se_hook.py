"""mmengine hook that calibrates ``'dataset'``-mode scale equalizers before training.

Paper: Bum Jun Kim, Sang Woo Kim, "Scale Equalization for Multi-Level Feature
Fusion", TMLR 2024, arXiv 2402.01149. The calibration itself is
:func:`kim_plugins.layers.scale_equalizer.calibrate_scale_equalizers`.

Config::

    custom_imports = dict(imports=['kim_plugins.mmseg'], allow_failed_imports=False)
    custom_hooks = [dict(type='ScaleEqualizerCalibrationHook', num_batches=50)]
"""
from __future__ import annotations

import itertools
from typing import Any, Iterator, Optional

import torch
from mmengine.dataset import InfiniteSampler
from mmengine.dist import get_dist_info
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmseg.registry import HOOKS
from torch.utils.data import DataLoader

from kim_plugins.layers.scale_equalizer import ScaleEqualizer, calibrate_scale_equalizers, forked_rng

from .compat import infinite_sampler_indices

__all__ = ["ScaleEqualizerCalibrationHook", "mmseg_calibration_forward"]


def mmseg_calibration_forward(model: torch.nn.Module, data: Any) -> Any:
    """One calibration forward of an mmseg segmentor on a loader batch: as in training (``mode='loss'``).

    ``mode='loss'`` runs every head (auxiliary heads included) exactly as a
    training step does; the losses are computed but, without gradients,
    nothing is updated.
    """
    return model(**model.data_preprocessor(data, True), mode="loss")


class _CalibrationSampler(InfiniteSampler):
    """mmengine's ``InfiniteSampler`` (seeded shuffles, rank-strided) cut to ``num_samples``; restarts on each pass.

    A sample order of its own, so the train sampler is never iterated. Given
    ``rank``/``world_size`` are used instead of the process group's.
    """

    def __init__(self, size: int, num_samples: int, seed: int, rank: int, world_size: int) -> None:
        super().__init__(range(size), shuffle=True, seed=seed)
        self.rank, self.world_size, self.num_samples = rank, world_size, num_samples

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(infinite_sampler_indices(self), self.num_samples)

    def __len__(self) -> int:
        return self.num_samples


@HOOKS.register_module()
class ScaleEqualizerCalibrationHook(Hook):
    """Measure the statistics of every ``'dataset'``-mode scale equalizer in ``before_train``.

    From "Scale Equalization for Multi-Level Feature Fusion" (Kim & Kim, TMLR
    2024, arXiv 2402.01149): ``mu`` and ``sigma`` are dataset-wide statistics
    of the equalizer's input. The hook draws ``num_batches`` batches from the
    train dataset through a loader of its own (same dataset, pipeline, batch
    size, collate and worker seeding; its own seeded sample order, so the
    train loader's order is untouched; every rank draws different samples),
    runs the model as in training (``mode='loss'``, BatchNorm on batch
    statistics, no gradient, dropout off, no running statistic updated) and
    merges the statistics across processes. The global RNG streams are
    restored afterwards, so an SE run and a baseline run with the same seed
    see identical batches.

    It does nothing when every equalizer is already calibrated, e.g. when the
    run resumes from (or loads) a checkpoint that holds the statistics,
    unless ``recalibrate=True``.

    Args:
        num_batches: Batches per rank (>= 1).
        recalibrate: Measure again even if the model holds statistics.
        seed: Seed of the calibration sample order.
        num_workers: Loader workers; default: the train loader's.
    """

    priority = "VERY_HIGH"

    def __init__(self, num_batches: int = 50, recalibrate: bool = False, seed: int = 0,
                 num_workers: Optional[int] = None) -> None:
        if not isinstance(num_batches, int) or isinstance(num_batches, bool) or num_batches < 1:
            raise ValueError(f"ScaleEqualizerCalibrationHook: num_batches={num_batches!r} must be an int >= 1 "
                             f"(the paper's statistics are dataset-wide: use tens of batches, e.g. 50)")
        self.num_batches = num_batches
        self.recalibrate = recalibrate
        self.seed = seed
        self.num_workers = num_workers

    def _loader(self, train_loader: DataLoader) -> DataLoader:
        batch_size = train_loader.batch_size
        if batch_size is None:
            batch_size = getattr(train_loader.batch_sampler, "batch_size", None)
        if batch_size is None:
            raise ValueError("ScaleEqualizerCalibrationHook: cannot tell the train loader's batch size")
        rank, world = get_dist_info()
        sampler = _CalibrationSampler(len(train_loader.dataset), self.num_batches * batch_size, self.seed, rank,
                                      world)
        workers = train_loader.num_workers if self.num_workers is None else self.num_workers
        return DataLoader(train_loader.dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                          collate_fn=train_loader.collate_fn, worker_init_fn=train_loader.worker_init_fn,
                          pin_memory=False, drop_last=False, persistent_workers=False)

    def before_train(self, runner: Any) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        ses = [m for m in model.modules() if isinstance(m, ScaleEqualizer) and m.mode == "dataset"]
        if not ses:
            runner.logger.warning("ScaleEqualizerCalibrationHook: the model has no 'dataset'-mode scale "
                                  "equalizer; nothing to calibrate")
            return
        if not self.recalibrate and all(bool(m.calibrated) for m in ses):
            runner.logger.info(f"ScaleEqualizerCalibrationHook: all {len(ses)} equalizers hold statistics "
                               f"(resumed / loaded checkpoint); calibration skipped")
            return
        loader = self._loader(runner.train_dataloader)
        devices = list({p.device for p in model.parameters()})
        with forked_rng(devices):  # loading draws from the RNGs (augmentation, worker seeds): restore them
            batches = list(itertools.islice(iter(loader), self.num_batches))

        runner.logger.info(f"ScaleEqualizerCalibrationHook: calibrating {len(ses)} equalizers on "
                           f"{len(batches)} batches per rank")
        stats = calibrate_scale_equalizers(model, batches, forward_fn=mmseg_calibration_forward,
                                           recalibrate=self.recalibrate)
        for name, (mean, var) in stats.items():
            runner.logger.info(f"  {name}: mean={mean:.6g} std={var ** 0.5:.6g}")
