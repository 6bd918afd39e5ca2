# Baseline of the NaN-safe depth pair: mmseg 1.2.2's depth estimator (DepthEstimator +
# VPDDepthHead + SiLogLoss, NYU Depth V2, 480x480 crops, 25k iterations) with a ResNetV1c-50
# backbone in place of VPD's Stable Diffusion UNet (whose weights are a 4 GB download).
# The ResNet's strides (4, 8, 16, 32) are the four levels VPDDepthHead fuses at stride 16;
# two deconvolutions (instead of VPD's three) bring the prediction back to the input size.
# Its pair: vpdhead-nansafe_r50_4xb8-25k_nyu-480x480.py
_base_ = [
    'mmseg::_base_/datasets/nyu.py', 'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_25k.py', '../_base_/kim_plugins.py'
]
crop_size = (480, 480)
norm_cfg = dict(type='SyncBN', requires_grad=True)
data_preprocessor = dict(
    type='SegDataPreProcessor', mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True, pad_val=0, seg_pad_val=0, size=crop_size,
    test_cfg=dict(size_divisor=32))  # VPDDepthHead fuses stride 16 with 2x stride 32: sides must divide by 32
model = dict(
    type='DepthEstimator',
    data_preprocessor=data_preprocessor,
    pretrained='open-mmlab://resnet50_v1c',
    backbone=dict(
        type='ResNetV1c', depth=50, num_stages=4, out_indices=(0, 1, 2, 3), dilations=(1, 1, 1, 1),
        strides=(1, 2, 2, 2), norm_cfg=norm_cfg, norm_eval=False, style='pytorch', contract_dilation=True),
    decode_head=dict(
        type='VPDDepthHead', in_channels=[256, 512, 1024, 2048], max_depth=10,
        num_deconv_layers=2, num_deconv_filters=(32, 32),
        loss_decode=dict(type='SiLogLoss')),
    test_cfg=dict(mode='whole'))

# mmseg's NYU training pipeline without its Albu step (albumentations is not part of the
# stack); PhotoMetricDistortion is mmseg's own photometric augmentation.
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadDepthAnnotation', depth_rescale_factor=1e-3),
    dict(type='RandomDepthMix', prob=0.25),
    dict(type='RandomFlip', prob=0.5),
    dict(type='RandomCrop', crop_size=crop_size),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs',
         meta_keys=('img_path', 'depth_map_path', 'ori_shape', 'img_shape', 'pad_shape', 'scale_factor',
                    'flip', 'flip_direction', 'category_id')),
]
train_dataloader = dict(batch_size=8, dataset=dict(pipeline=train_pipeline))
default_hooks = dict(checkpoint=dict(save_best='rmse', rule='less', max_keep_ckpts=1))
