#!/usr/bin/env python
"""Train a segmentor: mmseg's ``tools/train.py`` with kim_plugins loaded, on GPUs or CPUs.

The entry point of :mod:`kim_plugins.cli.train` (installed as ``kim-train``).
"""
import sys

from kim_plugins.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
