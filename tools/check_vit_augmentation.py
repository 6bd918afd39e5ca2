#!/usr/bin/env python
"""Check ViT augmentation settings for variance shift of the positional embedding (arXiv 2405.14115).

The entry point of :mod:`kim_plugins.cli.check_vit_augmentation` (installed as ``kim-check-vit-augmentation``).
"""
import sys

from kim_plugins.cli.check_vit_augmentation import main

if __name__ == "__main__":
    sys.exit(main())
