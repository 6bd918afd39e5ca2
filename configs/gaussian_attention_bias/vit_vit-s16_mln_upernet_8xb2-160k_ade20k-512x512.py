# Baseline for the Gaussian-attention-bias / PreLayerNorm comparisons: UPerNet + MultiLevelNeck on
# timm's plain ViT-S/16 (`vit_small_patch16_224`) through mmseg's TIMMBackbone, with mmseg's ViT-UPerNet
# recipe (configs/vit/vit_vit-b16_mln_upernet_8xb2-160k_ade20k-512x512.py, DeiT-S widths).
#
# Weights: a local timm checkpoint of `vit_small_patch16_224`, loaded by timm
# (`pretrained=True` + `pretrained_cfg_overlay=dict(file=...)`; TIMMBackbone's `checkpoint_path` does not
# work for features-only ViTs). Save one with, e.g.,
#   python -c "import timm, torch; torch.save(timm.create_model('vit_small_patch16_224.augreg_in21k_ft_in1k',
#              pretrained=True).state_dict(), 'pretrain/vit_small_patch16_224.pth')"
# or set `pretrained=False` (tools/train.py --no-pretrained) to train from scratch.
# `LazyPretrainedTIMMBackbone` is mmseg's TIMMBackbone (same arguments, same network) that reads the file
# only when training starts (init_weights): init_model, tools/test.py and benchmarks build without it.
_base_ = [
    'mmseg::_base_/models/upernet_vit-b16_ln_mln.py',
    'mmseg::_base_/datasets/ade20k.py', 'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_160k.py'
]
custom_imports = dict(imports=['kim_plugins.mmseg'], allow_failed_imports=False)

crop_size = (512, 512)
# timm's ViT weights expect inputs normalised with mean = std = 0.5 (x 255)
data_preprocessor = dict(size=crop_size, mean=[127.5, 127.5, 127.5], std=[127.5, 127.5, 127.5])
embed_dim = 384
model = dict(
    data_preprocessor=data_preprocessor,
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='LazyPretrainedTIMMBackbone',
        model_name='vit_small_patch16_224',
        features_only=True,
        pretrained=True,
        pretrained_cfg_overlay=dict(file='pretrain/vit_small_patch16_224.pth'),
        out_indices=(2, 5, 8, 11),
        img_size=crop_size,
        # ADE20K images are not square and ViT-UPerNet evaluates mode='whole': the patch grid (and the
        # position embedding) follow each image, padded up to a multiple of the patch size
        dynamic_img_size=True,
        dynamic_img_pad=True,
        drop_path_rate=0.1),
    neck=dict(in_channels=[embed_dim] * 4, out_channels=embed_dim, scales=[4, 2, 1, 0.5]),
    decode_head=dict(in_channels=[embed_dim] * 4, num_classes=150),
    auxiliary_head=dict(in_channels=embed_dim, num_classes=150))

# AdamW, no weight decay for position embedding, class token and norms (as mmseg's ViT-UPerNet)
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.00006, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(custom_keys={
        'pos_embed': dict(decay_mult=0.),
        'cls_token': dict(decay_mult=0.),
        'norm': dict(decay_mult=0.)
    }))

param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=1500, end=160000, by_epoch=False)
]

# By default, models are trained on 8 GPUs with 2 images per GPU
train_dataloader = dict(batch_size=2)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader
