# Baseline of the BN-gamma decay pair: mmseg's own PSPNet R-50-D8 on Cityscapes (40k). mmengine's
# default optimizer constructor applies weight_decay=5e-4 to every parameter, every BN gamma included.
# Its pair: pspnet-gammadecay_r50-d8_4xb2-40k_cityscapes-512x1024.py
_base_ = ['mmseg::pspnet/pspnet_r50-d8_4xb2-40k_cityscapes-512x1024.py', '../_base_/kim_plugins.py']
