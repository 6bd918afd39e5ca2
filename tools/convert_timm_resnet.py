#!/usr/bin/env python
"""Convert timm ResNet / ResNet-D weights to an mmseg backbone checkpoint.

The entry point of :mod:`kim_plugins.cli.convert_timm_resnet` (installed as ``kim-convert-timm-resnet``).
"""
import sys

from kim_plugins.cli.convert_timm_resnet import main

if __name__ == "__main__":
    sys.exit(main())
