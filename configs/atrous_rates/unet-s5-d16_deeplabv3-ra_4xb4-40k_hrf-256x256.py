# Resolution-aware atrous rates (arXiv 2307.14179), kim_plugins rule:
# dilations='auto' -> resolution_aware_rates(crop_size, output_stride).
# The ASPP head of mmseg's UNet-S5-D16 + ASPP reads the full-resolution
# decoder output (in_index=4): output_stride=1, not 8 or 16.
# At crop 256x256 this gives (1, 42, 85, 127) (baseline: (1, 12, 24, 36)).
_base_ = ['./unet-s5-d16_deeplabv3_4xb4-40k_hrf-256x256.py']
crop_size = (256, 256)
model = dict(
    decode_head=dict(
        type='RAASPPHead', dilations='auto', crop_size=crop_size, output_stride=1))
