"""Every tool is a module of kim_plugins.cli with parse_args/main, a console script, and a tools/ entry point."""
import ast
import importlib
import os
import re

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
CLI = os.path.join(ROOT, "kim_plugins", "cli")
TOOLS = sorted(f[:-3] for f in os.listdir(CLI) if f.endswith(".py") and f not in ("__init__.py", "common.py", "inputs.py"))


def test_every_tool_has_a_console_script_and_a_thin_tools_entry_point():
    setup = open(os.path.join(ROOT, "setup.py")).read()
    scripts = dict(re.findall(r'"(kim-[a-z-]+)=(kim_plugins\.cli\.\w+:main)"', setup))
    assert scripts == {f"kim-{t.replace('_', '-')}": f"kim_plugins.cli.{t}:main" for t in TOOLS}
    for t in TOOLS:
        script = open(os.path.join(ROOT, "tools", f"{t}.py")).read()
        assert f"from kim_plugins.cli.{t} import main" in script and "sys.path" not in script, t
        assert len(ast.parse(script).body) <= 4, f"tools/{t}.py holds logic: move it to kim_plugins/cli/{t}.py"


@pytest.mark.parametrize("name", TOOLS)
def test_help_of_every_tool(name, capsys):
    tool = importlib.import_module(f"kim_plugins.cli.{name}")
    with pytest.raises(SystemExit) as e:
        tool.parse_args(["--help"])
    assert e.value.code == 0 and "usage:" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        tool.main(["--help"])
    assert e.value.code == 0
