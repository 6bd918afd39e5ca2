import pytest
import torch.nn as nn

from kim_plugins.layers.module_modes import eval_mode, restored_modes


class _CountsTrainCalls(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = []
        self.inner = nn.Sequential(nn.Dropout(), nn.BatchNorm1d(2))

    def train(self, mode: bool = True):
        self.calls.append(mode)
        return super().train(mode)


def _modes(model):
    return {n: m.training for n, m in model.named_modules()}


def test_eval_mode_calls_eval_and_restores_every_flag_directly():
    model = _CountsTrainCalls()
    model.inner[1].eval()  # a mixed model: each submodule gets its own flag back
    before = _modes(model)
    with eval_mode(model, None):
        assert not any(_modes(model).values()) and model.calls == [False]
    assert _modes(model) == before and model.calls == [False]  # restored without another train() call


def test_restored_modes_restores_on_errors_and_covers_several_modules():
    a, b = _CountsTrainCalls(), nn.Linear(1, 1).eval()
    before = (_modes(a), _modes(b))
    with pytest.raises(KeyError), restored_modes(a, b):
        a.eval()
        b.train()
        raise KeyError("boom")
    assert (_modes(a), _modes(b)) == before
