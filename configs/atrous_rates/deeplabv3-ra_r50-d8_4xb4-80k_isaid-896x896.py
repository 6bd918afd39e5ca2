# Resolution-aware atrous rates (arXiv 2307.14179), kim_plugins rule:
# dilations='auto' -> resolution_aware_rates(crop_size, output_stride).
# ResNetV1c-D8: the ASPP head reads a stride-8 feature map.
# At crop 896x896 this gives (1, 18, 37, 55) (baseline: (1, 12, 24, 36)).
_base_ = ['./deeplabv3_r50-d8_4xb4-80k_isaid-896x896.py']
crop_size = (896, 896)
model = dict(
    decode_head=dict(
        type='RAASPPHead', dilations='auto', crop_size=crop_size, output_stride=8))
