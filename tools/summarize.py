#!/usr/bin/env python
"""Baseline vs plugin table (Markdown + CSV) and bar chart from the work dirs of finished runs.

The entry point of :mod:`kim_plugins.cli.summarize` (installed as ``kim-summarize``).
"""
import sys

from kim_plugins.cli.summarize import main

if __name__ == "__main__":
    sys.exit(main())
