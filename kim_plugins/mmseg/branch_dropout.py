"""Dropout placement on mmseg ResNet backbones: a ``BranchDropout`` plugin for the residual branch.

"How to Use Dropout Correctly on Residual Networks with Batch Normalization",
Bum Jun Kim, Hyeyeon Choi, Hyeonah Jang et al. (guideline and math:
:mod:`kim_plugins.layers.dropout_placement`).

mmseg's ``Bottleneck`` (``ResNet``, ``ResNetV1c``, ``ResNetV1d``) runs its
``'after_conv2'`` plugins after ``conv2 -> norm2 -> relu`` and before
``conv3``: exactly the guideline's spot in a post-activation bottleneck
(after the last BN + ReLU that precede the last weight layer). So the option
is mmseg's own ``plugins`` argument::

    model = dict(backbone=dict(plugins=[
        dict(cfg=dict(type='BranchDropout', p=0.1), position='after_conv2')]))

``stages=(False, False, True, True)`` in the plugin dict limits it to some
stages. mmseg's ``BasicBlock`` (R-18/34) accepts no plugins (mmseg asserts).
A dropout has no parameter: checkpoints load unchanged and ``eval()`` is the
plain backbone.
"""
from __future__ import annotations

from typing import Optional

import torch.nn as nn
from mmseg.registry import MODELS

from kim_plugins.layers.dropout_placement import check_drop_rate

__all__ = ["BranchDropout"]


@MODELS.register_module()
class BranchDropout(nn.Dropout):
    """Element-wise dropout placed in a residual branch through mmcv's plugin mechanism.

    Args:
        in_channels: Passed by mmcv's ``build_plugin_layer``; unused.
        p: Drop probability in [0, 1) [decision, 0.1].
    """

    _abbr_ = "branch_dropout"

    def __init__(self, in_channels: Optional[int] = None, p: float = 0.1) -> None:
        super().__init__(p=check_drop_rate(p, "BranchDropout p"))
