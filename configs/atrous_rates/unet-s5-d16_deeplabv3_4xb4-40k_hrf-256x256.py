# Baseline of the resolution-aware atrous rates pair (arXiv 2307.14179):
# mmseg's UNet-S5-D16 + ASPP (DeepLabV3 head) config, unchanged, with the
# rates mmseg's configs use. Its pair: unet-s5-d16_deeplabv3-ra_4xb4-40k_hrf-256x256.py
_base_ = ['mmseg::unet/unet-s5-d16_deeplabv3_4xb4-40k_hrf-256x256.py']
custom_imports = dict(imports=['kim_plugins.mmseg'], allow_failed_imports=False)
model = dict(decode_head=dict(dilations=(1, 12, 24, 36)))
