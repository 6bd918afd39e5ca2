"""The benchmark suite: every plugin against its baseline on real Fashion-MNIST data, in minutes on a CPU.

``python tools/benchmark_suite.py`` (:mod:`kim_plugins.cli.benchmark_suite`, over :func:`run_suite`) trains
each plugin beside its baseline with the same seed, schedule and data order,
measures the mechanism each plugin claims and writes
``results/<timestamp>/report.md`` with CSV files and PNG plots:

- ``se``: UPerHead vs SEUPerHead and ASPPHead vs SEASPPHead on Fashion scenes
  (:mod:`kim_plugins.suite.seg`), with the variance of every branch entering
  each fusion;
- ``rates``: ASPP with mmseg's rates (1, 12, 24, 36) vs resolution-aware rates
  at two input sizes, with the ERF lattice of each;
- ``vit``: a patch-4 ViT vs its GAB, PLN and GAB+PLN versions on Fashion-MNIST
  (:mod:`kim_plugins.suite.cls`), with PLN's contrast-robustness curve;
- ``swin``: a patch-2 Swin vs its GAB version on Fashion-MNIST, with the learnt
  σ and a of every block;
- ``sap``: ResNet-18-D vs its SAP version, with SAP's train/eval consistency;
- ``dropout``, ``gamma``, ``infonce``, ``depth`` (:mod:`kim_plugins.suite.stability`,
  :mod:`kim_plugins.suite.depth_pair`) and ``deadpixel``, ``vitaug``
  (:mod:`kim_plugins.suite.diagnostics`): the training-stability and diagnostic plugins.

Each pair is one :class:`~kim_plugins.suite.pairs.Pair` object in one registry
(:func:`~kim_plugins.suite.pairs.all_pairs`). Sizes:
:mod:`kim_plugins.suite.settings`; report: :mod:`kim_plugins.suite.report`.
Nothing heavy is imported here.
"""
from kim_plugins.suite.settings import SuiteSettings, preset

__all__ = ["PAIR_GROUPS", "SuiteSettings", "preset", "SuiteOptions", "run_suite"]


def __getattr__(name):  # lazy: the pairs and the orchestration import torch, mmseg and timm
    if name == "PAIR_GROUPS":
        from kim_plugins.suite.pairs import pair_groups
        return pair_groups()
    if name in ("SuiteOptions", "run_suite"):
        from kim_plugins.suite import core
        return getattr(core, name)
    raise AttributeError(name)
