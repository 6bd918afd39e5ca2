# Scale equalizers (Kim & Kim, "Scale Equalization for Multi-Level Feature Fusion",
# TMLR 2024, arXiv 2402.01149) on deeplabv3plus_r50-d8_4xb2-80k_cityscapes-512x1024.py:
# the decode head becomes SEDepthwiseSeparableASPPHead (every argument of its parent unchanged) and the
# 'dataset'-mode statistics are measured before training by the calibration hook.
_base_ = ['./deeplabv3plus_r50-d8_4xb2-80k_cityscapes-512x1024.py']
custom_imports = dict(imports=['kim_plugins.mmseg'], allow_failed_imports=False)
model = dict(decode_head=dict(type='SEDepthwiseSeparableASPPHead', se_mode='dataset'))
custom_hooks = [dict(type='ScaleEqualizerCalibrationHook', num_batches=50)]
