# ViT-B/16 RelPos with Gaussian attention bias (the paper's 81.48 % ImageNet model family, arXiv:2305.04722),
# UPerNet + MLN on ADE20K, slide inference; see vit-gab_vit-s16.
_base_ = './vit_vit-relpos-b16_mln_upernet_8xb2-160k_ade20k-512x512.py'

# supplement §C: A0 = 2, σ0 = 5 ("used for all experiments"), one (σ, A) per block
model = dict(
    backbone=dict(
        model_name='vit_relpos_base_patch16_gab_224',
        gab_granularity='block',
        gab_sigma_init=5.0,
        gab_amplitude_init=2.0))

optim_wrapper = dict(
    paramwise_cfg=dict(custom_keys={
        'gab_sigma': dict(decay_mult=0.),
        'gab_amplitude': dict(decay_mult=0.)
    }))
