#!/usr/bin/env python
"""Write configs/README.md: the matrix of every config (method x model x dataset) from the files themselves.

The entry point of :mod:`kim_plugins.cli.config_matrix` (installed as ``kim-config-matrix``).
"""
import sys

from kim_plugins.cli.config_matrix import main

if __name__ == "__main__":
    sys.exit(main())
