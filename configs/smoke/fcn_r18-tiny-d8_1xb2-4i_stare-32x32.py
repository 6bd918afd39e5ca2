# A CPU-sized FCN (ResNetV1c-18 with 8 base channels) on STARE's layout: the
# smallest real mmseg segmentor, used by the test suite (training, resume,
# distributed launch) and as a first dry run of an installation:
#   python tools/train.py configs/smoke/fcn_r18-tiny-d8_1xb2-4i_stare-32x32.py \
#       --cfg-options train_dataloader.dataset.dataset.data_root=<fixture>/stare ...
_base_ = [
    'mmseg::_base_/models/fcn_r50-d8.py', 'mmseg::_base_/datasets/stare.py',
    'mmseg::_base_/default_runtime.py', 'mmseg::_base_/schedules/schedule_20k.py'
]
custom_imports = dict(imports=['kim_plugins.mmseg'], allow_failed_imports=False)
crop_size = (32, 32)
norm_cfg = dict(type='BN', requires_grad=True)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    pretrained=None,
    backbone=dict(depth=18, stem_channels=8, base_channels=8, norm_cfg=norm_cfg),
    decode_head=dict(in_channels=64, channels=8, num_classes=2, dropout_ratio=0.0, norm_cfg=norm_cfg),
    auxiliary_head=dict(in_channels=32, channels=8, num_classes=2, dropout_ratio=0.0, norm_cfg=norm_cfg),
    test_cfg=dict(mode='whole'))
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False)
val_dataloader = dict(num_workers=0, persistent_workers=False)
test_dataloader = val_dataloader
train_cfg = dict(type='IterBasedTrainLoop', max_iters=4, val_interval=4)
param_scheduler = [dict(type='PolyLR', eta_min=1e-4, power=0.9, begin=0, end=4, by_epoch=False)]
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=1, log_metric_by_epoch=False),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=2))
env_cfg = dict(dist_cfg=dict(backend='gloo'))
