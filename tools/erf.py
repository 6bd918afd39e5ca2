#!/usr/bin/env python
"""Effective receptive field of a timm model or an mmseg config: heatmap + numbers.

The entry point of :mod:`kim_plugins.cli.erf` (installed as ``kim-erf``).
"""
import sys

from kim_plugins.cli.erf import main

if __name__ == "__main__":
    sys.exit(main())
