# Baseline of a scale-equalizer pair (arXiv 2402.01149): mmseg's own config, unchanged.
# Its pair: swin-tiny-patch4-window7-in1k-pre_upernet-se_8xb2-160k_ade20k-512x512.py
_base_ = ['mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py']
custom_imports = dict(imports=['kim_plugins.mmseg'], allow_failed_imports=False)
