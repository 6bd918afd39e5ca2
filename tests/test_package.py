"""The package's import contract."""
import subprocess
import sys

import pytest


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_import_kim_plugins_does_not_import_mmseg_or_mmcv():
    res = _run("import sys, kim_plugins; "
               "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('mmseg', 'mmcv', 'mmengine')); "
               "print(bad); assert not bad, bad")
    assert res.returncode == 0, res.stdout + res.stderr


def test_import_kim_plugins_mmseg_registers_in_mmseg_registries():
    res = _run("import kim_plugins.mmseg\n"
               "from mmseg.registry import MODELS, HOOKS, DATASETS\n"
               "from mmengine.runner import Runner\n"
               "assert getattr(Runner.resume, '_kim_plugins_resume_fix', False)\n"
               "print('ok')")
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout + res.stderr



@pytest.mark.parametrize("imports, not_imported", [
    # the dry run and the tools use kim_plugins.mmseg, never the other way round
    ("kim_plugins.mmseg, kim_plugins.config.inspect, kim_plugins.config.rewrite",
     ("kim_plugins.dry_run", "kim_plugins.cli")),
    # the config glue and the tools' shared pieces import without mmseg or mmengine
    ("kim_plugins.config.inspect, kim_plugins.config.rewrite, kim_plugins.cli.common", ("mmseg", "mmcv", "mmengine")),
])
def test_imports_point_down(imports, not_imported):
    res = _run(f"import sys, {imports}\n"
               f"up = sorted(m for m in sys.modules if m.startswith({not_imported!r}))\n"
               "print(up); assert not up, up")
    assert res.returncode == 0, res.stdout + res.stderr
