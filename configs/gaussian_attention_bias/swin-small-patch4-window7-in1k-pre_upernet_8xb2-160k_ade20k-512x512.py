# Baseline of the Swin GAB pair: mmseg's own Swin-S + UPerNet 160k ADE20K config, unchanged (the paper's
# ADE20K host, arXiv:2305.04722). Its pair: swin-small-patch4-window7-in1k-pre-gab_upernet_8xb2-160k_ade20k-512x512.py
_base_ = ['mmseg::swin/swin-small-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py']
custom_imports = dict(imports=['kim_plugins.mmseg'], allow_failed_imports=False)
