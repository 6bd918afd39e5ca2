# Baseline of a scale-equalizer pair (arXiv 2402.01149): UPerNet with timm's
# ConvNeXt-T (``convnext_tiny`` through mmseg's TIMMBackbone) on ADE20K.
# Its pair: convnext-tiny-timm_upernet-se_8xb2-amp-160k_ade20k-512x512.py
#
# It follows mmseg's convnext-tiny_upernet_8xb2-amp-160k_ade20k-512x512.py
# (channels, drop path 0.4, AdamW lr 1e-4 / wd 0.05, AMP, warm-up + poly,
# slide inference) without inheriting it: that config needs mmpretrain's
# ConvNeXt. Difference: no stage-wise layer-wise LR decay (mmseg's
# LearningRateDecayOptimizerConstructor only knows mmpretrain's parameter
# names). pretrained=True downloads timm's ImageNet-1k weights from the
# Hugging Face hub when training starts (LazyPretrainedTIMMBackbone: mmseg's
# TIMMBackbone that reads its weights in init_weights, so init_model and
# tools/test.py build without them); offline, set pretrained=False and
# checkpoint_path='<local timm checkpoint>'.
_base_ = [
    'mmseg::_base_/models/upernet_swin.py', 'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py', 'mmseg::_base_/schedules/schedule_160k.py'
]
custom_imports = dict(imports=['kim_plugins.mmseg'], allow_failed_imports=False)
crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(
        _delete_=True,
        type='LazyPretrainedTIMMBackbone',
        model_name='convnext_tiny',
        features_only=True,
        pretrained=True,
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.4),
    decode_head=dict(in_channels=[96, 192, 384, 768], num_classes=150),
    auxiliary_head=dict(in_channels=384, num_classes=150),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(341, 341)),
)

optim_wrapper = dict(
    _delete_=True,
    type='AmpOptimWrapper',
    optimizer=dict(type='AdamW', lr=0.0001, betas=(0.9, 0.999), weight_decay=0.05),
    loss_scale='dynamic')

param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', power=1.0, begin=1500, end=160000, eta_min=0.0, by_epoch=False),
]

# By default, models are trained on 8 GPUs with 2 images per GPU
train_dataloader = dict(batch_size=2)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader
