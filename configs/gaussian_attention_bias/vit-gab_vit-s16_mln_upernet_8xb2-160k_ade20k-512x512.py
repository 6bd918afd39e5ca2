# ViT-S/16 with Gaussian attention bias (Kim et al., BMVC 2023, arXiv:2305.04722) in UPerNet + MLN on ADE20K.
# Same recipe as the baseline beside it; fine-tunes from the same plain timm ViT-S checkpoint
# (σ = 5, a = 2 start from their init). σ and a get no weight decay: mmengine ignores the model's
# no_weight_decay(), so the rule is given here by parameter name.
_base_ = './vit_vit-s16_mln_upernet_8xb2-160k_ade20k-512x512.py'

# supplement §C: A0 = 2, σ0 = 5 ("used for all experiments"), one (σ, A) per block
model = dict(
    backbone=dict(
        model_name='vit_small_patch16_gab_224',
        gab_granularity='block',
        gab_sigma_init=5.0,
        gab_amplitude_init=2.0))

optim_wrapper = dict(
    paramwise_cfg=dict(custom_keys={
        'gab_sigma': dict(decay_mult=0.),
        'gab_amplitude': dict(decay_mult=0.)
    }))
