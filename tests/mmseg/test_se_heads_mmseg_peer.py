"""mmseg 1.2.2's own unit tests of the five parent heads, run on the SE heads: the drop-in property.

Ported from open-mmlab/mmsegmentation v1.2.2, ``tests/test_models/test_heads/`` (``test_psp_head.py``,
``test_aspp_head.py``: ``test_aspp_head`` and ``test_dw_aspp_head``, ``test_uper_head.py``, ``test_fcn_head.py``:
``test_fcn_head``; the tests are not in the wheel). Each body below makes the same constructor calls and the
same assertions as mmseg's test, with the head class as its parameter, and runs twice: on mmseg's own class
(which shows the port is faithful) and on our SE class with ``se_mode='batch'`` and no calibration. A drop-in
replacement accepts every input its parent accepts and rejects what the parent rejects with the parent's
exception type. (``test_uper_head.py::test_kernel_update_forward`` was added after 1.2.2, whose ``UPerHead``
has no ``kernel_update``; mmseg's CUDA branch, ``to_cuda``, is left out on CPU.)
"""
import pytest
import torch

pytest.importorskip("mmseg.models", reason="mmseg is part of the project's environment (tools/setup.sh)")

from mmcv.cnn import ConvModule  # noqa: E402
from mmengine.utils.dl_utils.parrots_wrapper import SyncBatchNorm  # noqa: E402
from mmseg.models.decode_heads import (ASPPHead, DepthwiseSeparableASPPHead, FCNHead, PSPHead,  # noqa: E402
                                       UPerHead)

from kim_plugins.mmseg import se_heads  # noqa: E402


def _conv_has_norm(module, sync_bn):
    """mmseg's ``tests/test_models/test_heads/utils.py`` helper: every ConvModule has a (Sync)BN."""
    for m in module.modules():
        if isinstance(m, ConvModule):
            if not m.with_norm or (sync_bn and not isinstance(m.bn, SyncBatchNorm)):
                return False
    return True


def psp_head_test(PSPHead):
    with pytest.raises(AssertionError):  # pool_scales must be a list or tuple
        PSPHead(in_channels=32, channels=16, num_classes=19, pool_scales=1)
    assert not _conv_has_norm(PSPHead(in_channels=32, channels=16, num_classes=19), sync_bn=False)
    assert _conv_has_norm(PSPHead(in_channels=32, channels=16, num_classes=19, norm_cfg=dict(type="SyncBN")),
                          sync_bn=True)
    inputs = [torch.randn(1, 32, 45, 45)]
    head = PSPHead(in_channels=32, channels=16, num_classes=19, pool_scales=(1, 2, 3))
    assert [head.psp_modules[i][0].output_size for i in range(3)] == [1, 2, 3]
    assert head(inputs).shape == (1, head.num_classes, 45, 45)


def aspp_head_test(ASPPHead):
    with pytest.raises(AssertionError):  # dilations must be a list or tuple
        ASPPHead(in_channels=32, channels=16, num_classes=19, dilations=1)
    assert not _conv_has_norm(ASPPHead(in_channels=32, channels=16, num_classes=19), sync_bn=False)
    assert _conv_has_norm(ASPPHead(in_channels=32, channels=16, num_classes=19, norm_cfg=dict(type="SyncBN")),
                          sync_bn=True)
    inputs = [torch.randn(1, 32, 45, 45)]
    head = ASPPHead(in_channels=32, channels=16, num_classes=19, dilations=(1, 12, 24))
    assert [head.aspp_modules[i].conv.dilation for i in range(3)] == [(1, 1), (12, 12), (24, 24)]
    assert head(inputs).shape == (1, head.num_classes, 45, 45)


def dw_aspp_head_test(DepthwiseSeparableASPPHead):
    # without c1
    inputs = [torch.randn(1, 32, 45, 45)]
    head = DepthwiseSeparableASPPHead(c1_in_channels=0, c1_channels=0, in_channels=32, channels=16, num_classes=19,
                                      dilations=(1, 12, 24))
    assert head.c1_bottleneck is None
    assert head.aspp_modules[0].conv.dilation == (1, 1)
    assert [head.aspp_modules[i].depthwise_conv.dilation for i in (1, 2)] == [(12, 12), (24, 24)]
    assert head(inputs).shape == (1, head.num_classes, 45, 45)
    # with c1
    inputs = [torch.randn(1, 8, 45, 45), torch.randn(1, 32, 21, 21)]
    head = DepthwiseSeparableASPPHead(c1_in_channels=8, c1_channels=4, in_channels=32, channels=16, num_classes=19,
                                      dilations=(1, 12, 24))
    assert head.c1_bottleneck.in_channels == 8 and head.c1_bottleneck.out_channels == 4
    assert head.aspp_modules[0].conv.dilation == (1, 1)
    assert [head.aspp_modules[i].depthwise_conv.dilation for i in (1, 2)] == [(12, 12), (24, 24)]
    assert head(inputs).shape == (1, head.num_classes, 45, 45)


def uper_head_test(UPerHead):
    with pytest.raises(AssertionError):  # in_channels must be a list or tuple (multiple_select)
        UPerHead(in_channels=4, channels=2, num_classes=19)
    assert not _conv_has_norm(UPerHead(in_channels=[4, 2], channels=2, num_classes=19, in_index=[-2, -1]),
                              sync_bn=False)
    assert _conv_has_norm(UPerHead(in_channels=[4, 2], channels=2, num_classes=19, norm_cfg=dict(type="SyncBN"),
                                   in_index=[-2, -1]), sync_bn=True)
    inputs = [torch.randn(1, 4, 45, 45), torch.randn(1, 2, 21, 21)]
    head = UPerHead(in_channels=[4, 2], channels=2, num_classes=19, in_index=[-2, -1])
    assert head(inputs).shape == (1, head.num_classes, 45, 45)


def fcn_head_test(FCNHead):
    with pytest.raises(AssertionError):  # num_convs must be >= 0
        FCNHead(num_classes=19, num_convs=-1)
    for m in FCNHead(in_channels=8, channels=4, num_classes=19).modules():
        if isinstance(m, ConvModule):
            assert not m.with_norm
    for m in FCNHead(in_channels=8, channels=4, num_classes=19, norm_cfg=dict(type="SyncBN")).modules():
        if isinstance(m, ConvModule):
            assert m.with_norm and isinstance(m.bn, SyncBatchNorm)
    inputs = [torch.randn(1, 8, 23, 23)]
    # concat_input=False
    head = FCNHead(in_channels=8, channels=4, num_classes=19, concat_input=False)
    assert len(head.convs) == 2 and not head.concat_input and not hasattr(head, "conv_cat")
    assert head(inputs).shape == (1, head.num_classes, 23, 23)
    # concat_input=True
    head = FCNHead(in_channels=8, channels=4, num_classes=19, concat_input=True)
    assert len(head.convs) == 2 and head.concat_input and head.conv_cat.in_channels == 12
    assert head(inputs).shape == (1, head.num_classes, 23, 23)
    # kernel_size=3 (default)
    head = FCNHead(in_channels=8, channels=4, num_classes=19)
    for conv in head.convs:
        assert conv.kernel_size == (3, 3) and conv.padding == 1
    assert head(inputs).shape == (1, head.num_classes, 23, 23)
    # kernel_size=1
    head = FCNHead(in_channels=8, channels=4, num_classes=19, kernel_size=1)
    for conv in head.convs:
        assert conv.kernel_size == (1, 1) and conv.padding == 0
    assert head(inputs).shape == (1, head.num_classes, 23, 23)
    # num_convs=1
    head = FCNHead(in_channels=8, channels=4, num_classes=19, num_convs=1)
    assert len(head.convs) == 1
    assert head(inputs).shape == (1, head.num_classes, 23, 23)
    # num_convs=0
    head = FCNHead(in_channels=8, channels=8, num_classes=19, num_convs=0, concat_input=False)
    assert isinstance(head.convs, torch.nn.Identity)
    assert head(inputs).shape == (1, head.num_classes, 23, 23)


PEERS = {
    "psp": (psp_head_test, PSPHead, se_heads.SEPSPHead),
    "aspp": (aspp_head_test, ASPPHead, se_heads.SEASPPHead),
    "dw_aspp": (dw_aspp_head_test, DepthwiseSeparableASPPHead, se_heads.SEDepthwiseSeparableASPPHead),
    "uper": (uper_head_test, UPerHead, se_heads.SEUPerHead),
    "fcn": (fcn_head_test, FCNHead, se_heads.SEFCNHead),
}


@pytest.mark.parametrize("head", list(PEERS))
@pytest.mark.parametrize("which", ["mmseg", "se"])
def test_mmseg_head_test_passes(head, which):
    body, parent, se_cls = PEERS[head]
    built = []

    def se_head(*args, **kwargs):
        h = se_cls(*args, se_mode="batch", **kwargs)
        built.append(h)
        return h

    torch.manual_seed(0)
    body(parent if which == "mmseg" else se_head)
    if which == "se":
        assert built and all(isinstance(h, parent) and isinstance(h, se_cls) for h in built)
        # every built SE head equalizes its upsampled fusions, except FCN without resize_concat (none there)
        counts = [len(h.scale_equalizers) for h in built]
        assert all(c == 0 for c in counts) if head == "fcn" else all(c > 0 for c in counts), counts
