"""One FLOP convention: the suite's counter and mmengine's (tools/benchmark.py) agree on the same model."""
import torch
import torch.nn as nn

from kim_plugins.suite.records import forward_gflops


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(8 * 16 * 16, 10,
                                                                                                 bias=False)).eval()


def test_suite_counts_one_multiply_add_as_one_flop():
    x = torch.randn(1, 3, 16, 16)
    macs = 16 * 16 * 8 * 3 * 3 * 3 + 8 * 16 * 16 * 10  # conv + linear multiply-adds, by hand
    assert forward_gflops(_model(), x) * 1e9 == macs


def test_suite_and_mmengine_counters_agree():
    from mmengine.analysis import FlopAnalyzer

    x = torch.randn(1, 3, 16, 16)
    assert forward_gflops(_model(), x) * 1e9 == FlopAnalyzer(_model(), (x,)).total()
