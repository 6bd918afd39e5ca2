"""Inference speed, FLOPs and parameters of one config, or of several against the first, in one run.

Like mmseg's ``tools/analysis_tools/benchmark.py`` (images/s over timed
iterations after warm-up) and ``get_flops.py`` (mmengine's complexity
analysis), with what a plugin-vs-baseline claim needs:

- several configs in the same run: the first is the baseline; every call is
  interleaved round by round in shuffled order with an A/A control (the
  baseline timed twice), and the ratio is the median of per-round ratios
  (``kim_plugins.benchmarking.compare_timings``). A ratio only means something
  next to an A/A ratio close to 1.00;
- random input of ``--shape`` (no dataset needed), or ``--data`` batches from
  the first config's test dataloader (the same images for every config);
- CPU (pinned ``--threads``) or GPU (synchronised);
- scale equalizers folded as inference folds them (``kim_plugins.mmseg.se_inference``),
  timed beside an exact unfolded copy (row ``NAME (unfolded)``; ``--folded-only``
  skips it);
- FLOPs counted by mmengine with kim_plugins' ``scaled_dot_product_attention``
  handler (``kim_plugins.mmseg.complexity``), so fused ViT attention counts.

Examples::

    python tools/benchmark.py configs/scale_equalizer/pspnet_r50-d8_4xb2-80k_cityscapes-512x1024.py \\
        configs/scale_equalizer/pspnet-se_r50-d8_4xb2-80k_cityscapes-512x1024.py --shape 512 1024 --flops
    python tools/benchmark.py CONFIG --checkpoint CKPT --data --rounds 200

Weights are random unless ``--checkpoint`` is given (speed and FLOPs do not
depend on them); backbones are never downloaded.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import os.path as osp
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from mmengine.config import Config, DictAction

import kim_plugins.mmseg  # noqa: F401  registrations
import kim_plugins.mmseg.complexity  # noqa: F401  SDPA flop handler
from kim_plugins.cli.common import add_trust_argument
from kim_plugins.config.inspect import build_segmentor, crop_size
from kim_plugins.config.rewrite import offline_weights
from kim_plugins.markdown import FLOP_HEADER_NOTE, markdown_table


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Speed (img/s, ratio vs the first config with an A/A control), "
                                            "FLOPs and parameters of mmseg configs")
    p.add_argument("configs", nargs="+", help="config files; the first is the baseline")
    p.add_argument("--checkpoint", nargs="+", default=None,
                   help="checkpoint per config (same order; 'none' for random weights)")
    add_trust_argument(p)
    p.add_argument("--shape", type=int, nargs="+", default=None, metavar="SIZE",
                   help="random input H W (or one size for H=W); default: the config's crop_size, else 512 512")
    p.add_argument("--data", action="store_true",
                   help="time on batches of the first config's test dataloader instead of random input")
    p.add_argument("--tiny", metavar="DATA_ROOT",
                   help="with --data: read a small dataset at DATA_ROOT with tools/train.py --tiny's shrinking")
    p.add_argument("--batch-size", type=int, default=1, help="images per call (default 1, as mmseg)")
    p.add_argument("--mode", choices=["predict", "tensor"], default="predict",
                   help="'predict' (full inference with resizing to the image, as mmseg's benchmark) or "
                        "'tensor' (backbone + head logits only)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    p.add_argument("--rounds", type=int, default=50, help="timed rounds (every config once per round)")
    p.add_argument("--warmup", type=int, default=5, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=1, help="intra-op CPU threads, pinned (default 1)")
    p.add_argument("--folded-only", action="store_true",
                   help="time scale-equalizer models only folded, as inference runs them (default: also their "
                        "unfolded copy, row 'NAME (unfolded)')")
    p.add_argument("--flops", action="store_true", help="also count FLOPs and parameters")
    p.add_argument("--no-speed", action="store_true", help="only FLOPs and parameters (implies --flops)")
    p.add_argument("--cfg-options", nargs="+", action=DictAction, help="overrides applied to every config")
    p.add_argument("--out", help="write OUT.md and OUT.json")
    args = p.parse_args(argv)
    if args.checkpoint is not None and len(args.checkpoint) != len(args.configs):
        p.error(f"--checkpoint needs one entry per config ({len(args.configs)}), got {len(args.checkpoint)}")
    if args.shape is not None and len(args.shape) not in (1, 2):
        p.error(f"--shape takes H W or one size, got {args.shape}")
    if args.tiny and not args.data:
        p.error("--tiny only applies with --data")
    if args.no_speed:
        args.flops = True
    return args


def load_config(path: str, cfg_options: Optional[dict], tiny: Optional[str] = None) -> Config:
    from kim_plugins.dry_run.tiny import tiny_config

    cfg = Config.fromfile(path)
    if tiny:
        cfg = tiny_config(cfg, tiny, work_dir="", max_iters=1)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    offline_weights(cfg.model)  # never download: weights are random or --checkpoint
    return cfg


def with_scale_equalizers_folded(name: str, model: torch.nn.Module,
                                 keep_unfolded: bool = True) -> List[Tuple[str, torch.nn.Module, str]]:
    """``(name, model, equalizer status)`` rows: the model as inference runs it, and its unfolded copy.

    A model with scale equalizers is folded as ``tools/test.py`` and
    ``inference_model`` fold it (``kim_plugins.mmseg.se_inference``; opt-out
    ``model.test_cfg.fold_scale_equalizers=False``), and with ``keep_unfolded``
    an exact copy taken before folding is timed beside it as ``NAME (unfolded)``.
    Models without equalizers come back alone with an empty status.
    """
    import copy

    from kim_plugins.mmseg.se_inference import fold_for_inference, scale_equalizer_count

    count = scale_equalizer_count(model)
    if not count:
        return [(name, model, "")]
    unfolded = copy.deepcopy(model) if keep_unfolded else None
    result = fold_for_inference(model)
    if result is None:
        return [(name, model, f"{count} unfolded")]
    rows = [(name, model, f"{len(result['folded'])}/{count} folded")]
    if unfolded is not None:
        rows.append((f"{name} (unfolded)", unfolded, f"{count} unfolded"))
    return rows


def default_shape(cfg: Config) -> Tuple[int, int]:
    """The config's training crop (:func:`kim_plugins.config.inspect.crop_size`), else 512 x 512."""
    return crop_size(cfg) or (512, 512)


def random_batch(shape: Tuple[int, int], batch_size: int, seed: int = 0) -> Dict[str, Any]:
    """A raw mmseg batch (uint8 images + metainfo) of random pixels."""
    from mmseg.structures import SegDataSample

    g = torch.Generator().manual_seed(seed)
    h, w = shape
    meta = dict(ori_shape=(h, w), img_shape=(h, w), pad_shape=(h, w), scale_factor=(1.0, 1.0), flip=False)
    return dict(inputs=[torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for _ in range(batch_size)],
                data_samples=[SegDataSample(metainfo=dict(meta)) for _ in range(batch_size)])


def data_batches(cfg: Config, batch_size: int, count: int) -> List[Dict[str, Any]]:
    """Up to ``count`` raw batches of ``cfg``'s test dataloader (raises if its dataset is not on disk)."""
    from mmengine.registry import init_default_scope
    from mmengine.runner import Runner

    init_default_scope(cfg.get("default_scope", "mmseg"))
    loader_cfg = cfg.test_dataloader.copy()
    loader_cfg.batch_size = batch_size
    loader_cfg.num_workers = 0
    loader_cfg.persistent_workers = False
    loader = Runner.build_dataloader(loader_cfg)
    return list(itertools.islice(iter(loader), count))


def make_call(model: torch.nn.Module, raw_batches: Sequence[Dict[str, Any]], mode: str) -> Callable[[], Any]:
    """A zero-argument inference call cycling through the batches, preprocessed once up front."""
    prepared = []
    with torch.no_grad():
        for b in raw_batches:
            data = model.data_preprocessor(b, False)
            prepared.append((data["inputs"], data["data_samples"]))
    cycle = itertools.cycle(prepared)

    def call() -> Any:
        inputs, samples = next(cycle)
        with torch.no_grad():
            return model(inputs, samples, mode=mode)

    return call


def complexity(model: torch.nn.Module, raw_batch: Dict[str, Any]) -> Dict[str, int]:
    """FLOPs (mmengine convention: one multiply-add = 1) and parameters of the inference path.

    As mmseg's ``get_flops.py``: the model's ``'tensor'`` forward (backbone,
    neck, decode head), and parameters without the auxiliary head (unused at
    inference).
    """
    from mmengine.analysis import get_model_complexity_info

    with torch.no_grad():
        inputs = model.data_preprocessor(raw_batch, False)["inputs"]
        info = get_model_complexity_info(model, inputs=inputs, show_table=False, show_arch=False)
    params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("auxiliary_head."))
    return dict(flops=int(info["flops"]), params=int(params))


def _names(configs: Sequence[str]) -> List[str]:
    names: List[str] = []
    for c in configs:
        base = osp.splitext(osp.basename(c))[0]
        name, i = base, 2
        while name in names:
            name, i = f"{base}#{i}", i + 1
        names.append(name)
    return names


def measure(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Measure; return one row per config (and the A/A control)."""
    from kim_plugins.benchmarking import AA_CONTROL_SUFFIX, compare_timings

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfgs = [load_config(c, args.cfg_options, args.tiny) for c in args.configs]
    names = _names(args.configs)
    shape = (args.shape * 2 if len(args.shape) == 1 else args.shape) if args.shape else default_shape(cfgs[0])
    if args.data:
        raw = data_batches(cfgs[0], args.batch_size, count=max(1, min(args.rounds, 16)))
        if not raw:
            raise RuntimeError(f"the test dataloader of {args.configs[0]} yielded no batch")
        source = f"test dataloader of {names[0]} ({len(raw)} batches of {args.batch_size})"
    else:
        raw = [random_batch(tuple(shape), args.batch_size)]
        source = f"random input {shape[0]}x{shape[1]}, batch {args.batch_size}"
    ckpts = args.checkpoint or [None] * len(cfgs)
    models: Dict[str, torch.nn.Module] = {}
    rows: Dict[str, Dict[str, Any]] = {}
    for n, c, k in zip(names, cfgs, ckpts):
        for name, model, status in with_scale_equalizers_folded(n, build_segmentor(c, k, device, args.trust_checkpoint),
                                                                 keep_unfolded=not args.folded_only):
            models[name] = model
            rows[name] = dict(name=name, equalizers=status) if status else dict(name=name)
    names = list(models)  # the unfolded copies right after their folded models
    if not args.no_speed:
        calls = {n: make_call(m, raw, args.mode) for n, m in models.items()}
        result = compare_timings(calls, baseline=names[0], rounds=args.rounds, warmup=args.warmup,
                                 num_threads=args.threads, device=device, progress=True)
        for r in result.rows():
            row = rows.setdefault(r["name"], dict(name=r["name"]))
            row.update(median_ms=r["median_ms"], img_per_s=1e3 * args.batch_size / r["median_ms"],
                       ratio=r["ratio"], ratio_q1=r["ratio_q1"], ratio_q3=r["ratio_q3"])
        aa = names[0] + AA_CONTROL_SUFFIX
        rows = {k: rows[k] for k in [names[0], aa] + names[1:]}
    if args.flops:
        with torch.no_grad():
            for n, m in models.items():
                rows[n].update(complexity(m, raw[0]))
        for n in names:
            rows[n]["flops_ratio"] = rows[n]["flops"] / rows[names[0]]["flops"]
            rows[n]["params_ratio"] = rows[n]["params"] / rows[names[0]]["params"]
    meta = dict(source=source, mode=args.mode, device=str(device), threads=args.threads, rounds=args.rounds,
                warmup=args.warmup, configs=list(args.configs), checkpoints=list(ckpts))
    for row in rows.values():
        row["_meta"] = meta
    return list(rows.values())


def to_markdown(rows: Sequence[Dict[str, Any]]) -> str:
    meta = rows[0]["_meta"]
    cols = ["name"] + (["equalizers"] if any(r.get("equalizers") for r in rows) else [])
    if "median_ms" in rows[0]:
        cols += ["median_ms", "img_per_s", "ratio", "ratio_q1", "ratio_q3"]
    if "flops" in rows[0]:
        cols += ["gflops", "flops_ratio", "mparams", "params_ratio"]
    table_rows = []
    for r in rows:
        t = {k: v for k, v in r.items() if not k.startswith("_")}
        if "flops" in r:
            t["gflops"] = r["flops"] / 1e9
            t["mparams"] = r["params"] / 1e6
        table_rows.append(t)
    parts = [f"Input: {meta['source']}."]
    if "median_ms" in rows[0]:
        parts.append(f"Inference ({meta['mode']}) on {meta['device']}, {meta['threads']} thread(s); "
                     f"{meta['rounds']} interleaved rounds after {meta['warmup']} warm-up. ratio = median per-round "
                     f"time ratio vs the first config (q1..q3 its quartiles); the (A/A) row is the baseline against "
                     f"itself: the noise floor.")
    if "flops" in rows[0]:
        parts.append(f"FLOPs: backbone + neck + decode head ('tensor' forward). {FLOP_HEADER_NOTE} "
                     "Parameters without the auxiliary head.")
    if "equalizers" in cols:
        parts.append("Scale equalizers are folded into their convolutions as tools/test.py and inference_model "
                     "fold them; '(unfolded)' rows time an exact copy taken before folding.")
    head = " ".join(parts)
    return head + "\n\n" + markdown_table(table_rows, cols) + "\n"


def run(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Measure, print the Markdown table, write ``--out`` ``.md``/``.json``; return the rows."""
    rows = measure(args)
    md = to_markdown(rows)
    print(md)
    if args.out:
        os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
        with open(args.out + ".md", "w") as f:
            f.write(md)
        with open(args.out + ".json", "w") as f:
            json.dump([{k: v for k, v in r.items() if k != "_meta"} | {"meta": r["_meta"]} for r in rows], f,
                      indent=2)
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    run(parse_args(argv))
    return 0
