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
import hashlib
import json
import os
import time
import uuid
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = [
    "SEG_PAIRS",
    "seg_model_cfg",
    "seg_runner_cfg",
    "FusionVarianceRecorder",
    "measure_fusion_variances",
    "run_seg_pair",
]

NUM_CLASSES = 11
REFERENCE_RATES = (1, 12, 24, 36)  # mmseg's DeepLabV3 configs; also kim_plugins.layers.atrous.REFERENCE_RATES
_NORM = dict(type="BN", requires_grad=True)
_CATS = (torch.cat, torch.concat, torch.concatenate)
_ADDS = (torch.Tensor.add, torch.Tensor.__add__, torch.add)


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


class FusionVarianceRecorder(TorchFunctionMode):
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
        self._labels: Dict[int, Tuple[Any, str]] = {}
        self.fusions: List[Dict[str, Any]] = []
        self.equalizers: Dict[str, Dict[str, float]] = {}
        self._handles: List[Any] = []

    def _mark(self, t: torch.Tensor, label: str, site: Optional[str] = None) -> None:
        self._labels[id(t)] = (weakref.ref(t), label, site)

    def _entry(self, t: Any):
        if not isinstance(t, torch.Tensor):
            return None
        entry = self._labels.get(id(t))
        return entry if entry is not None and entry[0]() is t else None

    def label(self, t: Any) -> Optional[str]:
        entry = self._entry(t)
        return entry[1] if entry is not None else None

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
            entry = self._entry(t)
            if entry is None:
                direct += 1
                ops.append(dict(label=f"direct #{direct}", var=_var(t)))
                continue
            op = dict(label=entry[1], var=_var(t))
            if entry[2] is not None:
                op.update(site=entry[2], var_without_se=op["var"] / self.equalizers[entry[2]]["scale_sq"])
            ops.append(op)
        self.fusions.append(dict(kind=kind, size=tuple(tensors[0].shape[-2:]), operands=ops))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.interpolate:
            x = args[0] if args else kwargs["input"]
            factor = out.shape[-1] / max(1, x.shape[-1])
            src = self._entry(x)
            self._mark(out, (f"{src[1]} -> " if src else "") + f"upsampled x{factor:.3g}", src[2] if src else None)
        elif func in _CATS:
            tensors = list(args[0] if args else kwargs["tensors"])
            if any(self.label(t) for t in tensors):
                self._record("concat", tensors)
        elif func in _ADDS and len(args) >= 2 and all(isinstance(a, torch.Tensor) for a in args[:2]):
            a, b = args[:2]
            if a.dim() == 4 and a.shape == b.shape and (self.label(a) or self.label(b)):
                self._record("add", [a, b])
        return out


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

#: pair id -> (title, [(variant name, head type, head kwargs, is baseline)], input size key)
SEG_PAIRS: Dict[str, Dict[str, Any]] = {
    "se-uper": dict(title="Scale equalizers in UPerNet (UPerHead vs SEUPerHead)", size="scene",
                    variants=[("UPerHead", "UPerHead", {}, True),
                              ("SEUPerHead", "SEUPerHead", dict(se_mode="dataset"), False)]),
    "se-aspp": dict(title="Scale equalizers in DeepLabV3 (ASPPHead vs SEASPPHead)", size="scene",
                    variants=[("ASPPHead", "ASPPHead", {}, True),
                              ("SEASPPHead", "SEASPPHead", dict(se_mode="dataset"), False)]),
    "rates-small": dict(title="Atrous rates at the smaller input size", size=0,
                        variants=[("rates (1, 12, 24, 36)", "ASPPHead", {}, True),
                                  ("resolution-aware rates", "RAASPPHead", dict(dilations="auto", output_stride=8),
                                   False)]),
    "rates-large": dict(title="Atrous rates at the larger input size", size=1,
                        variants=[("rates (1, 12, 24, 36)", "ASPPHead", {}, True),
                                  ("resolution-aware rates", "RAASPPHead", dict(dilations="auto", output_stride=8),
                                   False)]),
}


def pair_size(pair: str, settings) -> int:
    """Input size of a segmentation pair."""
    key = SEG_PAIRS[pair]["size"]
    return settings.scene_size if key == "scene" else int(settings.rates_sizes[key])


def _variant_cfg(pair: str, head: str, head_kw: Dict[str, Any], size: int, settings) -> Dict[str, Any]:
    kw = dict(head_kw)
    if kw.get("dilations") == "auto":
        kw["crop_size"] = (size, size)
    return seg_model_cfg(head, size, **kw)


def synthetic_step(pair: str, settings, batch_size: Optional[int] = None) -> Tuple[Callable, Callable, int]:
    """A training step and an eval forward of ``n`` images of the pair's baseline on random data.

    For the budget estimate. Returns ``(step, forward, n)``.
    """
    from mmengine.registry import init_default_scope
    from mmengine.structures import PixelData
    from mmseg.registry import MODELS
    from mmseg.structures import SegDataSample

    import kim_plugins.mmseg  # noqa: F401

    init_default_scope("mmseg")
    size = pair_size(pair, settings)
    _, head, head_kw, _ = SEG_PAIRS[pair]["variants"][0]
    model = MODELS.build(_variant_cfg(pair, head, head_kw, size, settings))
    bs = batch_size or settings.seg_batch
    x = torch.randn(bs, 3, size, size)
    samples = []
    for _ in range(bs):
        s = SegDataSample()
        s.gt_sem_seg = PixelData(data=torch.randint(0, NUM_CLASSES, (1, size, size)))
        s.set_metainfo(dict(img_shape=(size, size), pad_shape=(size, size), ori_shape=(size, size)))
        samples.append(s)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        model.train()
        losses = model(x, samples, mode="loss")
        loss = sum(v for k, v in losses.items() if "loss" in k)
        opt.zero_grad()
        loss.backward()
        opt.step()

    @torch.no_grad()
    def forward() -> None:
        model.eval()
        model(x[:4], mode="tensor")

    return step, forward, 4


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


def _train_variant(pair: str, name: str, head: str, head_kw: Dict[str, Any], seed: int, size: int, settings, data,
                   out_dir: str, device: str, cache: Dict[str, Any]) -> Dict[str, Any]:
    """Train one variant (or reuse an identical run of another pair: same config, data and seed)."""
    from kim_plugins.layers.atrous import measure_output_stride
    from kim_plugins.suite.records import count_params, forward_gflops

    model_cfg = _variant_cfg(pair, head, head_kw, size, settings)
    hooks = [dict(type="ScaleEqualizerCalibrationHook", num_batches=settings.se_calib_batches, seed=seed)] \
        if head.startswith("SE") else []
    key = json.dumps([model_cfg, hooks, size, seed], sort_keys=True, default=str)
    if key in cache:
        return dict(cache[key], shared_from=cache[key]["pair"])
    work = os.path.join(out_dir, "runs", pair, f"{name.replace(' ', '_').replace(',', '')}_seed{seed}")
    cfg = seg_runner_cfg(model_cfg, data.scenes_root, size, data.scene_size, work, iters=settings.seg_iters,
                         batch_size=settings.seg_batch, lr=settings.seg_lr, seed=seed, custom_hooks=hooks,
                         experiment_name=f"{pair}_{seed}_{uuid.uuid4().hex[:6]}", num_train=data.num_train_scenes,
                         num_val=data.num_val_scenes)
    with _on_device(device):
        runner, hook = train_seg(cfg, f"[{pair}] {name} seed {seed}", snapshot=seed == 0)
    model = runner.model.eval()
    dev = next(model.parameters()).device
    out = dict(pair=pair, metrics=dict(hook.metrics), train_time=hook.train_time, order=hook.order.hexdigest(),
               init_params=hook.init_params, params=count_params(model),
               gflops=forward_gflops(lambda x: model(x, mode="tensor"), torch.zeros(1, 3, size, size, device=dev)),
               dilations=tuple(int(d) for d in getattr(model.decode_head, "dilations", ())) or None,
               output_stride=measure_output_stride(lambda x: model.extract_feat(x)[-1], size, device=dev))
    if seed == 0:
        n = max(settings.erf_images, settings.variance_images)
        out.update(model=model, init_model=hook.init_model, images=val_images(runner, n))
        if head.startswith("SE"):
            from mmengine.dataset import pseudo_collate

            ds, bs = runner.train_dataloader.dataset, settings.seg_batch
            out["calib_batches"] = [pseudo_collate([ds[i % len(ds)] for i in range(k * bs, (k + 1) * bs)])
                                    for k in range(settings.se_calib_batches)]
            out["cfg"] = model_cfg
    cache[key] = out
    return out


def run_seg_pair(pair: str, settings, data, out_dir: str, device: str,
                 cache: Optional[Dict[str, Any]] = None) -> "PairResult":
    """Train every variant of a segmentation pair for every seed; measure its mechanism.

    Args:
        pair: A key of :data:`SEG_PAIRS`.
        settings: :class:`~kim_plugins.suite.settings.SuiteSettings` (already budget-scaled).
        data: :class:`~kim_plugins.suite.data.SuiteData`.
        out_dir: The run's output folder (runs go to ``<out_dir>/runs/<pair>/...``).
        device: ``'cpu'`` or ``'cuda'``.
        cache: Runs of earlier pairs; a variant identical to one of them (same model config, hooks, input
            size and seed, e.g. the ASPP baseline at the scene size) is reused, not trained again.
    """
    from kim_plugins.layers.erf import erf_coverage, erf_maps, summarize_erf
    from kim_plugins.suite.records import PairResult, RunRecord

    cache = {} if cache is None else cache
    spec = SEG_PAIRS[pair]
    size = pair_size(pair, settings)
    is_se = pair.startswith("se-")
    is_rates = pair.startswith("rates-")
    result = PairResult(pair=pair, title=spec["title"] + (f" ({size}x{size})" if is_rates else ""),
                        description="", metric="mIoU")
    variances: Dict[str, Dict[str, Any]] = {}
    erfs: Dict[str, Dict[str, Any]] = {}
    rates_used: Dict[str, Tuple[int, ...]] = {}
    shared: Dict[str, str] = {}
    for seed in range(settings.seeds):
        for name, head, head_kw, baseline in spec["variants"]:
            run = _train_variant(pair, name, head, head_kw, seed, size, settings, data, out_dir, device, cache)
            extra: Dict[str, Any] = dict(aAcc=float(run["metrics"].get("aAcc", float("nan"))),
                                         mAcc=float(run["metrics"].get("mAcc", float("nan"))),
                                         output_stride=run["output_stride"])
            if run["dilations"]:
                rates_used[name] = run["dilations"]
                extra["dilations"] = str(run["dilations"])
            if "shared_from" in run:
                shared[name] = run["shared_from"]
                extra["shared_with"] = run["shared_from"]
            result.runs.append(RunRecord(pair=pair, variant=name, baseline=baseline, seed=seed, metric="mIoU",
                                         value=float(run["metrics"].get("mIoU", float("nan"))),
                                         train_time_s=run["train_time"], iters=settings.seg_iters,
                                         params=run["params"], gflops=run["gflops"], data_order=run["order"],
                                         init_params=run["init_params"], extra=extra))
            if seed != 0:
                continue
            probes = dict(start=run["init_model"], end=run["model"])
            if is_se:
                imgs = run["images"][:settings.variance_images]
                measured = {w: measure_fusion_variances(m, imgs) for w, m in probes.items()}
                variances[name] = dict(table=_fusion_table(name, measured["start"], measured["end"]),
                                       equalizers={w: measured[w]["equalizers"] for w in measured})
                if "cfg" in run:  # the option equalize_all_branches=False, same initial weights, calibrated
                    variances[name]["upsampled_only_start"] = upsampled_only_variant(
                        run["init_model"], run["cfg"], run["calib_batches"], imgs)
            if is_rates:
                erfs[name] = {}
                for w, m in probes.items():
                    maps = erf_maps(m, run["images"][:settings.erf_images], positions=[(0.5, 0.5)],
                                    batch_size=4)[0]  # decoder features before conv_seg
                    erfs[name][w] = dict(map=maps.float().cpu(), **summarize_erf(maps),
                                         coverage=float(erf_coverage(maps)))
    backbone = ("ResNetV1c-18 (16 base channels), 4 stages, strides 4-32" if pair == "se-uper" else
                "ResNetV1c-18 (16 base channels), DeepLabV3 layout: strides (1, 2, 1, 1), dilations (1, 1, 2, 4), "
                "output stride 8")
    variants = "; ".join(f"**{n}**" + (f" rates {rates_used[n]}" if n in rates_used else "")
                         + (f" (the same run as in `{shared[n]}`: identical config, data and seed)" if n in shared
                            else "") for n, *_ in spec["variants"])
    result.description = (
        f"{variants}. Backbone {backbone}; decode head 32 channels, no auxiliary head. "
        f"Fashion scenes {data.scene_size}px" + (f" resized to {size}x{size}" if size != data.scene_size else "")
        + f"; {settings.seg_iters} iterations x batch {settings.seg_batch} (random flip), SGD momentum 0.9, "
        f"lr {settings.seg_lr:g}, weight decay 5e-4, linear warm-up then poly decay (mmseg's recipe, higher lr for a "
        f"short run); mIoU on {data.num_val_scenes} val scenes (whole image)."
        + (f" SE heads: `se_mode='dataset'`, calibrated by `ScaleEqualizerCalibrationHook` on "
           f"{settings.se_calib_batches} batches before training (counted in train time)." if is_se else "")
        + (" Resolution-aware rates: `RAASPPHead(dilations='auto', crop_size, output_stride=8)`."
           if is_rates else ""))
    if is_se:
        result.mechanism["variance"] = variances
    if is_rates:
        result.mechanism["erf"] = erfs
        result.mechanism["size"] = size
        result.mechanism["rates"] = rates_used
    return result


class _on_device:
    """Make mmengine's Runner place models on ``device`` (it otherwise picks CUDA whenever it exists)."""

    def __init__(self, device: str) -> None:
        self.device = device

    def __enter__(self):
        import mmengine.device.utils as du

        self._du, self._old = du, du.DEVICE
        du.DEVICE = "cuda" if self.device.startswith("cuda") else "cpu"
        return self

    def __exit__(self, *exc) -> None:
        self._du.DEVICE = self._old
