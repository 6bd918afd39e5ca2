"""Shared helper: run a tool of :mod:`kim_plugins.cli` on a command line and get what it computed."""
import importlib


def run_tool(name, argv):
    """``kim_plugins.cli.<name>.run(parse_args(argv))``: what ``tools/<name>.py ARGV`` computes.

    The tools' ``main`` returns the exit code; ``run`` returns the rows, numbers and paths the tests check.
    """
    tool = importlib.import_module(f"kim_plugins.cli.{name}")
    return tool.run(tool.parse_args(argv))
