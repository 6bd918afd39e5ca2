#!/usr/bin/env python
"""Grad-CAM vs Extended-CAM of a timm model on Fashion-MNIST images, side by side, with deletion/insertion scores.

The entry point of :mod:`kim_plugins.cli.cam` (installed as ``kim-cam``).
"""
import sys

from kim_plugins.cli.cam import main

if __name__ == "__main__":
    sys.exit(main())
