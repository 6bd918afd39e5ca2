# Resolution-aware atrous rates (arXiv 2307.14179), kim_plugins rule:
# dilations='auto' -> resolution_aware_rates(crop_size, output_stride).
# ResNetV1c-D8: the ASPP head reads a stride-8 feature map.
# At crop 512x1024 this gives (1, 10, 21, 31) (baseline: (1, 12, 24, 36)).
_base_ = ['./deeplabv3_r101-d8_4xb2-80k_cityscapes-512x1024.py']
crop_size = (512, 1024)
model = dict(
    decode_head=dict(
        type='RAASPPHead', dilations='auto', crop_size=crop_size, output_stride=8))
