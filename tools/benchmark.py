#!/usr/bin/env python
"""Inference speed, FLOPs and parameters of one config, or of several against the first, in one run.

The entry point of :mod:`kim_plugins.cli.benchmark` (installed as ``kim-benchmark``).
"""
import sys

from kim_plugins.cli.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
