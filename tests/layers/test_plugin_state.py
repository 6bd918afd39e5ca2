"""KeepsStateWhenAbsent: a plain host state dict loads strictly; the plugin module keeps its values; errors stay."""
import logging

import pytest
import torch
from torch import nn

from kim_plugins.layers.plugin_state import KeepsStateWhenAbsent


class _Plugin(KeepsStateWhenAbsent, nn.Module):
    """Any names: a parameter, a persistent and a non-persistent buffer."""

    def __init__(self):
        super().__init__()
        self.anything = nn.Parameter(torch.full((3,), 7.0))
        self.register_buffer("counter", torch.tensor(5))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)


class _Host(nn.Module):
    def __init__(self, plugged: bool):
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(4, 4)) for _ in range(3))
        if plugged:
            for blk in self.blocks:
                blk.add_module("plugin", _Plugin())


def test_absent_plugin_modules_keep_their_values_with_one_log_line(caplog):
    plain = _Host(plugged=False)
    model = _Host(plugged=True)
    with caplog.at_level(logging.DEBUG, logger="kim_plugins.layers.plugin_state"):
        result = model.load_state_dict(plain.state_dict())  # strict
    assert not result.missing_keys and not result.unexpected_keys
    for key, value in plain.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)
    for blk in model.blocks:
        assert torch.equal(blk.plugin.anything, torch.full((3,), 7.0)) and int(blk.plugin.counter) == 5
    info = [r for r in caplog.records if r.levelno == logging.INFO]
    assert len(info) == 1 and "blocks.0.plugin" in info[0].getMessage() and "anything" in info[0].getMessage()
    assert len([r for r in caplog.records if r.levelno == logging.DEBUG]) == 3  # one per module, on request
    # a second load logs again (one line per load, not per process)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kim_plugins.layers.plugin_state"):
        model.load_state_dict(plain.state_dict())
    assert len([r for r in caplog.records if r.levelno == logging.INFO]) == 1


def test_own_checkpoint_loads_its_values():
    model = _Host(plugged=True)
    with torch.no_grad():
        model.blocks[1].plugin.anything.fill_(-1.0)
    other = _Host(plugged=True)
    other.load_state_dict(model.state_dict())
    assert torch.equal(other.blocks[1].plugin.anything, torch.full((3,), -1.0))


def test_partial_plugin_entry_and_missing_host_key_still_fail():
    plain = _Host(plugged=False).state_dict()
    model = _Host(plugged=True)
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*blocks\.0\.plugin\.counter"):
        model.load_state_dict(dict(plain, **{"blocks.0.plugin.anything": torch.zeros(3)}))
    broken = dict(plain)
    del broken["body.weight"]
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*body\.weight"):
        model.load_state_dict(broken)
    # non-strict loads report what is really missing, without the absent plugin modules
    assert model.load_state_dict(broken, strict=False).missing_keys == ["body.weight"]
