# Baseline of a scale-equalizer pair (arXiv 2402.01149): mmseg's own config, unchanged.
# Its pair: fcn-se_hr18_4xb2-80k_cityscapes-512x1024.py
_base_ = ['mmseg::hrnet/fcn_hr18_4xb2-80k_cityscapes-512x1024.py']
custom_imports = dict(imports=['kim_plugins.mmseg'], allow_failed_imports=False)
