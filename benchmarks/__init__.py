"""Benchmark scripts, each run as ``python benchmarks/NAME.py``; a package so that the tests import them."""
