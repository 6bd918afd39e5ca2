#!/usr/bin/env python
"""Test (and evaluate) a segmentor: mmseg's ``tools/test.py`` with kim_plugins loaded, on GPUs or CPUs.

The entry point of :mod:`kim_plugins.cli.test` (installed as ``kim-test``).
"""
import sys

from kim_plugins.cli.test import main

if __name__ == "__main__":
    sys.exit(main())
