#!/usr/bin/env python
"""GPU cost of every plugin against its plain parent: writes benchmarks/results/gpu.{json,md}.

One process, one GPU. Every comparison times the plugin and its plain parent
(same weights, same input) interleaved in a shuffled order per round, the
parent twice per round (the A/A control, ideally 1.00: the noise floor), with
CUDA events around each call, warm-up rounds, fixed seeds, and reports the
median of the per-round ratios (IQR beside it) and the peak CUDA memory of one
call of each. Sections (``--only``):

- ``se``: the five scale-equalized heads (UPer, PSP, ASPP, SepASPP, FCN at the
  widths of mmseg's configs, features of a 512x512 crop, batch 8, fp32):
  train step and folded-eval time, peak memory (goals: train <= 1.05x,
  folded eval <= 1.02x, memory <= 1.02x);
- ``gab``: GAB ViT-S/B (and Swin-T/S GAB where registered) at 224 and 512 px
  under bf16/fp16 autocast: train and eval throughput, peak memory (goals:
  train >= 0.95x, eval >= 0.97x), and the attention kernels that ran
  (profiler kernel names, ``torch.backends.cuda`` SDPA flags);
- ``pln``: PLN ViTs, same measurements and goals;
- ``sap``: SAP ResNet-50-D (timm) and SAP PSPNet / DeepLabV3 R-50-D8
  (``SAPEncoderDecoder``): train and eval time ratios, peak memory;
- ``erf``: batched ERF vs the per-image loop on ResNet-50 at 224 px (goal >= 5x);
- ``suite``: ``tools/benchmark_suite.py --suite full`` (recorded as skipped
  with the reason when it cannot run here);
- ``flex`` (last: its first call compiles a kernel, of unknown duration):
  the GAB attention of ViT-B/16 at 1024x1024 (4096 patch tokens) with the
  bias computed inside a flex-attention kernel vs the materialised bias,
  one attention call first, then the whole model: time and peak memory,
  eval then train; each case hard-capped (``--flex-compile-cap``).

Every section is time-budgeted (``--time-budget``: later cases and sections
are skipped with a note once it is spent) and a failing case or section is
recorded with its error instead of ending the run. Every row is printed as a
JSON line as soon as it is measured (``-- {...}`` lines announce each case),
and the report files are rewritten after every section, so a run killed
from outside keeps what it measured.

``--tiny`` runs every section at toy sizes on whatever device there is (the
test suite runs it on CPU): it checks the script, its figures mean nothing.
Results from a non-CUDA device are written as ``gpu_script_check_<device>.*``
and never into ``benchmarks/results``, so a CPU figure is never published as a
GPU one.

Usage (on the GPU machine, after ``. benchmarks/gpu_env.sh`` where mmseg is not installed)::

    python benchmarks/gpu.py --time-budget 330                # all sections; see results/gpu_next_run.md
    python benchmarks/gpu.py --only gab flex --time-budget 120
    python benchmarks/gpu.py --tiny --out /tmp/check          # CPU check of the script
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)  # the other benchmark scripts: their model builders are reused

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kim_plugins.benchmarking import AA_CONTROL_SUFFIX, TimingResult  # noqa: E402
from kim_plugins.markdown import markdown_table  # noqa: E402

#: flex last: compiling its kernel is the one step whose duration is unknown (run 1 was killed inside it)
SECTIONS = ("se", "gab", "pln", "sap", "erf", "suite", "flex")
#: share of the time budget each section may use (unused time passes on to the next sections). Run 1 (270 s on
#: an H200): se's 43 s covered two of its five heads (building, calibrating and cuDNN autotuning each head cost
#: more than its timing), gab (71 s, 6 cases), pln (29 s), sap (51 s) and erf (21 s) finished within theirs; the
#: gab cases run by priority, so a shorter share drops the fp16 repeats first. Weights ~ those needs (se ~90 s),
#: flex ~70 s: all sections fit a 330 s budget
WEIGHTS = {"se": 0.27, "gab": 0.21, "pln": 0.09, "sap": 0.15, "erf": 0.06, "suite": 0.0, "flex": 0.22}
#: seconds a flex case may take beyond its timing share (its first call compiles the kernel), hard-capped
FLEX_COMPILE_CAP_S = 90.0
RESULTS_DIR = os.path.join(HERE, "results")
SWIN_GAB = (("swin_tiny_patch4_window7_gab_224", "swin_tiny_patch4_window7_224"),
            ("swin_small_patch4_window7_gab_224", "swin_small_patch4_window7_224"))
WIDTH_KEYS = ("in_channels", "channels", "c1_in_channels", "c1_channels")  # of the SE / parent heads
ATTENTION_KERNEL_WORDS = ("flash", "fmha", "attention", "attn", "efficient", "sdpa", "mha", "softmax")


# ----------------------------------------------------------------------------------------------------------------
# measurement

@dataclass
class Ctx:
    """What every section needs: device, sizes, the clock and the budget."""

    device: torch.device
    tiny: bool
    rounds: int
    warmup: int
    deadline: float
    section_deadline: float = 0.0
    flex_compile_cap: float = FLEX_COMPILE_CAP_S

    def left(self) -> float:
        return min(self.deadline, self.section_deadline) - time.perf_counter()

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


def interleaved(ctx: Ctx, candidates: Mapping[str, Callable[[], Any]], baseline: str,
                case_seconds: float, seed: int = 0) -> TimingResult:
    """Time the candidates interleaved (shuffled order per round) with the baseline also as A/A control.

    CUDA: one pair of CUDA events around each call (device time of the call's
    work, launches included as they stall the stream); CPU: ``time.perf_counter``.
    The number of rounds fits ``case_seconds`` after the warm-up (between 5
    and ``ctx.rounds``; 3 with ``--tiny``).
    """
    fns: Dict[str, Callable[[], Any]] = dict(candidates)
    aa = baseline + AA_CONTROL_SUFFIX
    fns[aa] = candidates[baseline]
    names = [baseline, aa] + [k for k in candidates if k != baseline]
    rng = random.Random(seed)
    order = list(fns)

    def one_round() -> Dict[str, float]:
        rng.shuffle(order)
        out: Dict[str, float] = {}
        if ctx.cuda:
            events = {}
            for name in order:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fns[name]()
                end.record()
                events[name] = (start, end)
            torch.cuda.synchronize(ctx.device)
            return {k: s.elapsed_time(e) / 1e3 for k, (s, e) in events.items()}
        for name in order:
            t0 = time.perf_counter()
            fns[name]()
            out[name] = time.perf_counter() - t0
        return out

    t0 = time.perf_counter()
    for _ in range(ctx.warmup):
        one_round()
    ctx.sync()
    per_round = (time.perf_counter() - t0) / max(ctx.warmup, 1)  # with --tiny (no warm-up) unused
    rounds = 3 if ctx.tiny else int(max(5, min(ctx.rounds, case_seconds / max(per_round, 1e-6))))
    result = TimingResult(baseline=baseline, times={k: [] for k in names}, threads=torch.get_num_threads(),
                          rounds=rounds)
    for _ in range(rounds):
        for k, v in one_round().items():
            result.times[k].append(v)
    return result


def peak_memory(ctx: Ctx, fn: Callable[[], Any]) -> Optional[int]:
    """Peak CUDA bytes above the starting allocation during one call (``None`` off CUDA)."""
    if not ctx.cuda:
        return None
    torch.cuda.synchronize(ctx.device)
    torch.cuda.empty_cache()
    start = torch.cuda.memory_allocated(ctx.device)
    torch.cuda.reset_peak_memory_stats(ctx.device)
    fn()
    torch.cuda.synchronize(ctx.device)
    return int(torch.cuda.max_memory_allocated(ctx.device) - start)


def ratio_row(res: TimingResult, plugin: str, *, goal: Optional[float], higher_is_better: bool = False,
              mem: Optional[Tuple[Optional[int], Optional[int]]] = None, mem_goal: Optional[float] = None,
              **info: Any) -> Dict[str, Any]:
    """One result row: median times, time ratio plugin/parent [IQR], A/A, throughput ratio, memory ratio, goals.

    ``goal`` is on the time ratio (``<=``) unless ``higher_is_better``, then
    on the throughput ratio parent time / plugin time (``>=``).
    """
    base = res.baseline
    q1, q3 = res.ratio_iqr(plugin)
    aq1, aq3 = res.ratio_iqr(res.aa_name)
    r = res.ratio(plugin)
    row: Dict[str, Any] = dict(info)
    row.update(parent_ms=1e3 * res.median(base), plugin_ms=1e3 * res.median(plugin), time_ratio=r,
               time_ratio_iqr=[q1, q3], aa_ratio=res.ratio(res.aa_name), aa_iqr=[aq1, aq3],
               throughput_ratio=1.0 / r, rounds=res.rounds)
    if goal is not None:
        row["goal"] = (">= " if higher_is_better else "<= ") + f"{goal:g}"
        row["meets_goal"] = bool(1.0 / r >= goal) if higher_is_better else bool(r <= goal)
    if mem is not None and mem[0] is not None and mem[1] is not None:
        row.update(peak_mem_parent_MiB=mem[0] / 2 ** 20, peak_mem_plugin_MiB=mem[1] / 2 ** 20,
                   mem_ratio=mem[1] / max(mem[0], 1))
        if mem_goal is not None:
            row["mem_goal"] = f"<= {mem_goal:g}"
            row["mem_meets_goal"] = bool(row["mem_ratio"] <= mem_goal)
    return row


class CaseTimeout(Exception):
    """A case ran past its hard time limit (:func:`hard_time_limit`)."""


@contextlib.contextmanager
def hard_time_limit(seconds: Optional[float]):
    """Raise :class:`CaseTimeout` in the block after ``seconds`` (SIGALRM; a no-op where that is unavailable).

    Python runs the handler between bytecodes, so a long C call (a CUDA
    synchronisation) finishes first; kernel compilation (Python, waits on
    worker processes) is interrupted.
    """
    import signal
    import threading
    if (seconds is None or not hasattr(signal, "setitimer")
            or threading.current_thread() is not threading.main_thread()):
        yield
        return

    def expire(signum, frame):
        raise CaseTimeout(f"stopped at its hard time limit of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def emit(row: Dict[str, Any]) -> None:
    """Print a result row as one JSON line at once (the log keeps every row even if the run is killed)."""
    print(json.dumps(row, default=str), flush=True)


def run_cases(ctx: Ctx, cases: List[Any], measure: Callable[[Any, float], List[Dict[str, Any]]],
              describe: Callable[[Any], Dict[str, Any]], hard_extra_s: Optional[float] = None,
              stop_after_timeout: bool = False) -> List[Dict[str, Any]]:
    """``measure(case, seconds)`` for every case within the section's budget; each row is printed when measured.

    Each case gets an equal share of the section's remaining time; a failing
    case becomes a row with ``error``, a case past the budget a row with
    ``skipped``. ``hard_extra_s``: each case is stopped (:class:`CaseTimeout`,
    recorded as its error) after its share plus this many seconds;
    ``stop_after_timeout``: the cases after a stopped one are skipped. So
    the section ends at most ``hard_extra_s`` after its deadline (a C call
    in progress, e.g. a CUDA synchronisation, finishes first).
    """
    rows: List[Dict[str, Any]] = []
    stopped = None
    for i, case in enumerate(cases):
        left = ctx.left()
        if stopped is not None:
            new = [dict(describe(case), skipped=f"an earlier case of this section was stopped ({stopped})")]
        elif left < (1.0 if ctx.tiny else 4.0):
            new = [dict(describe(case), skipped="time budget spent")]
        else:
            seconds = 0.6 * left / (len(cases) - i)
            print(f"-- {json.dumps(describe(case), default=str)} ({seconds:.0f} s)", flush=True)
            try:
                # seconds <= 0.6 * left: a stopped case ends at most hard_extra_s past the section's deadline,
                # and the cases after it find the budget spent
                with hard_time_limit(None if hard_extra_s is None else seconds + hard_extra_s):
                    new = measure(case, seconds)
            except Exception as err:  # recorded; the other cases still run
                new = [dict(describe(case), error=f"{type(err).__name__}: {err}"[:400])]
                if isinstance(err, CaseTimeout) and stop_after_timeout:
                    stopped = str(err)
        for row in new:
            emit(row)
        rows.extend(new)
        _free(ctx)
    return rows


def _free(ctx: Ctx) -> None:
    if ctx.cuda:
        torch.cuda.empty_cache()


def autocast(ctx: Ctx, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(ctx.device.type, dtype=dtype)


def train_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor, ctx: Ctx,
               dtype: Optional[torch.dtype] = None) -> Callable[[], None]:
    """Forward, cross-entropy, backward and an SGD step (fp16 autocast uses a grad scaler)."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9)
    scaler = torch.amp.GradScaler(ctx.device.type) if dtype == torch.float16 else None

    def step() -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        with autocast(ctx, dtype):
            loss = F.cross_entropy(model(x), target)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    return step


def eval_step(model: nn.Module, x: Any, ctx: Ctx, dtype: Optional[torch.dtype] = None) -> Callable[[], None]:
    def step() -> None:
        model.eval()
        with torch.no_grad(), autocast(ctx, dtype):
            model(x)
    return step


def attention_kernels(ctx: Ctx, fn: Callable[[], Any]) -> List[str]:
    """Names of the attention / softmax kernels one call of ``fn`` launches (CUDA profiler)."""
    if not ctx.cuda:
        return []
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(ctx.device)
    names = sorted({e.key for e in prof.key_averages()
                    if any(w in e.key.lower() for w in ATTENTION_KERNEL_WORDS)})
    return [n[:120] for n in names][:8]


def kernel_profile(ctx: Ctx, fn: Callable[[], Any], top: int = 6) -> Dict[str, Any]:
    """Summed GPU kernel time of one call of ``fn`` and its most expensive kernels (CUDA profiler; {} elsewhere).

    Set beside the CUDA-event time of the same call, it tells GPU work
    (kernel time) from launch / CPU overhead (event time with the GPU idle
    between kernels): a plugin slower by events but not by kernel time is
    limited by the extra ops it dispatches, not by their kernels.
    """
    if not ctx.cuda:
        return {}
    from torch.profiler import ProfilerActivity, profile

    def self_device_us(e: Any) -> float:  # renamed from self_cuda_time_total in torch 2.4
        return float(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0))

    try:  # a diagnostic: its failure must not cost the row its timings
        ctx.sync()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            fn()
            dispatch = time.perf_counter() - t0
            torch.cuda.synchronize(ctx.device)
            wall = time.perf_counter() - t0
        # summed self device time over all entries = total kernel time, nothing counted twice
        ranked = sorted(((e.key, self_device_us(e)) for e in prof.key_averages()), key=lambda kv: -kv[1])
    except Exception as err:
        return dict(error=f"{type(err).__name__}: {err}"[:200])
    return dict(kernel_ms=sum(us for _, us in ranked) / 1e3, dispatch_ms=1e3 * dispatch, wall_ms=1e3 * wall,
                top=[[name[:90], round(us / 1e3, 4)] for name, us in ranked[:top] if us > 0])


def sdpa_flags() -> Dict[str, Any]:
    b = torch.backends.cuda
    flags = {}
    for name in ("flash_sdp_enabled", "mem_efficient_sdp_enabled", "math_sdp_enabled", "cudnn_sdp_enabled"):
        fn = getattr(b, name, None)
        flags[name] = bool(fn()) if fn is not None else None
    return flags


# ----------------------------------------------------------------------------------------------------------------
# sections

def section_se(ctx: Ctx) -> List[Dict[str, Any]]:
    """Scale-equalized heads vs their mmseg parents (train step, folded eval, peak memory)."""
    import copy

    import kim_plugins.mmseg  # noqa: F401  registrations
    from mmseg.registry import MODELS

    from kim_plugins.layers.scale_equalizer import calibrate_scale_equalizers, fold_scale_equalizers
    from scale_equalizer import _cases

    # mmseg's widths (R-50-D8 for PSP/ASPP/SepASPP, Swin-T for UPer, HRNet-W18 for FCN) at a 512x512 crop:
    # output stride 8 (and 4 for SepASPP's low-level input), strides 4..32 for UPer / FCN
    batch, side = (2, 32) if ctx.tiny else (8, 512)
    s4, s8 = side // 4, side // 8
    pyramid = [side // 4, side // 8, side // 16, side // 32]
    narrow = 16 if ctx.tiny else 1  # --tiny: every width / 16

    def width(c: Any) -> Any:
        return [width(x) for x in c] if isinstance(c, (list, tuple)) else max(2, c // narrow)

    cases = {key: (se_type, parent_type, {k: width(v) if k in WIDTH_KEYS else v for k, v in kwargs.items()}, None)
             for key, (se_type, parent_type, kwargs, _) in _cases(1.0).items()}
    shapes = {"psp": [(2048, s8)], "aspp": [(2048, s8)], "sepaspp": [(256, s4), (2048, s8)],
              "uper": list(zip([96, 192, 384, 768], pyramid)), "fcn": list(zip([18, 36, 72, 144], pyramid))}
    shapes = {key: [(width(c), hw) for c, hw in v] for key, v in shapes.items()}

    def describe(key: str) -> Dict[str, Any]:
        return dict(section="se", case=f"{cases[key][0]} vs {cases[key][1]}", batch=batch, dtype="fp32",
                    inputs=" ".join(f"{c}x{hw}x{hw}" for c, hw in shapes[key]))

    def measure(key: str, seconds: float) -> List[Dict[str, Any]]:
        se_type, parent_type, kwargs, _ = cases[key]
        torch.manual_seed(0)
        se = MODELS.build(dict(type=se_type, **kwargs)).to(ctx.device)
        parent = MODELS.build(dict(type=parent_type, **kwargs)).to(ctx.device)
        parent.load_state_dict(se.state_dict(), strict=False)
        g = torch.Generator(device=ctx.device).manual_seed(0)
        inputs = [torch.randn(batch, c, hw, hw, device=ctx.device, generator=g) for c, hw in shapes[key]]
        with torch.no_grad():
            out_shape = parent.eval()(inputs).shape
        target = torch.randint(0, kwargs["num_classes"], (batch,) + tuple(out_shape[2:]), device=ctx.device,
                               generator=g)
        calibrate_scale_equalizers(se, [inputs])

        def head_train(head: nn.Module) -> Callable[[], None]:
            def step() -> None:
                head.train()
                head.zero_grad(set_to_none=True)
                F.cross_entropy(head(inputs), target).backward()
            return step

        folded = copy.deepcopy(se)
        fold_scale_equalizers(folded)
        rows = []
        for mode, goal, make, plugin in (("train", 1.05, head_train, se),
                                         ("eval (folded)", 1.02, lambda m: eval_step(m, inputs, ctx), folded)):
            fns = {"parent": make(parent), "plugin": make(plugin)}
            res = interleaved(ctx, fns, "parent", seconds / 2)
            mem = (peak_memory(ctx, fns["parent"]), peak_memory(ctx, fns["plugin"]))
            row = ratio_row(res, "plugin", goal=goal, mem=mem, mem_goal=1.02, mode=mode, **describe(key))
            if key in ("uper", "psp"):  # run 1: folded eval 1.07-1.10x; kernel time vs event time says why
                row["profile_plugin"] = kernel_profile(ctx, fns["plugin"])
                row["profile_parent"] = kernel_profile(ctx, fns["parent"])
            rows.append(row)
        return rows

    return run_cases(ctx, ["uper", "psp", "aspp", "sepaspp", "fcn"], measure, describe)


def _timm_pair_rows(ctx: Ctx, section: str, pairs: List[Tuple[str, str]], sizes: List[int],
                    dtypes: List[str], batches: Dict[int, int], record_kernels: bool) -> List[Dict[str, Any]]:
    """Plugin vs host timm model: train (>= 0.95x) and eval (>= 0.97x) throughput, peak memory."""
    import timm

    import kim_plugins  # noqa: F401  registrations

    def describe(case: Tuple[str, str, int, str]) -> Dict[str, Any]:
        plugin, host, size, dt = case
        return dict(section=section, case=f"{plugin} vs {host}", img=size, batch=batches[size], dtype=dt)

    def measure(case: Tuple[str, str, int, str], seconds: float) -> List[Dict[str, Any]]:
        plugin, host, size, dt = case
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dt]
        batch = batches[size]
        torch.manual_seed(0)
        models = {key: timm.create_model(name, img_size=size, num_classes=10).to(ctx.device)
                  for key, name in (("plugin", plugin), ("parent", host))}
        loaded = models["parent"].load_state_dict(models["plugin"].state_dict(), strict=False)
        g = torch.Generator(device=ctx.device).manual_seed(0)
        x = torch.randn(batch, 3, size, size, device=ctx.device, generator=g)
        y = torch.randint(0, 10, (batch,), device=ctx.device, generator=g)
        rows = []
        for mode, goal in (("train", 0.95), ("eval", 0.97)):
            make = ((lambda m: train_step(m, x, y, ctx, dtype)) if mode == "train"
                    else (lambda m: eval_step(m, x, ctx, dtype)))
            fns = {k: make(m) for k, m in models.items()}
            res = interleaved(ctx, fns, "parent", seconds / 2)
            mem = (peak_memory(ctx, fns["parent"]), peak_memory(ctx, fns["plugin"]))
            row = ratio_row(res, "plugin", goal=goal, higher_is_better=True, mem=mem, mode=mode, **describe(case))
            row["parent_img_s"] = batch / (row["parent_ms"] / 1e3)
            row["plugin_img_s"] = batch / (row["plugin_ms"] / 1e3)
            row["parent_weights_from_plugin"] = not loaded.missing_keys
            if record_kernels and dt == dtypes[0]:
                row["attention_kernels_plugin"] = attention_kernels(ctx, fns["plugin"])
                row["attention_kernels_parent"] = attention_kernels(ctx, fns["parent"])
                row["profile_plugin"] = kernel_profile(ctx, fns["plugin"])
                row["profile_parent"] = kernel_profile(ctx, fns["parent"])
            rows.append(row)
            if record_kernels and ctx.cuda and case == cases[0]:
                rows.append(_same_kernel_row(ctx, fns, seconds / 4, dict(row, mode=mode)))
        return rows

    # by priority, as later cases may fall out of the budget: every pair at the first size and dtype, then the
    # other sizes, then the other dtypes at the first size
    settings = [(s, dtypes[0]) for s in sizes] + [(sizes[0], d) for d in dtypes[1:]]
    cases = [(p, h, s, d) for s, d in settings for p, h in pairs]
    return run_cases(ctx, cases, measure, describe)


def _same_kernel_row(ctx: Ctx, fns: Dict[str, Callable[[], None]], seconds: float,
                     info: Dict[str, Any]) -> Dict[str, Any]:
    """The comparison again with host and plugin both held to SDPA's memory-efficient kernel.

    A float mask rules out flash attention, and a mask that needs a gradient
    also cuDNN attention, so the host may run a kernel GAB cannot: if the
    gap closes here, the kernel is the cost; if it stays, the extra ops are.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    keep = {k: info[k] for k in ("section", "case", "img", "batch", "dtype") if k in info}
    keep["mode"] = f"{info['mode']}, both on the memory-efficient SDPA kernel"

    def held(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
                fn()
        return run

    try:  # a diagnostic: its failure must not cost the case its other rows
        res = interleaved(ctx, {k: held(f) for k, f in fns.items()}, "parent", seconds)
    except Exception as err:
        return dict(keep, error=f"{type(err).__name__}: {err}"[:400])
    return ratio_row(res, "plugin", goal=None, **keep)


def section_gab(ctx: Ctx) -> Tuple[List[Dict[str, Any]], List[str]]:
    """GAB ViT-S/B (and Swin-T/S GAB where registered) vs their timm hosts, 224 and 512 px, bf16 and fp16."""
    import timm

    import kim_plugins  # noqa: F401
    notes = []
    if ctx.tiny:
        pairs, sizes, dtypes, batches = [("vit_small_patch16_gab_224", "vit_small_patch16_224")], [32], ["bf16"], {32: 2}
    else:
        pairs = [("vit_small_patch16_gab_224", "vit_small_patch16_224"),
                 ("vit_base_patch16_gab_224", "vit_base_patch16_224")]
        sizes, dtypes, batches = [224, 512], ["bf16", "fp16"], {224: 64, 512: 16}  # fp16 at 224 px only
        for plugin, host in SWIN_GAB:
            if timm.is_model(plugin):
                pairs.append((plugin, host))
            else:
                notes.append(f"{plugin} is not registered in this build: Swin GAB not measured")
    return _timm_pair_rows(ctx, "gab", pairs, sizes, dtypes, batches, record_kernels=True), notes


def section_pln(ctx: Ctx) -> List[Dict[str, Any]]:
    """PLN ViTs (and GAB+PLN) vs their timm hosts at 224 px, bf16."""
    if ctx.tiny:
        return _timm_pair_rows(ctx, "pln", [("vit_small_patch16_pln_224", "vit_small_patch16_224")], [32],
                               ["bf16"], {32: 2}, record_kernels=False)
    pairs = [("vit_small_patch16_pln_224", "vit_small_patch16_224"),
             ("vit_base_patch16_pln_224", "vit_base_patch16_224"),
             ("vit_small_patch16_gab_pln_224", "vit_small_patch16_224")]
    return _timm_pair_rows(ctx, "pln", pairs, [224], ["bf16"], {224: 64}, record_kernels=False)


def section_sap(ctx: Ctx) -> List[Dict[str, Any]]:
    """SAP ResNet-50-D (timm) and SAP PSPNet / DeepLabV3 R-50-D8 (SAPEncoderDecoder) vs plain."""
    import stochastic_pool as sp

    batch, size = (2, 32) if ctx.tiny else (64, 224)
    seg_batch, seg_size = (2, (16, 32)) if ctx.tiny else (4, (512, 1024))

    def seg_pair(arch: str) -> Tuple[nn.Module, nn.Module]:
        (_, plain, sap), = sp._mmseg_pairs(ctx.device, archs=(arch,), backbone=False)
        return plain, sap

    cases = [("timm resnet50d_sap vs resnet50d", lambda: sp._timm_pair("resnet50d", "resnet50d_sap", ctx.device),
              (batch, 3, size, size))]
    # DeepLabV3 runs the same code as PSPNet: with --tiny one segmentor is enough to check the script
    for arch in ("pspnet",) if ctx.tiny else ("pspnet", "deeplabv3"):
        cases.append((f"mmseg {arch}-sap R-50-D8 (SAPEncoderDecoder) vs {arch}", lambda a=arch: seg_pair(a),
                      (seg_batch, 3) + seg_size))

    def describe(case: Tuple) -> Dict[str, Any]:
        return dict(section="sap", case=case[0], batch=case[2][0], img="x".join(map(str, case[2][2:])), dtype="fp32")

    def measure(case: Tuple, seconds: float) -> List[Dict[str, Any]]:
        _, build, shape = case
        plain, sap = build()
        g = torch.Generator(device=ctx.device).manual_seed(0)
        x = torch.randn(*shape, device=ctx.device, generator=g)
        y = torch.randint(0, 10, (shape[0],), device=ctx.device, generator=g)
        rows = []
        for mode, goal, make in (("train", 1.05, lambda m: sp._train_step(m, x, y)),
                                 ("eval", 1.02, lambda m: sp._eval_step(m, x))):
            fns = {"parent": make(plain), "plugin": make(sap)}
            res = interleaved(ctx, fns, "parent", seconds / 2)
            mem = (peak_memory(ctx, fns["parent"]), peak_memory(ctx, fns["plugin"]))
            rows.append(ratio_row(res, "plugin", goal=goal, mem=mem, mem_goal=1.02, mode=mode, **describe(case)))
        return rows

    return run_cases(ctx, cases, measure, describe)


def section_erf(ctx: Ctx) -> List[Dict[str, Any]]:
    """Batched ERF (one backward per batch) vs the per-image loop, ResNet-50 at 224 px."""
    import timm

    from kim_plugins.layers.erf import erf_maps

    name, size, n = ("resnet18", 32, 2) if ctx.tiny else ("resnet50", 224, 32)

    def describe(_: Any) -> Dict[str, Any]:
        return dict(section="erf", case=f"{name} batched ({n} images, 1 backward) vs per-image loop "
                                        f"({n} backwards)", img=size, batch=n, dtype="fp32", mode="ERF")

    def measure(_: Any, seconds: float) -> List[Dict[str, Any]]:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False).to(ctx.device).eval()
        images = torch.randn(n, 3, size, size, device=ctx.device,
                             generator=torch.Generator(ctx.device).manual_seed(0))
        fns = {"parent": lambda: erf_maps(model, images, batch_size=1),
               "plugin": lambda: erf_maps(model, images, batch_size=n)}
        batched, loop = fns["plugin"](), fns["parent"]()
        res = interleaved(ctx, fns, "parent", seconds)
        row = ratio_row(res, "plugin", goal=5.0, higher_is_better=True, **describe(None))
        row["speedup"] = row["throughput_ratio"]
        row["max_abs_diff_of_maps"] = (batched - loop).abs().max().item()  # maps sum to 1
        return [row]

    return run_cases(ctx, [None], measure, describe)


def section_flex(ctx: Ctx) -> Tuple[List[Dict[str, Any]], List[str]]:
    """GAB attention of ViT-B/16 at 1024 px: bias inside a flex-attention kernel vs materialised."""
    from kim_plugins.layers.gaussian_attention_bias import GaussianAttentionBias, flex_attention_available

    if not flex_attention_available():
        return [], [f"torch {torch.__version__} has no flex_attention: section skipped"]
    notes = []
    heads, dim = 12, 64
    grid, batch = ((4, 4), 2) if ctx.tiny else ((64, 64), 8)  # 1024 px / patch 16 = 64x64 = 4096 tokens (+ cls)
    dtype = torch.float32 if ctx.tiny else torch.bfloat16
    amp = None if ctx.tiny else dtype
    tokens = 1 + grid[0] * grid[1]
    g = torch.Generator(device=ctx.device).manual_seed(0)
    qkv = [torch.randn(batch, heads, tokens, dim, device=ctx.device, dtype=dtype, generator=g) for _ in range(3)]
    qkv_grad = ctx.cuda  # CPU flex attention has no backward for q, k, v: there only σ and a get gradients
    if not qkv_grad:
        notes.append("CPU: flex attention has no q/k/v backward; train cases take gradients for σ and a only")
    notes.append("parent = bias materialised (GaussianAttentionBias.flex=False: the module's bias + SDPA); "
                 "plugin = bias computed inside the flex-attention kernel (flex=True); one attention call of "
                 "ViT-B/16 (12 heads x 64) with q, k, v given")

    def describe(case: Tuple[str, str]) -> Dict[str, Any]:
        return dict(section="flex", case=f"ViT-B/16 GAB attention ({case[0]} granularity), {tokens} tokens",
                    batch=batch, img=grid[0] * 16, dtype=str(dtype).replace("torch.", ""), mode=case[1])

    def measure(case: Tuple[str, str], seconds: float) -> List[Dict[str, Any]]:
        gran, mode = case
        gabs = {}
        for key, flex in (("parent", False), ("plugin", True)):
            torch.manual_seed(0)
            gabs[key] = GaussianAttentionBias(grid, heads, granularity=gran, num_prefix_tokens=1).to(ctx.device)
            gabs[key].flex = flex
            gabs[key].train(mode == "train")
        leaves = [t.detach().requires_grad_(qkv_grad and mode == "train") for t in qkv]

        def make(gab: GaussianAttentionBias) -> Callable[[], None]:
            def run() -> None:  # under autocast, as in the model (the materialised bias is cast by it)
                if mode == "train":
                    gab.zero_grad(set_to_none=True)
                    for t in leaves:
                        t.grad = None
                    with autocast(ctx, amp):
                        out = gab.attention(*leaves)
                    out.float().square().mean().backward()
                else:
                    with torch.no_grad(), autocast(ctx, amp):
                        gab.attention(*leaves)
            return run

        fns = {k: make(m) for k, m in gabs.items()}
        t0 = time.perf_counter()
        fns["plugin"]()  # compiles the flex kernel (forward and backward) on first use
        ctx.sync()
        first_call = time.perf_counter() - t0
        with torch.no_grad(), autocast(ctx, amp):
            diff = (gabs["plugin"].attention(*leaves).float() - gabs["parent"].attention(*leaves).float()).abs()
        res = interleaved(ctx, fns, "parent", seconds)
        mem = (peak_memory(ctx, fns["parent"]), peak_memory(ctx, fns["plugin"]))
        row = ratio_row(res, "plugin", goal=None, mem=mem, **describe(case))
        row.update(first_call_s=first_call, max_abs_diff=diff.max().item())
        return [row]

    model_name = "vit_small_patch16_gab_224" if ctx.tiny else "vit_base_patch16_gab_224"

    def describe_model(case: Tuple[str, str]) -> Dict[str, Any]:
        return dict(section="flex", case=f"{model_name} at {grid[0] * 16} px, bias in the kernel vs materialised",
                    batch=batch, img=grid[0] * 16, dtype=str(dtype).replace("torch.", ""), mode=case[1])

    # smallest first (one attention call, forward only), the whole model last; every case is hard-capped at its
    # share plus the compile allowance, and after a stopped case the rest are skipped (their compile would be too)
    cases = [(gran, mode) for mode in ("eval", "train") for gran in ("block", "head")]
    cases += [("model", mode) for mode in ("eval", "train")]
    notes.append(f"cases smallest first; each hard-capped at its time share + {ctx.flex_compile_cap:.0f} s "
                 "(--flex-compile-cap), the rest skipped after a stopped case")

    def measure_any(case: Tuple[str, str], seconds: float) -> List[Dict[str, Any]]:
        if case[0] == "model":
            return _flex_model(ctx, model_name, seconds, grid, describe_model(case))
        return measure(case, seconds)

    def describe_any(case: Tuple[str, str]) -> Dict[str, Any]:
        return describe_model(case) if case[0] == "model" else describe(case)

    return run_cases(ctx, cases, measure_any, describe_any, hard_extra_s=ctx.flex_compile_cap,
                     stop_after_timeout=True), notes


def _flex_model(ctx: Ctx, name: str, seconds: float, grid: Tuple[int, int], info: Dict[str, Any]
                ) -> List[Dict[str, Any]]:
    """A whole GAB ViT at ``16 * grid`` px: every block's bias in a flex kernel vs materialised."""
    import timm

    import kim_plugins  # noqa: F401
    from kim_plugins.layers.gaussian_attention_bias import GaussianAttentionBias

    size, batch = 16 * grid[0], info["batch"]
    dtype = None if ctx.tiny else torch.bfloat16
    models = {}
    for key, flex in (("parent", False), ("plugin", True)):
        torch.manual_seed(0)
        models[key] = timm.create_model(name, img_size=size, num_classes=10).to(ctx.device)
        for m in models[key].modules():
            if isinstance(m, GaussianAttentionBias):
                m.flex = flex
    g = torch.Generator(device=ctx.device).manual_seed(0)
    x = torch.randn(batch, 3, size, size, device=ctx.device, generator=g)
    y = torch.randint(0, 10, (batch,), device=ctx.device, generator=g)
    if info["mode"] == "train" and ctx.cuda:
        mode_fns = {k: train_step(m, x, y, ctx, dtype) for k, m in models.items()}
    else:
        mode_fns = {k: eval_step(m, x, ctx, dtype) for k, m in models.items()}
        if info["mode"] == "train":  # CPU flex attention has no backward for q, k, v
            info = dict(info, mode="eval (CPU: no flex backward)")
    t0 = time.perf_counter()
    mode_fns["plugin"]()  # compiles the flex kernel on first use
    ctx.sync()
    first_call = time.perf_counter() - t0
    res = interleaved(ctx, mode_fns, "parent", seconds)
    mem = (peak_memory(ctx, mode_fns["parent"]), peak_memory(ctx, mode_fns["plugin"]))
    row = ratio_row(res, "plugin", goal=None, mem=mem, **info)
    row["first_call_s"] = first_call
    return [row]


# ----------------------------------------------------------------------------------------------------------------
# driver

def environment(ctx: Ctx) -> Dict[str, Any]:
    env: Dict[str, Any] = dict(device=str(ctx.device), device_type=ctx.device.type, tiny=ctx.tiny,
                               python=platform.python_version(), torch=torch.__version__,
                               cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version() if ctx.cuda else None,
                               machine=platform.machine(), cpu_count=os.cpu_count())
    if ctx.cuda:
        env["gpu_name"] = torch.cuda.get_device_name(ctx.device)
        env["sdpa_flags"] = sdpa_flags()
        env["cudnn_benchmark"] = torch.backends.cudnn.benchmark
        env["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    for mod in ("timm", "mmengine", "mmcv", "mmseg"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as err:  # recorded, not fatal
            env[mod] = f"unavailable ({type(err).__name__})"
    try:
        import mmcv._ext as ext
        env["mmcv_ops_stubbed"] = bool(getattr(ext, "STUBBED", False) is True)
    except ImportError:
        env["mmcv_ops_stubbed"] = None
    return env


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="sections to run")
    p.add_argument("--time-budget", type=float, default=330.0,
                   help="seconds for all sections together (default 330); later cases are skipped once spent")
    p.add_argument("--rounds", type=int, default=20, help="most timed rounds per comparison (default 20)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds before timing (default 2)")
    p.add_argument("--tiny", action="store_true",
                   help="toy sizes on any device (checks the script; the test suite runs it on CPU)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--out", default=None,
                   help="output folder (default: benchmarks/results on CUDA; required elsewhere); "
                        "files gpu.json/gpu.md on CUDA, gpu_script_check_<device>.* elsewhere")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--flex-compile-cap", type=float, default=FLEX_COMPILE_CAP_S,
                   help=f"seconds each flex case may run beyond its time share (its first call compiles the "
                        f"kernel) before it is stopped and the later flex cases skipped (default {FLEX_COMPILE_CAP_S:g})")
    return p.parse_args(argv)


def output_stem(args: argparse.Namespace, device: torch.device) -> str:
    """``<out>/gpu`` for a CUDA run; elsewhere a name that cannot pass for GPU figures, never in benchmarks/results."""
    if device.type == "cuda" and not args.tiny:
        return os.path.join(args.out or RESULTS_DIR, "gpu")
    if args.out is None or os.path.realpath(args.out) == os.path.realpath(RESULTS_DIR):
        raise SystemExit(f"error: a {device.type}{' --tiny' if args.tiny else ''} run must not write into "
                         f"{RESULTS_DIR} (those are the published GPU figures): pass --out DIR")
    return os.path.join(args.out, f"gpu_script_check_{device.type}{'_tiny' if args.tiny else ''}")


def render_md(report: Dict[str, Any]) -> str:
    env = report["env"]
    on_gpu = env["device_type"] == "cuda" and not env["tiny"]
    title = (f"# GPU figures: plugins vs their plain parents ({env.get('gpu_name')})" if on_gpu else
             f"# Script check on {env['device_type'].upper()} (--tiny={env['tiny']}): NOT GPU figures")
    if not report.get("complete", True):
        title += "\n\n**PARTIAL: the run has not finished (or was killed); sections marked 'not reached' never ran.**"
    lines = [title, "",
             f"`python benchmarks/gpu.py {' '.join(report['argv'])}` — torch {env['torch']} (CUDA {env['cuda']}, "
             f"cuDNN {env['cudnn']}), timm {env['timm']}, mmseg {env['mmseg']}, mmcv {env['mmcv']}, "
             f"Python {env['python']}; {report['elapsed_s']:.0f} s of a {report['time_budget_s']:.0f} s budget.", "",
             "Each comparison: plugin and plain parent interleaved in a shuffled order per round, the parent twice "
             "per round (`aa_ratio`, the A/A control: the noise floor), "
             + ("CUDA events around each call" if env["device_type"] == "cuda" else "time.perf_counter")
             + ", warm-up rounds, fixed seeds; `time_ratio` = median over rounds of plugin time / parent time "
             "[IQR], `throughput_ratio` = 1 / time_ratio; memory = peak CUDA allocation of one call above the "
             "resting allocation.", ""]
    if env.get("mmcv_ops_stubbed"):
        lines += ["mmcv was installed without its compiled ops (`MMCV_WITH_OPS=0`) and `mmcv._ext` was stubbed "
                  "(benchmarks/gpu_env.sh); no benchmarked module calls a compiled op (a stubbed op raises).", ""]
    if on_gpu:
        lines += [f"SDPA flags: {env.get('sdpa_flags')}; cudnn.benchmark={env.get('cudnn_benchmark')}, "
                  f"TF32 matmul={env.get('tf32_matmul')}.", ""]
    cols = ["case", "mode", "dtype", "batch", "img", "inputs", "parent_ms", "plugin_ms", "time_ratio",
            "throughput_ratio", "aa_ratio", "goal", "meets_goal", "mem_ratio", "mem_goal", "mem_meets_goal",
            "peak_mem_parent_MiB", "rounds", "skipped", "error"]
    for name, sec in report["sections"].items():
        lines += [f"## {name}: {sec['status']}", ""]
        for note in sec.get("notes", []):
            lines.append(f"- {note}")
        if sec.get("error"):
            lines += ["```", sec["error"], "```"]
        rows = sec.get("rows", [])
        if rows:
            present = [c for c in cols if any(c in r for r in rows)]
            lines += ["", markdown_table([{c: _fmt(r.get(c, "")) for c in present} for r in rows], present)]
            extra = [r for r in rows if r.get("attention_kernels_plugin") or "first_call_s" in r
                     or r.get("profile_plugin")]
            for r in extra:
                if r.get("profile_plugin"):
                    lines.append(f"- {r['case']} {r.get('img', '')} {r['dtype']} {r['mode']}: one call profiled, "
                                 f"plugin {r['profile_plugin']}, parent {r['profile_parent']}")
                if r.get("attention_kernels_plugin") is not None:
                    lines.append(f"- {r['case']} {r['img']} px {r['dtype']} {r['mode']}: attention kernels plugin "
                                 f"{r['attention_kernels_plugin']}, parent {r['attention_kernels_parent']}")
                if "first_call_s" in r:
                    diff = f", max |flex - materialised| {r['max_abs_diff']:.3g}" if "max_abs_diff" in r else ""
                    lines.append(f"- {r['case']} {r['mode']}: first call (flex compile) {r['first_call_s']:.1f} s"
                                 + diff)
        lines.append("")
    return "\n".join(lines)


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    return v


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    stem = output_stem(args, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # the same setting for parent and plugin
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    start = time.perf_counter()
    ctx = Ctx(device=device, tiny=args.tiny, rounds=args.rounds, warmup=0 if args.tiny else args.warmup,
              deadline=start + args.time_budget, flex_compile_cap=args.flex_compile_cap)
    selected = [s for s in SECTIONS if s in args.only]
    # written after every section: a run killed later still leaves every finished section on disk
    report: Dict[str, Any] = dict(argv=list(sys.argv[1:] if argv is None else argv), time_budget_s=args.time_budget,
                                  env=environment(ctx), complete=False,
                                  sections={s: dict(status="not reached (the run ended before this section)")
                                            for s in selected})
    weight_left = sum(WEIGHTS[s] for s in selected) or 1.0
    for name in selected:
        left = ctx.deadline - time.perf_counter()
        share = WEIGHTS[name] / weight_left if weight_left > 0 else 1.0
        weight_left -= WEIGHTS[name]
        ctx.section_deadline = time.perf_counter() + max(left * share, 0.0)
        sec: Dict[str, Any] = dict(status="ok", rows=[], notes=[])
        t0 = time.perf_counter()
        print(f"== {name} ({max(left * share, 0):.0f} s)", flush=True)
        try:
            if name == "suite":
                sec["notes"].append(suite_note(device))
                sec["status"] = "skipped"
            elif left <= (1.0 if args.tiny else 4.0):
                sec["status"] = "skipped"
                sec["notes"].append("time budget spent before this section")
            else:
                out = globals()[f"section_{name}"](ctx)
                rows, notes = out if isinstance(out, tuple) else (out, [])
                sec["rows"], sec["notes"] = rows, sec["notes"] + notes
        except Exception:  # recorded, the run goes on
            sec["status"] = "error"
            sec["error"] = traceback.format_exc()[-3000:]
        if sec["status"] == "ok" and any("error" in r or "skipped" in r for r in sec["rows"]):
            sec["status"] = "partial: " + ", ".join(
                f"{sum(key in r for r in sec['rows'])} case(s) {word}" for key, word in
                (("error", "failed"), ("skipped", "skipped (time budget)")) if any(key in r for r in sec["rows"]))
        sec["seconds"] = time.perf_counter() - t0
        report["sections"][name] = sec
        print(f"== {name}: {sec['status']} ({sec['seconds']:.0f} s)", flush=True)
        _free(ctx)
        write_report(report, stem, start)
    report["complete"] = True
    write_report(report, stem, start)
    print(f"wrote {stem}.json and {stem}.md ({report['elapsed_s']:.0f} s)", flush=True)
    return report


def write_report(report: Dict[str, Any], stem: str, start: float) -> None:
    """(Re)write ``<stem>.json`` and ``<stem>.md`` with what is measured so far."""
    report["elapsed_s"] = time.perf_counter() - start
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    for ext, text in ((".json", json.dumps(report, indent=1, default=str)), (".md", render_md(report))):
        with open(stem + ext + ".tmp", "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(stem + ext + ".tmp", stem + ext)  # never a half-written file


def suite_note(device: torch.device) -> str:
    """Why ``tools/benchmark_suite.py --suite full`` is not timed by this script."""
    return ("not run: tools/benchmark_suite.py trains on Fashion-MNIST read from disk (the Debian package "
            "dataset-fashion-mnist or --fashion-mnist DIR), which the device image does not hold and cannot "
            "download, and its full suite trains every pair for several seeds, far beyond this script's time "
            "budget; time it with `python tools/benchmark_suite.py --suite full --device cuda` on a GPU machine "
            "that has the data")


if __name__ == "__main__":
    main()
