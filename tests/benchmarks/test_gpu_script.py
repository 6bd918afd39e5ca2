"""benchmarks/gpu.py: the --tiny run on CPU writes a complete, self-consistent report that never passes for GPU figures."""
import json
import os

import pytest
import torch

from kim_plugins.benchmarking import TimingResult

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MEASURED = ("se", "gab", "pln", "sap", "erf", "flex")


@pytest.fixture(scope="module")
def gpu():
    from benchmarks import gpu

    return gpu


@pytest.fixture(scope="module")
def tiny_report(gpu, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_tiny")
    report = gpu.main(["--tiny", "--device", "cpu", "--out", str(out), "--time-budget", "600"])
    return out, report


def test_tiny_cpu_run_is_labelled_as_a_script_check_and_not_as_gpu_figures(tiny_report):
    out, report = tiny_report
    assert sorted(os.listdir(out)) == ["gpu_script_check_cpu_tiny.json", "gpu_script_check_cpu_tiny.md"]
    with open(out / "gpu_script_check_cpu_tiny.json") as f:
        on_disk = json.load(f)
    assert on_disk["env"]["device_type"] == "cpu" and on_disk["env"]["tiny"] is True
    assert "gpu_name" not in on_disk["env"]
    md = (out / "gpu_script_check_cpu_tiny.md").read_text()
    assert md.splitlines()[0] == "# Script check on CPU (--tiny=True): NOT GPU figures"
    assert "CUDA events" not in md and "time.perf_counter" in md


def test_every_section_ran_and_every_row_is_consistent(tiny_report):
    _, report = tiny_report
    sections = report["sections"]
    assert list(sections) == ["se", "gab", "pln", "sap", "erf", "suite", "flex"]  # flex (compiles) last
    assert report["complete"] is True
    assert sections["suite"]["status"] == "skipped" and "Fashion-MNIST" in sections["suite"]["notes"][0]
    for name in MEASURED:
        sec = sections[name]
        assert sec["status"] == "ok", (name, sec.get("error"), [r.get("error") for r in sec["rows"]])
        assert sec["rows"], name
        for row in sec["rows"]:
            assert row["parent_ms"] > 0 and row["plugin_ms"] > 0 and row["aa_ratio"] > 0
            assert row["throughput_ratio"] == pytest.approx(1 / row["time_ratio"])
            q1, q3 = row["time_ratio_iqr"]
            assert q1 <= row["time_ratio"] <= q3
            if "goal" in row:
                op, value = row["goal"].split()
                measured = row["throughput_ratio"] if op == ">=" else row["time_ratio"]
                assert row["meets_goal"] == (measured >= float(value) if op == ">=" else measured <= float(value))
            assert "mem_ratio" not in row  # peak CUDA memory only on CUDA
    cases = {(r["case"], r["mode"]) for r in sections["se"]["rows"]}
    assert len(cases) == 10  # five heads, train and folded eval
    assert {r["mode"] for r in sections["gab"]["rows"]} == {"train", "eval"}
    flex = sections["flex"]["rows"]
    # smallest first: one attention call (eval, then train; block, then head granularity), the whole model last
    assert [(r["case"].split(" (")[1].split()[0], r["mode"]) for r in flex[:4]] == [
        ("block", "eval"), ("head", "eval"), ("block", "train"), ("head", "train")]
    assert [r["mode"] for r in flex[4:]] == ["eval", "eval (CPU: no flex backward)"]  # model
    for row in flex[:4]:  # attention alone: flex attention computes the materialised path's values
        assert row["max_abs_diff"] < 1e-5


def test_ratio_row_takes_the_median_of_per_round_ratios_and_checks_the_goal(gpu):
    res = TimingResult(baseline="parent", times={"parent": [1.0, 2.0, 4.0], "parent (A/A)": [1.0, 2.0, 4.0],
                                                 "plugin": [1.2, 2.2, 4.0]}, rounds=3)
    row = gpu.ratio_row(res, "plugin", goal=1.05, mem=(100, 103), mem_goal=1.02)
    assert row["time_ratio"] == pytest.approx(1.1) and row["aa_ratio"] == 1.0
    assert row["meets_goal"] is False and row["mem_ratio"] == pytest.approx(1.03) and row["mem_meets_goal"] is False
    row = gpu.ratio_row(res, "plugin", goal=0.9, higher_is_better=True)
    assert row["throughput_ratio"] == pytest.approx(1 / 1.1) and row["meets_goal"] is True


def test_cpu_run_refuses_to_write_into_the_published_results(gpu):
    for argv in (["--tiny", "--device", "cpu"], ["--tiny", "--device", "cpu", "--out", gpu.RESULTS_DIR]):
        with pytest.raises(SystemExit, match="must not write into"):
            gpu.main(argv)


def test_spent_budget_skips_sections_with_a_note(gpu, tmp_path):
    report = gpu.main(["--tiny", "--device", "cpu", "--out", str(tmp_path), "--only", "erf", "flex",
                       "--time-budget", "0"])
    for name in ("erf", "flex"):
        assert report["sections"][name]["status"] == "skipped"
        assert report["sections"][name]["notes"] == ["time budget spent before this section"]


def test_help(gpu, capsys):
    with pytest.raises(SystemExit) as exc:
        gpu.main(["--help"])
    assert exc.value.code == 0
    assert "--time-budget" in capsys.readouterr().out


def test_a_case_past_its_hard_limit_is_stopped_recorded_and_the_rest_skipped(gpu, capsys):
    import time
    now = time.perf_counter()
    ctx = gpu.Ctx(device=torch.device("cpu"), tiny=True, rounds=3, warmup=0, deadline=now + 2.0,
                  section_deadline=now + 2.0)

    def measure(case, seconds):
        if case == "slow":  # a compile that never ends
            time.sleep(30)
        return [dict(case=case, time_ratio=1.0)]

    t0 = time.perf_counter()
    rows = gpu.run_cases(ctx, ["fast", "slow", "after"], measure, lambda c: dict(case=c), hard_extra_s=0.2,
                         stop_after_timeout=True)
    assert time.perf_counter() - t0 < 5
    assert rows[0] == dict(case="fast", time_ratio=1.0)
    assert rows[1]["error"].startswith("CaseTimeout: stopped at its hard time limit")
    assert rows[2]["case"] == "after" and "stopped" in rows[2]["skipped"]
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert printed == rows  # every row printed as it came, skipped and failed ones included


def test_report_files_are_written_after_every_section(gpu, tmp_path, monkeypatch):
    seen = []

    def fake_erf(ctx):
        return [dict(case="x", time_ratio=1.0)]

    def fake_flex(ctx):  # the run is killed here: the files on disk must already hold erf
        with open(tmp_path / "gpu_script_check_cpu_tiny.json") as f:
            seen.append(json.load(f))
        raise KeyboardInterrupt

    monkeypatch.setattr(gpu, "section_erf", fake_erf)
    monkeypatch.setattr(gpu, "section_flex", fake_flex)
    with pytest.raises(KeyboardInterrupt):
        gpu.main(["--tiny", "--device", "cpu", "--out", str(tmp_path), "--only", "erf", "flex"])
    on_disk = seen[0]
    assert on_disk["complete"] is False
    assert on_disk["sections"]["erf"]["rows"] == [dict(case="x", time_ratio=1.0)]
    assert on_disk["sections"]["flex"]["status"].startswith("not reached")
    md = (tmp_path / "gpu_script_check_cpu_tiny.md").read_text()
    assert "PARTIAL" in md and "## flex: not reached" in md


def test_same_kernel_row_holds_both_to_the_memory_efficient_kernel_and_records_a_failure(gpu):
    import time
    import torch.nn.functional as F
    ctx = gpu.Ctx(device=torch.device("cpu"), tiny=True, rounds=3, warmup=0, deadline=time.perf_counter() + 60,
                  section_deadline=time.perf_counter() + 60)
    info = dict(section="gab", case="p vs h", img=32, batch=2, dtype="bf16", mode="eval", time_ratio=9.9)
    q = torch.randn(1, 1, 4, 8)
    seen = []

    def sdpa():  # CPU has no memory-efficient kernel: under the hold SDPA refuses
        seen.append(1)
        F.scaled_dot_product_attention(q, q, q)

    row = gpu._same_kernel_row(ctx, {"parent": sdpa, "plugin": sdpa}, 1.0, info)
    assert seen and row["mode"] == "eval, both on the memory-efficient SDPA kernel" and "error" in row
    assert "time_ratio" not in row and row["case"] == "p vs h"
    row = gpu._same_kernel_row(ctx, {"parent": lambda: None, "plugin": lambda: None}, 1.0, info)
    assert "error" not in row and row["rounds"] == 3 and row["time_ratio"] > 0
