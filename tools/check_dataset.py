#!/usr/bin/env python
"""Check a prepared dataset against what a config will read, before a long run starts.

The entry point of :mod:`kim_plugins.cli.check_dataset` (installed as ``kim-check-dataset``).
"""
import sys

from kim_plugins.cli.check_dataset import main

if __name__ == "__main__":
    sys.exit(main())
