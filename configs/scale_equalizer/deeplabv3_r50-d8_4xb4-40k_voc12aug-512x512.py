# Baseline of a scale-equalizer pair (arXiv 2402.01149): mmseg's own config, unchanged.
# Its pair: deeplabv3-se_r50-d8_4xb4-40k_voc12aug-512x512.py
_base_ = ['mmseg::deeplabv3/deeplabv3_r50-d8_4xb4-40k_voc12aug-512x512.py']
custom_imports = dict(imports=['kim_plugins.mmseg'], allow_failed_imports=False)
