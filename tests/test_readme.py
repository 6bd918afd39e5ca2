"""The README lists every registered name, and CI runs exactly the README's test command."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(rel):
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


def test_readme_lists_every_registered_name():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "list_plugins.py"), "--json"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    import json
    data = json.loads(out.stdout)
    names = [row["name"] for rows in data["registries"].values() for row in rows]
    required = {"SEUPerHead", "SEPSPHead", "SEASPPHead", "SEDepthwiseSeparableASPPHead", "SEFCNHead",
                "ScaleEqualizerCalibrationHook", "RAASPPHead", "RADepthwiseSeparableASPPHead", "ResNetV1dSAP",
                "FashionScenesDataset", "resnet18_sap", "resnet50d_sap", "vit_small_patch16_gab_pln_224",
                "vit_relpos_base_patch16_gab_224", "vit_base_patch16_pln_224"}
    assert required <= set(names), required - set(names)
    readme = _read("README.md")
    missing = [n for n in names if f"`{n}`" not in readme]
    assert not missing, f"README.md does not list {missing}: paste `python tools/list_plugins.py`"


def test_ci_runs_the_readme_test_command_verbatim():
    readme = _read("README.md")
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    commands = [line.strip() for b in blocks for line in b.splitlines()
                if line.strip() and not line.strip().startswith("#")]
    test_cmd = [c for c in commands if "pytest" in c]
    assert len(test_cmd) == 1, commands
    assert commands[0].startswith("bash tools/setup.sh && ") and "benchmark_suite.py" in commands[0]
    ci = [line.strip() for line in _read(".ci/run").splitlines()]
    assert test_cmd[0] in ci
