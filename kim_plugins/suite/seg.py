"""The segmentation pairs of the suite: scale equalizers and resolution-aware atrous rates on Fashion scenes.

Every run is an mmseg ``EncoderDecoder`` trained and evaluated by mmengine's
``Runner`` on :class:`kim_plugins.mmseg.datasets.FashionScenesDataset`; the
configs are built in code (:func:`seg_runner_cfg`) from one small backbone,
mmseg's ``ResNetV1c`` (depth 18, 16 base channels):

- ``'multi'``: 4 stages at strides 4..32, for UPerNet;
- ``'d8'``: the DeepLabV3 layout of mmseg's configs (strides (1, 2, 1, 1),
  dilations (1, 1, 2, 4), output stride 8), for the ASPP heads.

Inside a pair every variant gets the same seed (initialisation, sampler order,
flips), schedule and data; the runner records a digest of the batches and of
the initial parameters so the report can show that this held.

Mechanisms measured here:

- :class:`FusionVarianceRecorder`: the variance of every operand entering each
  concat/add of a decode head that fuses an upsampled map, and for each scale
  equalizer the variance before and after it;
- the ERF of each rate setting (:func:`kim_plugins.layers.erf.erf_maps`, centre pixel of the decoder
  features before ``conv_seg``).
"""
from __future__ import annotations

import copy
import math
import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from kim_plugins.layers.atrous import REFERENCE_RATES  # mmseg's DeepLabV3 rates
from kim_plugins.layers.fusion_trace import FusionTracingMode
from kim_plugins.markdown import markdown_table
from kim_plugins.suite.pairs import Cost, Pair, Variant, register
from kim_plugins.suite.records import PairResult
from kim_plugins.suite.report import pyplot

__all__ = [
    "SegPair",
    "SEPair",
    "RatesPair",
    "seg_model_cfg",
    "seg_runner_cfg",
    "FusionVarianceRecorder",
    "measure_fusion_variances",
]

NUM_CLASSES = 11
_NORM = dict(type="BN", requires_grad=True)


# ---------------------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------------------

def _backbone(kind: str) -> Dict[str, Any]:
    common = dict(type="ResNetV1c", depth=18, stem_channels=16, base_channels=16, num_stages=4,
                  out_indices=(0, 1, 2, 3), norm_cfg=_NORM, norm_eval=False, style="pytorch",
                  contract_dilation=True)
    if kind == "multi":
        return dict(common, strides=(1, 2, 2, 2), dilations=(1, 1, 1, 1))
    if kind == "d8":
        return dict(common, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4))
    raise ValueError(f"backbone kind must be 'multi' or 'd8', got {kind!r}")


def _head_common() -> Dict[str, Any]:
    return dict(channels=32, num_classes=NUM_CLASSES, dropout_ratio=0.1, norm_cfg=_NORM, align_corners=False,
                loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0))


def seg_model_cfg(head: str, size: int, **head_kw: Any) -> Dict[str, Any]:
    """An mmseg ``EncoderDecoder`` config with the suite's small backbone and ``head``.

    Args:
        head: mmseg head type: ``'UPerHead'``/``'SEUPerHead'`` (multi-level backbone) or an ASPP head
            (``'ASPPHead'``, ``'SEASPPHead'``, ``'RAASPPHead'``; output-stride-8 backbone).
        size: Square input size (the data preprocessor pads to it).
        **head_kw: Extra head arguments (``dilations``, ``se_mode``, ...).
    """
    if "UPer" in head:
        backbone = _backbone("multi")
        dec = dict(type=head, in_channels=[16, 32, 64, 128], in_index=[0, 1, 2, 3], pool_scales=(1, 2, 3, 6),
                   **_head_common())
    elif "ASPP" in head:
        backbone = _backbone("d8")
        dec = dict(type=head, in_channels=128, in_index=3, dilations=REFERENCE_RATES, **_head_common())
    else:
        raise ValueError(f"the suite builds UPer or ASPP heads, got {head!r}")
    dec.update(head_kw)
    return dict(type="EncoderDecoder",
                data_preprocessor=dict(type="SegDataPreProcessor", mean=[0.0, 0.0, 0.0], std=[255.0, 255.0, 255.0],
                                       bgr_to_rgb=True, pad_val=0, seg_pad_val=255, size=(size, size)),
                pretrained=None, backbone=backbone, decode_head=dec, train_cfg=dict(), test_cfg=dict(mode="whole"))


def seg_runner_cfg(model: Dict[str, Any], data_root: str, size: int, scene_size: int, work_dir: str, *,
                   iters: int, batch_size: int, lr: float, seed: int, custom_hooks: Sequence[Dict] = (),
                   experiment_name: Optional[str] = None, num_train: Optional[int] = None,
                   num_val: Optional[int] = None):
    """A complete mmengine config: Fashion scenes resized to ``size``, SGD + warm-up + poly, val at the end.

    ``num_train`` / ``num_val`` use the first scenes of a larger cached set (None: all).
    """
    from mmengine.config import Config

    resize = [dict(type="Resize", scale=(size, size), keep_ratio=True)] if size != scene_size else []
    train_pipeline = ([dict(type="LoadImageFromFile"), dict(type="LoadAnnotations")] + resize
                      + [dict(type="RandomFlip", prob=0.5), dict(type="PackSegInputs")])
    val_pipeline = ([dict(type="LoadImageFromFile")] + resize
                    + [dict(type="LoadAnnotations"), dict(type="PackSegInputs")])

    def dataset(split: str, pipeline: List[Dict], n: Optional[int]) -> Dict[str, Any]:
        return dict(type="FashionScenesDataset", data_root=data_root, indices=n, serialize_data=False,
                    data_prefix=dict(img_path=f"img_dir/{split}", seg_map_path=f"ann_dir/{split}"), pipeline=pipeline)

    warmup = max(1, iters // 10)
    schedulers = [dict(type="LinearLR", start_factor=0.1, by_epoch=False, begin=0, end=warmup)]
    if iters > warmup:
        schedulers.append(dict(type="PolyLR", power=0.9, eta_min=1e-4, by_epoch=False, begin=warmup, end=iters))
    cfg = dict(
        default_scope="mmseg",
        model=model,
        work_dir=work_dir,
        experiment_name=experiment_name or f"suite_{uuid.uuid4().hex[:8]}",
        train_dataloader=dict(batch_size=batch_size, num_workers=0, persistent_workers=False,
                              sampler=dict(type="InfiniteSampler", shuffle=True),
                              dataset=dataset("train", train_pipeline, num_train)),
        val_dataloader=dict(batch_size=4, num_workers=0, persistent_workers=False,
                            sampler=dict(type="DefaultSampler", shuffle=False), dataset=dataset("val", val_pipeline, num_val)),
        val_evaluator=dict(type="IoUMetric", iou_metrics=["mIoU"]),
        train_cfg=dict(type="IterBasedTrainLoop", max_iters=iters, val_interval=iters),
        val_cfg=dict(type="ValLoop"),
        optim_wrapper=dict(type="OptimWrapper", optimizer=dict(type="SGD", lr=lr, momentum=0.9, weight_decay=5e-4)),
        param_scheduler=schedulers,
        default_hooks=dict(timer=dict(type="IterTimerHook"),
                           logger=dict(type="LoggerHook", interval=max(1, iters), log_metric_by_epoch=False),
                           param_scheduler=dict(type="ParamSchedulerHook"), checkpoint=None,
                           sampler_seed=dict(type="DistSamplerSeedHook")),
        custom_hooks=list(custom_hooks),
        env_cfg=dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
                     dist_cfg=dict(backend="gloo")),
        log_processor=dict(by_epoch=False),
        log_level="WARNING",
        randomness=dict(seed=seed),
        launcher="none",
        load_from=None,
        resume=False,
    )
    return Config(cfg)


# ---------------------------------------------------------------------------------------------------------
# per-branch variance entering each fusion
# ---------------------------------------------------------------------------------------------------------

def _var(t: torch.Tensor) -> float:
    """Population variance over all N*C*H*W elements (the scale equalizer's statistic)."""
    return float(t.detach().double().var(unbiased=False))


class FusionVarianceRecorder(FusionTracingMode):
    """Records the operands of every concat / add that fuses an upsampled map, with their variances.

    Active around a decode head's forward (outside the scale-equalized
    heads' own call-site mode, so it sees what actually enters each fusion).
    ``F.interpolate`` outputs are marked ``'upsampled xF'``; the output of a
    :class:`~kim_plugins.layers.scale_equalizer.ScaleEqualizer` (forward hooks
    added by :meth:`watch`) is marked ``'SE(<site>)'``; labels chain through
    both (a calibrated equalizer may act before the resize, which commutes
    with a constant affine map). For every operand that passed an equalizer
    the variance it would have without it is recorded too: the equalizer is
    the scalar affine map ``x * s + t``, so that is ``Var / s^2``, with ``s^2``
    measured as the equalizer's output / input variance.

    Attributes:
        fusions: ``[{'kind': 'concat'|'add', 'size': (h, w), 'operands': [{'label', 'var', 'site',
            'var_without_se'}]}]`` in call order (``site``/``var_without_se`` only behind an equalizer).
        equalizers: ``{site: {'var_in', 'var_out', 'scale_sq'}}`` (variances of the equalizer's own input and
            output, wherever it acts).
    """

    def __init__(self) -> None:
        super().__init__()
        self.fusions: List[Dict[str, Any]] = []
        self.equalizers: Dict[str, Dict[str, float]] = {}
        self._handles: List[Any] = []

    def _mark(self, t: torch.Tensor, label: str, site: Optional[str] = None) -> None:
        self.mark(t, (label, site))

    def label(self, t: Any) -> Optional[str]:
        entry = self.marked(t)
        return entry[0] if entry is not None else None

    def watch(self, head: nn.Module) -> "FusionVarianceRecorder":
        """Hook every scale equalizer of ``head`` (``head.scale_equalizers``, if any)."""
        from kim_plugins.layers.scale_equalizer import ScaleEqualizer

        for site, se in getattr(head, "scale_equalizers", {}).items():
            if not isinstance(se, ScaleEqualizer):
                continue

            def hook(module, inputs, output, site=site):
                src = self.label(inputs[0])
                var_in, var_out = _var(inputs[0]), _var(output)
                self.equalizers[site] = dict(var_in=var_in, var_out=var_out, scale_sq=var_out / max(var_in, 1e-30))
                self._mark(output, f"{src} -> SE({site})" if src else f"SE({site})", site)

            self._handles.append(se.register_forward_hook(hook))
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _record(self, kind: str, tensors: Sequence[torch.Tensor]) -> None:
        ops = []
        direct = 0
        for t in tensors:
            entry = self.marked(t)
            if entry is None:
                direct += 1
                ops.append(dict(label=f"direct #{direct}", var=_var(t)))
                continue
            op = dict(label=entry[0], var=_var(t))
            if entry[1] is not None:
                op.update(site=entry[1], var_without_se=op["var"] / self.equalizers[entry[1]]["scale_sq"])
            ops.append(op)
        self.fusions.append(dict(kind=kind, size=tuple(tensors[0].shape[-2:]), operands=ops))

    def on_interpolate(self, func, args, kwargs):
        out = func(*args, **kwargs)
        x = args[0] if args else kwargs["input"]
        factor = out.shape[-1] / max(1, x.shape[-1])
        src = self.marked(x)
        self._mark(out, (f"{src[0]} -> " if src else "") + f"upsampled x{factor:.3g}", src[1] if src else None)
        return out

    def on_concat(self, tensors):
        if any(self.label(t) for t in tensors):
            self._record("concat", tensors)

    def on_add(self, a, b):
        if a.dim() == 4 and a.shape == b.shape and (self.label(a) or self.label(b)):
            self._record("add", [a, b])


@torch.no_grad()
def measure_fusion_variances(segmentor: nn.Module, images: torch.Tensor) -> Dict[str, Any]:
    """Per-operand variances entering each fusion of the decode head, as in training.

    The segmentor runs on a copy as in training (BatchNorm on batch
    statistics, so nothing depends on running estimates), dropout off, no
    gradient; the original model is untouched.

    Args:
        segmentor: An mmseg ``EncoderDecoder``.
        images: Preprocessed ``(N, 3, H, W)`` images.

    Returns:
        ``{'fusions': [...], 'equalizers': {...}}`` (see :class:`FusionVarianceRecorder`).
    """
    model = copy.deepcopy(segmentor)
    model.train()
    for m in model.modules():
        if isinstance(m, (nn.Dropout, nn.Dropout2d)):
            m.eval()
    feats = model.extract_feat(images)
    rec = FusionVarianceRecorder().watch(model.decode_head)
    try:
        with rec:
            model.decode_head(feats)
    finally:
        rec.remove()
    return dict(fusions=rec.fusions, equalizers=rec.equalizers)


# ---------------------------------------------------------------------------------------------------------
# runner hooks
# ---------------------------------------------------------------------------------------------------------

def _suite_hook(desc: str, snapshot: bool):
    """A hook that drives a progress bar, times training and records data order and initial weights.

    With ``snapshot`` it also keeps a copy of the model as it enters the first
    iteration (after any calibration), for the mechanism probes.
    """
    from mmengine.hooks import Hook
    from tqdm import tqdm

    from kim_plugins.suite.records import param_fingerprint

    class SuiteHook(Hook):
        priority = "HIGHEST"  # before_train runs before the calibration hook: calibration counts as training time

        def __init__(self) -> None:
            self.order = hashlib.sha1()
            self.metrics: Dict[str, float] = {}
            self.t0 = self.train_time = 0.0
            self.init_params: Dict[str, str] = {}
            self.init_model: Optional[nn.Module] = None
            self.bar = None

        def before_train(self, runner) -> None:
            self.t0 = time.perf_counter()

        def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
            if self.bar is None:  # first iteration: calibration (if any) is done, weights are the initial ones
                self.init_params = param_fingerprint(runner.model)
                if snapshot:
                    self.init_model = copy.deepcopy(runner.model)
                self.bar = tqdm(total=runner.max_iters, desc=desc, unit="it", dynamic_ncols=True, leave=True)
            for s in data_batch["data_samples"]:
                self.order.update(f"{os.path.basename(s.img_path)}:{s.metainfo.get('flip')};".encode())

        def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
            self.bar.update()
            if outputs and "loss" in outputs:
                self.bar.set_postfix(loss=f"{outputs['loss'].item():.3f}", refresh=False)
            if runner.iter + 1 >= runner.max_iters:
                self.train_time = time.perf_counter() - self.t0
                self.bar.close()

        def after_val_epoch(self, runner, metrics=None) -> None:
            self.metrics.update(metrics or {})

    return SuiteHook()


def val_images(runner, n: int) -> torch.Tensor:
    """The first ``n`` validation scenes, through the pipeline and the model's data preprocessor."""
    from mmengine.dataset import pseudo_collate

    ds = runner.val_dataloader.dataset
    data = pseudo_collate([ds[i] for i in range(min(n, len(ds)))])
    return runner.model.data_preprocessor(data, False)["inputs"]


def train_seg(cfg, desc: str, snapshot: bool = False):
    """Train and evaluate one config with mmengine's Runner.

    Args:
        cfg: From :func:`seg_runner_cfg`.
        desc: Progress-bar label.
        snapshot: Keep a copy of the model at the start of training (``hook.init_model``).

    Returns:
        ``(runner, hook)``: the runner (its model trained) and the hook with ``metrics``, ``train_time``,
        ``order`` (a sha1), ``init_params`` and ``init_model``.
    """
    import kim_plugins.mmseg  # noqa: F401  registrations
    from mmengine.runner import Runner

    keys = ("model", "work_dir", "train_dataloader", "val_dataloader", "train_cfg", "val_cfg", "optim_wrapper",
            "param_scheduler", "val_evaluator", "default_hooks", "custom_hooks", "load_from", "resume", "launcher",
            "env_cfg", "log_processor", "log_level", "default_scope", "randomness", "experiment_name")
    os.makedirs(cfg.work_dir, exist_ok=True)
    with open(os.path.join(cfg.work_dir, "config.json"), "w") as f:  # the run's full config, for reproduction
        json.dump(cfg.to_dict(), f, indent=1, default=str)
    # Runner(**kwargs) rather than Runner.from_cfg: the same build, without formatting the config text with yapf
    # for the (silenced) log and its dump, which costs more than a short run's training on a small CPU.
    runner = Runner(**{k: copy.deepcopy(cfg.get(k)) for k in keys})
    hook = _suite_hook(desc, snapshot)
    runner.register_hook(hook)
    runner.train()
    return runner, hook


# ---------------------------------------------------------------------------------------------------------
# the pairs
# ---------------------------------------------------------------------------------------------------------

_SEG_OVERHEAD_S = 2.5  # Runner build, dataset scan, hooks, per run
_BACKBONE_TEXT = {
    "multi": "ResNetV1c-18 (16 base channels), 4 stages, strides 4-32",
    "d8": "ResNetV1c-18 (16 base channels), DeepLabV3 layout: strides (1, 2, 1, 1), dilations (1, 1, 2, 4), "
          "output stride 8",
}


def _variant_cfg(head: str, head_kw: Dict[str, Any], size: int) -> Dict[str, Any]:
    kw = dict(head_kw)
    if kw.get("dilations") == "auto":
        kw["crop_size"] = (size, size)
    return seg_model_cfg(head, size, **kw)


def _seg_variant(name: str, head: str, baseline: bool = False, calibrate: bool = False, **head_kw: Any) -> Variant:
    """A segmentation variant: an mmseg head type and its arguments (``calibrate``: an SE head whose equalizers
    the calibration hook fits before training)."""
    return Variant(name, baseline, dict(head=head, head_kw=head_kw, calibrate=calibrate))


@dataclass
class SegPair(Pair):
    """An mmseg ``EncoderDecoder`` pair on Fashion scenes, trained by mmengine's ``Runner``.

    Attributes:
        size: ``'scene'`` (the scenes' own size) or an index into ``settings.rates_sizes``.
        backbone: ``'multi'`` (UPerNet) or ``'d8'`` (the ASPP heads), for the description.
    """

    size: Any = "scene"
    backbone: str = "d8"
    iters_field: str = "seg_iters"
    metric: str = "mIoU"
    needs_scenes: bool = True

    def input_size(self, settings) -> int:
        """Input size of the pair."""
        return settings.scene_size if self.size == "scene" else int(settings.rates_sizes[self.size])

    def model_cfg(self, variant: Variant, settings) -> Dict[str, Any]:
        return _variant_cfg(variant.spec["head"], variant.spec["head_kw"], self.input_size(settings))

    # ---- budget -------------------------------------------------------------------------------------------
    def timing_setup(self, settings):
        from mmengine.registry import init_default_scope
        from mmengine.structures import PixelData
        from mmseg.registry import MODELS
        from mmseg.structures import SegDataSample

        import kim_plugins.mmseg  # noqa: F401

        init_default_scope("mmseg")
        size = self.input_size(settings)
        model = MODELS.build(self.model_cfg(self.baseline, settings))
        bs = settings.seg_batch
        x = torch.randn(bs, 3, size, size)
        samples = []
        for _ in range(bs):
            s = SegDataSample()
            s.gt_sem_seg = PixelData(data=torch.randint(0, NUM_CLASSES, (1, size, size)))
            s.set_metainfo(dict(img_shape=(size, size), pad_shape=(size, size), ori_shape=(size, size)))
            samples.append(s)

        def loss_fn(m: nn.Module) -> torch.Tensor:
            return sum(v for k, v in m(x, samples, mode="loss").items() if "loss" in k)

        return model, loss_fn, lambda m: m(x[:4], mode="tensor"), 4

    def calib_cost(self, settings, cost: Dict[str, float]) -> float:
        """Seconds of the calibration hook per seed (0: no equalizer to calibrate)."""
        if not any(v.spec["calibrate"] for v in self.variants):
            return 0.0
        return settings.se_calib_batches * settings.seg_batch * cost["image_s"]

    def estimate_cost(self, settings, cost, seen):
        size = self.input_size(settings)
        keys = {(v.spec["head"], repr(sorted(v.spec["head_kw"].items())), size) for v in self.variants}
        variants = len(keys - seen)
        seen |= keys
        runs = settings.seeds * variants
        fixed = (runs * (_SEG_OVERHEAD_S + 1.3 * settings.num_val_scenes * cost["image_s"])
                 + settings.seeds * self.calib_cost(settings, cost)
                 + 2 * variants * 4 * max(settings.erf_images, settings.variance_images) * cost["image_s"])
        return Cost(fixed, runs * 1.15 * settings.seg_iters * cost["step_s"])

    # ---- running ------------------------------------------------------------------------------------------
    def title_at(self, size: int) -> str:
        return self.title

    def probe(self, variant: Variant, run: Dict[str, Any], settings, store: Dict[str, Any]) -> None:
        """Measure the mechanism on the seed-0 run of ``variant`` (its initial and trained models)."""

    def finish(self, result, store: Dict[str, Any], size: int, rates_used: Dict[str, Tuple[int, ...]]) -> None:
        """Put the measurements of :meth:`probe` into ``result.mechanism``."""

    def describe_mechanism(self, settings) -> str:
        return ""

    def run(self, settings, data, out_dir, device, cache):
        from kim_plugins.suite.records import PairResult, RunRecord

        size = self.input_size(settings)
        result = PairResult(pair=self.name, title=self.title_at(size), description="", metric=self.metric)
        store: Dict[str, Any] = {}
        rates_used: Dict[str, Tuple[int, ...]] = {}
        shared: Dict[str, str] = {}
        for seed in range(settings.seeds):
            for v in self.variants:
                run = _train_variant(self, v, seed, size, settings, data, out_dir, device, cache)
                extra: Dict[str, Any] = dict(aAcc=float(run["metrics"].get("aAcc", float("nan"))),
                                             mAcc=float(run["metrics"].get("mAcc", float("nan"))),
                                             output_stride=run["output_stride"])
                if run["dilations"]:
                    rates_used[v.name] = run["dilations"]
                    extra["dilations"] = str(run["dilations"])
                if "shared_from" in run:
                    shared[v.name] = run["shared_from"]
                    extra["shared_with"] = run["shared_from"]
                result.runs.append(RunRecord(pair=self.name, variant=v.name, baseline=v.baseline, seed=seed,
                                             metric=self.metric, value=float(run["metrics"].get("mIoU", float("nan"))),
                                             train_time_s=run["train_time"], iters=run["iters"],
                                             params=run["params"], gflops=run["gflops"], data_order=run["order"],
                                             init_params=run["init_params"], extra=extra))
                if seed == 0:
                    self.probe(v, run, settings, store)
        variants = "; ".join(f"**{v.name}**" + (f" rates {rates_used[v.name]}" if v.name in rates_used else "")
                             + (f" (the same run as in `{shared[v.name]}`: identical config, data and seed)"
                                if v.name in shared else "") for v in self.variants)
        result.description = (
            f"{variants}. Backbone {_BACKBONE_TEXT[self.backbone]}; decode head 32 channels, no auxiliary head. "
            f"Fashion scenes {data.scene_size}px" + (f" resized to {size}x{size}" if size != data.scene_size else "")
            + f"; {settings.seg_iters} iterations x batch {settings.seg_batch} (random flip), SGD momentum 0.9, "
            f"lr {settings.seg_lr:g}, weight decay 5e-4, linear warm-up then poly decay (mmseg's recipe, higher lr "
            f"for a short run); mIoU on {data.num_val_scenes} val scenes (whole image)."
            + self.describe_mechanism(settings))
        self.finish(result, store, size, rates_used)
        return result


@dataclass
class SEPair(SegPair):
    """A decode head vs its scale-equalized version: the variance of every operand entering each fusion."""

    section: str = "se"
    plots: Tuple[str, ...] = ("se_variance.png",)

    def probe(self, variant, run, settings, store):
        imgs = run["images"][:settings.variance_images]
        measured = {w: measure_fusion_variances(m, imgs)
                    for w, m in dict(start=run["init_model"], end=run["model"]).items()}
        entry = store.setdefault(variant.name, dict(table=_fusion_table(variant.name, measured["start"],
                                                                        measured["end"]),
                                                    equalizers={w: measured[w]["equalizers"] for w in measured}))
        if "cfg" in run:  # the option equalize_all_branches=False, same initial weights, calibrated
            entry["upsampled_only_start"] = upsampled_only_variant(run["init_model"], run["cfg"],
                                                                   run["calib_batches"], imgs)

    def finish(self, result, store, size, rates_used):
        result.mechanism["variance"] = store

    def describe_mechanism(self, settings):
        return (f" SE heads: `se_mode='dataset'`, calibrated by `ScaleEqualizerCalibrationHook` on "
                f"{settings.se_calib_batches} batches before training (counted in train time).")

    def report_section(self, results):
        return se_section(results)

    def plot(self, name, results, path):
        plot_se_variance(results, path)


@dataclass
class RatesPair(SegPair):
    """ASPP with mmseg's rates vs resolution-aware rates at one input size: the ERF lattice of each."""

    section: str = "rates"
    plots: Tuple[str, ...] = ("erf_rates.png",)

    def title_at(self, size):
        return f"{self.title} ({size}x{size})"

    def probe(self, variant, run, settings, store):
        from kim_plugins.layers.erf import erf_coverage, erf_maps, summarize_erf

        store[variant.name] = {}
        for w, m in dict(start=run["init_model"], end=run["model"]).items():
            maps = erf_maps(m, run["images"][:settings.erf_images], positions=[(0.5, 0.5)],
                            batch_size=4)[0]  # decoder features before conv_seg
            store[variant.name][w] = dict(map=maps.float().cpu(), **summarize_erf(maps),
                                          coverage=float(erf_coverage(maps)))

    def finish(self, result, store, size, rates_used):
        result.mechanism["erf"] = store
        result.mechanism["size"] = size
        result.mechanism["rates"] = rates_used

    def describe_mechanism(self, settings):
        return " Resolution-aware rates: `RAASPPHead(dilations='auto', crop_size, output_stride=8)`."

    def report_section(self, results):
        return erf_section(results)

    def plot(self, name, results, path):
        plot_erf(results, path)


_RATES_VARIANTS = (_seg_variant("rates (1, 12, 24, 36)", "ASPPHead", baseline=True),
                   _seg_variant("resolution-aware rates", "RAASPPHead", dilations="auto", output_stride=8))
SE_UPER = register(SEPair(
    name="se-uper", group="se", title="Scale equalizers in UPerNet (UPerHead vs SEUPerHead)", backbone="multi",
    variants=(_seg_variant("UPerHead", "UPerHead", baseline=True),
              _seg_variant("SEUPerHead", "SEUPerHead", calibrate=True, se_mode="dataset"))))
SE_ASPP = register(SEPair(
    name="se-aspp", group="se", title="Scale equalizers in DeepLabV3 (ASPPHead vs SEASPPHead)",
    variants=(_seg_variant("ASPPHead", "ASPPHead", baseline=True),
              _seg_variant("SEASPPHead", "SEASPPHead", calibrate=True, se_mode="dataset"))))
RATES_SMALL = register(RatesPair(name="rates-small", group="rates", title="Atrous rates at the smaller input size",
                                 size=0, variants=_RATES_VARIANTS))
RATES_LARGE = register(RatesPair(name="rates-large", group="rates", title="Atrous rates at the larger input size",
                                 size=1, variants=_RATES_VARIANTS))


def _fusion_table(head_name: str, start: Dict, end: Dict) -> List[Dict[str, Any]]:
    rows = []
    for k, (fs, fe) in enumerate(zip(start["fusions"], end["fusions"])):
        for os_, oe in zip(fs["operands"], fe["operands"]):
            rows.append(dict(head=head_name, fusion=f"{k + 1}: {fs['kind']} @{fs['size'][0]}x{fs['size'][1]}",
                             operand=os_["label"], site=os_.get("site"), var_start=os_["var"], var_end=oe["var"],
                             var_start_without_se=os_.get("var_without_se"),
                             var_end_without_se=oe.get("var_without_se")))
    return rows


def upsampled_only_variant(se_model: nn.Module, model_cfg: Dict[str, Any], calib_batches: List[Any],
                           images: torch.Tensor) -> Dict[str, Any]:
    """The SE head rebuilt with ``equalize_all_branches=False`` on the same weights, calibrated, measured.

    The alternative placement: equalizers after the upsamplings only (the
    literal reading), where the default equalizes every operand of each
    fusion. Equalizers hold no parameters, so the SE model's state dict loads
    (without the dropped equalizers' statistics); the remaining equalizers are
    calibrated with :func:`~kim_plugins.layers.scale_equalizer.calibrate_scale_equalizers`
    on ``calib_batches`` (training scenes) as the calibration hook would.
    """
    from mmseg.registry import MODELS

    from kim_plugins.layers.scale_equalizer import calibrate_scale_equalizers
    from kim_plugins.mmseg.se_hook import mmseg_calibration_forward

    cfg = copy.deepcopy(model_cfg)
    cfg["decode_head"]["equalize_all_branches"] = False
    model = MODELS.build(cfg).to(next(se_model.parameters()).device)
    missing, unexpected = model.load_state_dict(se_model.state_dict(), strict=False)
    if any(".scale_equalizers." not in k for k in missing + unexpected):
        raise RuntimeError(f"equalize_all_branches=False changed parameters: missing {missing}, "
                           f"unexpected {unexpected}")
    calibrate_scale_equalizers(model, calib_batches, forward_fn=mmseg_calibration_forward)
    return measure_fusion_variances(model, images)


def _train_variant(pair: SegPair, variant: Variant, seed: int, size: int, settings, data, out_dir: str,
                   device: str, cache: Dict[str, Any]) -> Dict[str, Any]:
    """Train one variant (or reuse an identical run of another pair: same config, data, seed and iterations)."""
    from kim_plugins.layers.atrous import measure_output_stride
    from kim_plugins.suite.records import count_params, forward_gflops

    model_cfg = pair.model_cfg(variant, settings)
    calibrate = variant.spec["calibrate"]
    hooks = [dict(type="ScaleEqualizerCalibrationHook", num_batches=settings.se_calib_batches, seed=seed)] \
        if calibrate else []
    key = json.dumps([model_cfg, hooks, size, seed, settings.seg_iters], sort_keys=True, default=str)
    if key in cache:
        return dict(cache[key], shared_from=cache[key]["pair"])
    name = variant.name
    work = os.path.join(out_dir, "runs", pair.name, f"{name.replace(' ', '_').replace(',', '')}_seed{seed}")
    cfg = seg_runner_cfg(model_cfg, data.scenes_root, size, data.scene_size, work, iters=settings.seg_iters,
                         batch_size=settings.seg_batch, lr=settings.seg_lr, seed=seed, custom_hooks=hooks,
                         experiment_name=f"{pair.name}_{seed}_{uuid.uuid4().hex[:6]}",
                         num_train=data.num_train_scenes, num_val=data.num_val_scenes)
    from kim_plugins.mmseg.compat import runner_device

    with runner_device(device):
        runner, hook = train_seg(cfg, f"[{pair.name}] {name} seed {seed}", snapshot=seed == 0)
    model = runner.model.eval()
    dev = next(model.parameters()).device
    out = dict(pair=pair.name, metrics=dict(hook.metrics), train_time=hook.train_time, order=hook.order.hexdigest(),
               init_params=hook.init_params, params=count_params(model), iters=settings.seg_iters,
               gflops=forward_gflops(lambda x: model(x, mode="tensor"), torch.zeros(1, 3, size, size, device=dev)),
               dilations=tuple(int(d) for d in getattr(model.decode_head, "dilations", ())) or None,
               output_stride=measure_output_stride(lambda x: model.extract_feat(x)[-1], size, device=dev))
    if seed == 0:
        n = max(settings.erf_images, settings.variance_images)
        out.update(model=model, init_model=hook.init_model, images=val_images(runner, n))
        if calibrate:
            from mmengine.dataset import pseudo_collate

            ds, bs = runner.train_dataloader.dataset, settings.seg_batch
            out["calib_batches"] = [pseudo_collate([ds[i % len(ds)] for i in range(k * bs, (k + 1) * bs)])
                                    for k in range(settings.se_calib_batches)]
            out["cfg"] = model_cfg
    cache[key] = out
    return out



# ---------------------------------------------------------------------------------------------------------
# report section and plots
# ---------------------------------------------------------------------------------------------------------

def _spread(operands: List[Dict[str, Any]], key: str = "var") -> float:
    vs = [o[key] for o in operands]
    return max(vs) / max(min(vs), 1e-30)


def se_section(prs: List[PairResult]) -> List[str]:
    lines = ["### Scale equalizers: the variance of each branch entering a fusion",
             "",
             "Bilinear upsampling lowers a map's variance (i.i.d. input: x2 -> 0.39, x4 -> 0.43, limit 4/9), so "
             "the branches a decoder concatenates or adds sit on different scales. Measured on the first "
             "validation scenes with the model as in training (BatchNorm on batch statistics, no update), for "
             "every operand of every fusion that takes an upsampled map: the population variance over N·C·H·W. "
             "*start* = initial weights (SE heads: right after the calibration hook), *end* = after training. "
             "*without SE* = the same operand without its equalizer (the equalizer is the scalar affine map "
             "x·s + t, so that is Var / s²).",
             ""]
    for pr in prs:
        var = pr.mechanism.get("variance", {})
        names = list(var)
        if len(names) != 2:
            continue
        base, se = names
        bt, st = var[base]["table"], var[se]["table"]
        lines += [f"**{pr.title}** (seed 0)", ""]
        rows = []
        for b, t in zip(bt, st):
            def with_without(row, when):
                w = row[f"var_{when}_without_se"]
                return f"{row[f'var_{when}']:.3g}" + ("" if w is None else f" (without SE {w:.3g})")
            rows.append(dict(fusion=b["fusion"], op=t["operand"], vb0=f"{b['var_start']:.3g}",
                             vb1=f"{b['var_end']:.3g}", vs0=with_without(t, "start"), vs1=with_without(t, "end")))
        lines.append(markdown_table(rows, ["fusion", "op", "vb0", "vb1", "vs0", "vs1"],
                                    ["fusion", "operand (in the SE head)", f"{base}: Var start", "end",
                                     f"{se}: Var start", "end"]))
        lines.append("")
        fusions = list(dict.fromkeys(r["fusion"] for r in bt))
        alt = var[se].get("upsampled_only_start")
        spread_rows = []
        for k, fusion in enumerate(fusions):
            def sp(table, key):
                return _spread([r for r in table if r["fusion"] == fusion], key)
            row = dict(fusion=fusion, b0=f"{sp(bt, 'var_start'):.2f}", b1=f"{sp(bt, 'var_end'):.2f}",
                       s0=f"{sp(st, 'var_start'):.2f}", s1=f"{sp(st, 'var_end'):.2f}")
            if alt is not None and k < len(alt["fusions"]):
                row["a0"] = f"{_spread(alt['fusions'][k]['operands']):.2f}"
            spread_rows.append(row)
        cols = ["fusion", "b0", "b1", "s0", "s1"] + (["a0"] if alt is not None else [])
        heads = ["fusion", f"{base} start", "end", f"{se} start", "end"] + (
            [f"{se}, upsampled operands only (`equalize_all_branches=False`), start"] if alt is not None else [])
        lines += ["Spread of the operand variances in each fusion (max / min; 1 = scale equilibrium):", "",
                  markdown_table(spread_rows, cols, heads), "",
                  f"By default (`equalize_all_branches=True` [decision], for the paper's promised scale equilibrium) "
                  f"every operand of each fusion that an upsampling feeds is standardised with dataset-wide "
                  f"statistics (variance 1 on the calibration data). The last column rebuilds the same initial "
                  f"weights with the alternative, literal placement — equalizers after the upsamplings only "
                  f"(`equalize_all_branches=False`), calibrated on training scenes: the branches that are not "
                  f"upsampled then keep the scale the network gives them, and the spread is that scale against 1.",
                  ""]
    lines.append("![per-branch variance](se_variance.png)")
    return lines


def erf_section(prs: List[PairResult]) -> List[str]:
    lines = ["### Atrous rates: the ERF lattice of each rate setting",
             "",
             "Effective receptive field of the centre output pixel (gradient of the decoder features before "
             "`conv_seg`, channel mean, w.r.t. the input, RGB-averaged, clipped at 0, summed over validation "
             "scenes, normalised; `kim_plugins.layers.erf`), at initialisation and after training. ASPP's ERF is a "
             "lattice: the centre plus satellites at ±rate·OS input pixels. A branch whose rate exceeds "
             "floor((F - 1) / 2) on the F-pixel feature map is degenerate: no output position sees its whole 3x3 "
             "kernel inside the map. Coverage = fraction of the image where the ERF exceeds 1 % of its maximum.",
             ""]
    rows = []
    for pr in prs:
        size = pr.mechanism.get("size")
        for name, probes in pr.mechanism.get("erf", {}).items():
            rates = pr.mechanism["rates"].get(name, ())
            os_ = next((r.extra.get("output_stride") for r in pr.runs if r.variant == name and r.seed == 0), None)
            inside = [r for r in rates if r > 1 and r <= (-(-size // (os_ or 8)) - 1) // 2]  # non-degenerate
            for when in ("start", "end"):
                p = probes[when]
                rows.append(dict(size=f"{size}x{size}", variant=name, rates=str(rates), os=str(os_),
                                 sat=", ".join(f"±{r * (os_ or 8)}" for r in rates if r > 1),
                                 inside=f"{len(inside)}/{len([r for r in rates if r > 1])}",
                                 when="init" if when == "start" else "trained",
                                 sigma=f"{p['sigma_y']:.1f} x {p['sigma_x']:.1f}",
                                 side=f"{p['side_50']} / {p['side_90']}", cov=f"{100 * p['coverage']:.1f} %"))
    lines.append(markdown_table(rows, ["size", "variant", "rates", "os", "sat", "inside", "when", "sigma", "side",
                                       "cov"],
                                ["input", "variant", "rates", "output stride (measured)", "satellites (px)",
                                 "non-degenerate dilated branches", "weights", "Gaussian σ_y x σ_x (px)",
                                 "50 % / 90 % mass square (px)", "coverage"]))
    lines += ["", "![ERF lattice per rate setting](erf_rates.png)"]
    return lines


def plot_se_variance(prs: List[PairResult], path: str) -> None:
    plt = pyplot()
    prs = [p for p in prs if len(p.mechanism.get("variance", {})) == 2]
    fig, axes = plt.subplots(len(prs), 2, figsize=(13, 3.8 * len(prs)), squeeze=False)
    for row, pr in zip(axes, prs):
        (base, bvar), (se, svar) = list(pr.mechanism["variance"].items())
        bt, st = bvar["table"], svar["table"]
        alt = svar.get("upsampled_only_start")
        alt_vars = [o["var"] for f in alt["fusions"] for o in f["operands"]] if alt else None
        labels = [f"{t['fusion'].split(':')[0]}: {t['site'] or t['operand']}" for t in st]
        for ax, when in zip(row, ("start", "end")):
            series = [(base, [b[f"var_{when}"] for b in bt], "#888888"),
                      (se, [t[f"var_{when}"] for t in st], "#3b75af")]
            if when == "start" and alt_vars is not None and len(alt_vars) == len(st):
                series.append((f"{se} upsampled operands only", alt_vars, "#55a868"))
            w = 0.8 / len(series)
            for j, (name, vals, color) in enumerate(series):
                ax.bar([x + (j - (len(series) - 1) / 2) * w for x in range(len(st))], vals, w, label=name,
                       color=color)
            ax.set_yscale("log")
            every = [v for _, vals, _ in series for v in vals]
            ax.set_ylim(min(every) / 1.5, max(every) * 1.5)
            ax.set_xticks(list(range(len(st))))
            ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=6)
            ax.set_ylabel("variance entering the fusion")
            ax.set_title(f"{pr.title} — {'initial weights (SE: calibrated)' if when == 'start' else 'trained'}",
                         fontsize=8)
            ax.legend(fontsize=7)
            ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_erf(prs: List[PairResult], path: str) -> None:
    import numpy as np

    plt = pyplot()
    cells = []
    for pr in prs:
        for name, probes in pr.mechanism.get("erf", {}).items():
            for when in ("start", "end"):
                cells.append((pr.mechanism["size"], name, pr.mechanism["rates"].get(name, ()), when,
                               probes[when]["map"]))
    cols = 4
    rows = max(1, math.ceil(len(cells) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (size, name, rates, when, m) in zip(axes.flat, cells):
        arr = np.asarray(m, dtype=np.float64)
        arr = np.log10(arr / arr.max() + 1e-6)
        im = ax.imshow(arr, cmap="magma", vmin=-6, vmax=0)
        label = name if str(tuple(rates)) in name else f"{name} {tuple(rates)}"
        ax.set_title(f"{size}px, {'at init' if when == 'start' else 'trained'}\n{label}", fontsize=7)
        ax.axis("off")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label="log10(ERF / max)")
    fig.suptitle("ERF of the centre output pixel per rate setting (log scale)", fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)
