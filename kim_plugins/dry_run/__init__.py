"""Dry runs of the configs: dataset fixtures in every dataset's layout, and a config shrunk to a CPU-sized run.

What ``tools/train.py --tiny`` ships to users (and what the test suite uses):
:mod:`~kim_plugins.dry_run.dataset_fixtures` writes small datasets in mmseg's
layouts, :mod:`~kim_plugins.dry_run.tiny` shrinks a config to run on them.
"""
