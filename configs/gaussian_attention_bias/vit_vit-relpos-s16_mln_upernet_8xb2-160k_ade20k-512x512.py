# Baseline: UPerNet + MultiLevelNeck on timm's ViT-S/16 with relative-position bias
# (`vit_relpos_small_patch16_224`, the GAB paper's host family), mmseg's ViT-UPerNet recipe.
# timm's relpos ViT has a fixed input size (no dynamic_img_size), so it is built for the 512x512 crop
# and evaluated with slide inference.
# Local timm checkpoint: pretrain/vit_relpos_small_patch16_224.pth.
_base_ = './vit_vit-s16_mln_upernet_8xb2-160k_ade20k-512x512.py'

crop_size = (512, 512)

model = dict(
    backbone=dict(
        _delete_=True,
        type='LazyPretrainedTIMMBackbone',
        model_name='vit_relpos_small_patch16_224',
        features_only=True,
        pretrained=True,
        pretrained_cfg_overlay=dict(file='pretrain/vit_relpos_small_patch16_224.pth'),
        out_indices=(2, 5, 8, 11),
        img_size=crop_size,
        drop_path_rate=0.1),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(341, 341)))
