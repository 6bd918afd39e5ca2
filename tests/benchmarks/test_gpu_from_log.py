"""benchmarks/gpu_from_log.py: the published run-1 GPU figures are exactly what the surviving log says."""
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = os.path.join(ROOT, "benchmarks", "results")


@pytest.fixture(scope="module")
def mod():
    from benchmarks import gpu_from_log

    return gpu_from_log


def test_published_files_are_the_parse_of_the_committed_log(mod, tmp_path):
    report = mod.main([os.path.join(RESULTS, "gpu_run1_log.txt"), "--out", str(tmp_path)])
    for name in ("gpu.json", "gpu.md"):
        with open(tmp_path / name) as new, open(os.path.join(RESULTS, name)) as old:
            assert new.read() == old.read(), name
    assert report["env"]["status"].startswith("partial run")


def test_rows_carry_the_logged_ratios_with_settings_and_verdicts(mod):
    log = "\n".join([
        "== gab (71 s)",
        json.dumps({"case": "S", "mode": "train", "time_ratio": 1.25, "aa_ratio": 1.0, "mem_ratio": 1.0}),
        json.dumps({"case": "S", "mode": "eval", "time_ratio": 1.0, "aa_ratio": 1.0, "mem_ratio": 1.0}),
        json.dumps({"case": "B", "mode": "train", "time_ratio": 1.0, "aa_ratio": 1.0, "mem_ratio": 1.0}),
        json.dumps({"case": "B", "mode": "eval", "time_ratio": 1.0, "aa_ratio": 1.0, "mem_ratio": 1.0}),
        json.dumps({"case": "S", "mode": "train", "time_ratio": 1.0, "aa_ratio": 1.0, "mem_ratio": 1.0}),
        "== se (43 s)",
        json.dumps({"case": "SEUPerHead vs UPerHead", "mode": "train", "time_ratio": 1.04, "aa_ratio": 1.0,
                    "mem_ratio": 1.03}),
        json.dumps({"case": "SEFCNHead vs FCNHead"}),
        "== flex (69 s)",
    ])
    report = mod.build_report(log, mod.RUN1)
    gab = report["sections"]["gab"]["rows"]
    assert [(r["img"], r["dtype"]) for r in gab] == [(224, "bf16")] * 4 + [(512, "bf16")]
    assert gab[0]["throughput_ratio"] == pytest.approx(0.8) and gab[0]["meets_goal"] is False  # >= 0.95 throughput
    assert gab[1]["meets_goal"] is True
    se = report["sections"]["se"]
    assert se["rows"][0]["meets_goal"] is True and se["rows"][0]["mem_meets_goal"] is False  # 1.04 <= 1.05; 1.03 > 1.02
    assert se["rows"][1]["skipped"] and se["status"].startswith("partial: 1 case")
    assert report["sections"]["flex"]["status"].startswith("not completed")
    assert report["sections"]["suite"]["status"].startswith("not run")
