#!/usr/bin/env python
"""Benchmark every kim_plugins plugin against its baseline on real Fashion-MNIST data.

The entry point of :mod:`kim_plugins.cli.benchmark_suite` (installed as ``kim-benchmark-suite``).
"""
import sys

from kim_plugins.cli.benchmark_suite import main

if __name__ == "__main__":
    sys.exit(main())
