# Baseline of the resolution-aware atrous rates pair (arXiv 2307.14179):
# mmseg's DeepLabV3 R-101-D8 Cityscapes config, unchanged, with the rates
# mmseg's configs use. Its pair: deeplabv3-ra_r101-d8_4xb2-80k_cityscapes-512x1024.py
_base_ = ['mmseg::deeplabv3/deeplabv3_r101-d8_4xb2-80k_cityscapes-512x1024.py']
custom_imports = dict(imports=['kim_plugins.mmseg'], allow_failed_imports=False)
model = dict(decode_head=dict(dilations=(1, 12, 24, 36)))
