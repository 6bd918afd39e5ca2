#!/usr/bin/env python
"""Resolution-aware atrous rates: print the rule's rates, or search r_max by ERF coverage.

The entry point of :mod:`kim_plugins.cli.atrous_rates` (installed as ``kim-atrous-rates``).
"""
import sys

from kim_plugins.cli.atrous_rates import main

if __name__ == "__main__":
    sys.exit(main())
