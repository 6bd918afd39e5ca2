#!/usr/bin/env python
"""List every name kim_plugins registers (timm models, mmseg modules) and every config.

The entry point of :mod:`kim_plugins.cli.list_plugins` (installed as ``kim-list-plugins``).
"""
import sys

from kim_plugins.cli.list_plugins import main

if __name__ == "__main__":
    sys.exit(main())
