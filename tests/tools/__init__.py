"""Shared helper: load a script of tools/ as a module."""
import importlib.util
import os

TOOLS = os.path.join(os.path.dirname(__file__), "..", "..", "tools")


def load_tool(name):
    """``tools/<name>.py`` as a fresh module (its folder on sys.path, as when run as a script)."""
    import sys

    if TOOLS not in sys.path:
        sys.path.insert(0, TOOLS)
    spec = importlib.util.spec_from_file_location(f"kim_tools_{name}", os.path.join(TOOLS, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
