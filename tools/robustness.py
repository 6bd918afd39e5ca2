#!/usr/bin/env python
"""Accuracy of classifiers under contrast reduction and contrast enhancement.

The entry point of :mod:`kim_plugins.cli.robustness` (installed as ``kim-robustness``).
"""
import sys

from kim_plugins.cli.robustness import main

if __name__ == "__main__":
    sys.exit(main())
