# Baseline of a stochastic-average-pooling pair (arXiv 2409.16630): mmseg's own
# pspnet_r50-d8_4xb4-80k_ade20k-512x512.py with its ResNetV1c backbone swapped for
# ResNetV1d (the ResNet-D of the SAP paper; 'r50d' in the name), everything else unchanged.
# Its pair: pspnet-sap_r50d-d8_4xb4-80k_ade20k-512x512.py
#
# mmseg publishes no ResNetV1d weights: convert timm's resnet50d once with
#   python tools/convert_timm_resnet.py resnet50d.ra2_in1k checkpoints/resnet50d_ra2-mmseg.pth
_base_ = ['mmseg::pspnet/pspnet_r50-d8_4xb4-80k_ade20k-512x512.py']
custom_imports = dict(imports=['kim_plugins.mmseg'], allow_failed_imports=False)
model = dict(
    pretrained='checkpoints/resnet50d_ra2-mmseg.pth',
    backbone=dict(type='ResNetV1d'))
