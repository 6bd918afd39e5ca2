# Baseline: UPerNet + MultiLevelNeck on timm's plain ViT-B/16 (`vit_base_patch16_224`), mmseg's ViT-UPerNet recipe.
# Local timm checkpoint: pretrain/vit_base_patch16_224.pth (see the ViT-S baseline for how to save one).
_base_ = './vit_vit-s16_mln_upernet_8xb2-160k_ade20k-512x512.py'

embed_dim = 768
model = dict(
    backbone=dict(
        model_name='vit_base_patch16_224',
        pretrained_cfg_overlay=dict(file='pretrain/vit_base_patch16_224.pth'),
        drop_path_rate=0.0),
    neck=dict(in_channels=[embed_dim] * 4, out_channels=embed_dim),
    decode_head=dict(in_channels=[embed_dim] * 4),
    auxiliary_head=dict(in_channels=embed_dim))
