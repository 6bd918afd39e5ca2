# Baseline of the resolution-aware atrous rates pair (arXiv 2307.14179):
# mmseg's UNet-S5-D16 + ASPP (DeepLabV3 head) config, unchanged, with the
# rates mmseg's configs use. Its pair: unet_s5-d16_deeplabv3-ra_4xb4-40k_chase-db1-128x128.py
_base_ = ['mmseg::unet/unet_s5-d16_deeplabv3_4xb4-40k_chase-db1-128x128.py']
custom_imports = dict(imports=['kim_plugins.mmseg'], allow_failed_imports=False)
model = dict(decode_head=dict(dilations=(1, 12, 24, 36)))
