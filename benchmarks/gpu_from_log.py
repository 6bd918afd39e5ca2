#!/usr/bin/env python
"""Rebuild ``benchmarks/results/gpu.{json,md}`` from the stdout log of a ``benchmarks/gpu.py`` run that never wrote them.

The first GPU run (2026-12-04, NVIDIA H200) was killed at its command timeout
inside the ``flex`` section, before gpu.py wrote its report (it only wrote at
the end then); its stdout log survived: ``benchmarks/results/gpu_run1_log.txt``.
That log holds, per measured case, one JSON line with ``case``, ``mode``,
``time_ratio``, ``aa_ratio`` and ``mem_ratio`` (a case skipped for time prints
its ``case`` alone). This script parses it, attaches to each row what the log
does not print but gpu.py's case order at that commit (4eb8d8f) fixes (image
size, dtype, batch: the GAB cases run 224 px bf16 for every pair, then 512 px
bf16, then 224 px fp16), the goals of issue 17, and whether each is met.
Nothing is typed by hand: every figure comes from the log.

Usage::

    python benchmarks/gpu_from_log.py                       # the run-1 log -> benchmarks/results/gpu.{json,md}
    python benchmarks/gpu_from_log.py LOG --out DIR
"""
from __future__ import annotations

import argparse
import json
import os
import re
from typing import Any, Dict, List, Optional, Tuple

from kim_plugins.markdown import markdown_table

_COLUMNS = ["case", "mode", "img", "dtype", "batch", "time", "throughput", "aa", "goal", "met", "mem"]
_HEADERS = ["case", "mode", "img", "dtype", "batch", "time ratio", "throughput", "A/A", "goal", "met", "mem ratio"]

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(HERE, "results")
LOG = os.path.join(RESULTS_DIR, "gpu_run1_log.txt")

#: what the lead recorded about run 1 (the log itself does not print the environment)
RUN1 = dict(
    date="2026-12-04", gpu_name="NVIDIA H200", driver="580.159.04", python="3.12", torch="2.11.0+cu130",
    cuda="13.0", timm="1.0.31 (carried wheel)", mmcv_ops_stubbed=True, gpu_py_commit="4eb8d8f",
    command=". benchmarks/gpu_env.sh; python3 benchmarks/gpu.py --out $OUT --time-budget 270 (command timeout 450 s)",
    status=("partial run: SE ASPP/SepASPP/FCN skipped (section time share spent), flex not completed (killed at "
            "the command timeout), suite not run"),
)

#: per section: (goal on the time ratio or on the throughput/speed-up, higher_is_better) by mode; memory goal
GOALS: Dict[str, Dict[str, Tuple[float, bool]]] = {
    "se": {"train": (1.05, False), "eval (folded)": (1.02, False)},
    "gab": {"train": (0.95, True), "eval": (0.97, True)},
    "pln": {"train": (0.95, True), "eval": (0.97, True)},
    "sap": {"train": (1.05, False), "eval": (1.02, False)},
    "erf": {"ERF": (5.0, True)},
}
MEM_GOAL = {"se": 1.02, "sap": 1.02}


def _settings(section: str, n_cases: int) -> List[Dict[str, Any]]:
    """Image size / dtype / batch of the n-th case of a section, in gpu.py's order at commit 4eb8d8f."""
    if section == "gab":  # 2 ViT pairs (Swin GAB not registered), 224 bf16, 512 bf16, 224 fp16
        order = [dict(img=224, dtype="bf16", batch=64), dict(img=512, dtype="bf16", batch=16),
                 dict(img=224, dtype="fp16", batch=64)]
        return [order[i // 2] for i in range(n_cases)]
    if section == "pln":
        return [dict(img=224, dtype="bf16", batch=64)] * n_cases
    if section == "se":
        return [dict(img=512, dtype="fp32", batch=8)] * n_cases
    if section == "sap":
        return [dict(img=224, dtype="fp32", batch=64)] + [dict(img="512x1024", dtype="fp32", batch=4)] * (n_cases - 1)
    if section == "erf":
        return [dict(img=224, dtype="fp32", batch=32)] * n_cases
    return [{}] * n_cases


def parse_log(text: str) -> Dict[str, Dict[str, Any]]:
    """Sections of a gpu.py stdout log: ``{name: {"budget_s", "rows", "complete"}}`` in log order."""
    sections: Dict[str, Dict[str, Any]] = {}
    current: Optional[Dict[str, Any]] = None
    names = list(re.finditer(r"^== (\w+) \((\d+) s\)$", text, flags=re.M))
    for line in text.splitlines():
        head = re.match(r"^== (\w+) \((\d+) s\)$", line)
        if head:
            current = sections[head.group(1)] = dict(budget_s=int(head.group(2)), rows=[])
        elif current is not None and line.startswith("{"):
            current["rows"].append(json.loads(line))
    for i, m in enumerate(names):  # gpu.py printed a section's rows when it ended: the last one printed none
        sections[m.group(1)]["complete"] = i < len(names) - 1 or bool(sections[m.group(1)]["rows"])
    return sections


def build_rows(section: str, raw: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Rows with settings, throughput ratio, goals and verdicts; a row with its case alone was skipped for time."""
    out = [dict(r) for r in raw]
    # a case prints its rows consecutively (train, then eval): a new case starts where the name changes or a mode repeats
    index, n = [], -1
    for i, row in enumerate(out):
        prev = out[i - 1] if i else None
        if prev is None or row["case"] != prev["case"] or row.get("mode") == prev.get("mode"):
            n += 1
        index.append(n)
    settings = _settings(section, n + 1)
    for row, case_index in zip(out, index):
        row.update({k: v for k, v in settings[case_index].items() if k not in row}, section=section)
        if "time_ratio" not in row:
            row["skipped"] = "section time share spent"
            continue
        row["throughput_ratio"] = 1.0 / row["time_ratio"]
        goal, higher = GOALS[section][row["mode"]]
        measured = row["throughput_ratio"] if higher else row["time_ratio"]
        row["goal"] = f"{'>=' if higher else '<='} {goal:g} ({'throughput' if higher else 'time'})"
        row["meets_goal"] = bool(measured >= goal) if higher else bool(measured <= goal)
        if section in MEM_GOAL and "mem_ratio" in row:
            row["mem_goal"] = f"<= {MEM_GOAL[section]:g}"
            row["mem_meets_goal"] = bool(row["mem_ratio"] <= MEM_GOAL[section])
    return out


def build_report(text: str, meta: Dict[str, Any]) -> Dict[str, Any]:
    sections = {}
    for name, sec in parse_log(text).items():
        rows = build_rows(name, sec["rows"])
        if not sec["complete"]:
            status = "not completed: killed at the command timeout, no row printed"
        elif any("skipped" in r for r in rows):
            status = f"partial: {sum('skipped' in r for r in rows)} case(s) skipped (section time share spent)"
        else:
            status = "ok"
        sections[name] = dict(status=status, time_share_s=sec["budget_s"], rows=rows)
    sections.setdefault("suite", dict(status="not run (the run was killed before it)", rows=[]))
    return dict(source="stdout log benchmarks/results/gpu_run1_log.txt, parsed by benchmarks/gpu_from_log.py",
                env=meta, sections=sections)


def render_md(report: Dict[str, Any]) -> str:
    env = report["env"]
    lines = [f"# GPU figures, run 1 ({env['gpu_name']}, {env['date']}): PARTIAL", "",
             f"**{env['status']}.**", "",
             f"{env['gpu_name']} (driver {env['driver']}), torch {env['torch']} (CUDA {env['cuda']}), Python "
             f"{env['python']}, timm {env['timm']}, mmcv compiled ops stubbed (benchmarks/gpu_env.sh), "
             f"gpu.py at {env['gpu_py_commit']}: `{env['command']}`.", "",
             f"Rebuilt from the {report['source']}: the log prints per case only the time ratio (median over "
             "interleaved rounds of plugin / parent, CUDA events), the A/A control (parent against itself, the "
             "noise floor) and the peak-memory ratio; image size, dtype and batch follow from gpu.py's case "
             "order. No IQRs, absolute times or attention-kernel names survive: the next run records them "
             "(benchmarks/results/gpu_next_run.md). throughput = 1 / time ratio.", ""]
    for name, sec in report["sections"].items():
        lines += [f"## {name}: {sec['status']}", ""]
        if not sec["rows"]:
            continue
        table = []
        for r in sec["rows"]:
            if "skipped" in r:
                table.append(dict(case=r["case"], mode=f"skipped: {r['skipped']}"))
                continue
            mem = f"{r['mem_ratio']:.3f}" if "mem_ratio" in r else ""
            if "mem_meets_goal" in r:
                mem += f" ({r['mem_goal']}: {'yes' if r['mem_meets_goal'] else 'NO'})"
            table.append(dict(case=r["case"], mode=r["mode"], img=r.get("img", ""), dtype=r.get("dtype", ""),
                              batch=r.get("batch", ""), time=f"{r['time_ratio']:.3f}",
                              throughput=f"{r['throughput_ratio']:.3f}", aa=f"{r['aa_ratio']:.3f}",
                              goal=r["goal"], met="yes" if r["meets_goal"] else "NO", mem=mem))
        lines.append(markdown_table(table, _COLUMNS, _HEADERS))
        lines.append("")
    met = [r for s in report["sections"].values() for r in s["rows"] if "meets_goal" in r]
    missed = [f"{r['section']} {r['case']} {r['mode']} {r.get('img', '')} {r.get('dtype', '')}" for r in met
              if not r["meets_goal"]]
    lines += ["## Goals", "", f"{len(met) - len(missed)} of {len(met)} measured rows meet their time goal; "
              "missed:", ""] + [f"- {m}" for m in missed] + [""]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("log", nargs="?", default=LOG)
    p.add_argument("--out", default=RESULTS_DIR)
    args = p.parse_args(argv)
    with open(args.log) as f:
        report = build_report(f.read(), RUN1)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu.json"), "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    with open(os.path.join(args.out, "gpu.md"), "w") as f:
        f.write(render_md(report))
    return report


if __name__ == "__main__":
    main()
