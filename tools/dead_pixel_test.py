#!/usr/bin/env python
"""Dead pixel test of a timm model or an mmseg config: ERF lattice before and after the even-kernel conversion.

The entry point of :mod:`kim_plugins.cli.dead_pixel_test` (installed as ``kim-dead-pixel-test``).
"""
import sys

from kim_plugins.cli.dead_pixel_test import main

if __name__ == "__main__":
    sys.exit(main())
