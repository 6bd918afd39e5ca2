# Baseline of the dropout-placement pair: mmseg's own PSPNet R-50-D8 on Cityscapes (40k), no dropout
# in the backbone (the head's Dropout2d before conv_seg is mmseg's and stays in both).
# Its pair: pspnet-branchdrop_r50-d8_4xb2-40k_cityscapes-512x1024.py
_base_ = ['mmseg::pspnet/pspnet_r50-d8_4xb2-40k_cityscapes-512x1024.py', '../_base_/kim_plugins.py']
