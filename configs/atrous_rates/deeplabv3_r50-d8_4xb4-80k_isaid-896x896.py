# Baseline of the resolution-aware atrous rates pair (arXiv 2307.14179):
# DeepLabV3 R-50-D8 on iSAID. mmseg ships no DeepLabV3 iSAID config; this one
# is composed from mmseg's bases exactly like its PSPNet / DeepLabV3+ iSAID
# configs (896x896 crops, 16 classes, 80k iterations), with the rates mmseg's
# DeepLabV3 configs use. Its pair: deeplabv3-ra_r50-d8_4xb4-80k_isaid-896x896.py
_base_ = [
    'mmseg::_base_/models/deeplabv3_r50-d8.py', 'mmseg::_base_/datasets/isaid.py',
    'mmseg::_base_/default_runtime.py', 'mmseg::_base_/schedules/schedule_80k.py'
]
custom_imports = dict(imports=['kim_plugins.mmseg'], allow_failed_imports=False)
crop_size = (896, 896)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    decode_head=dict(dilations=(1, 12, 24, 36), num_classes=16),
    auxiliary_head=dict(num_classes=16))
