# Swin-S with Gaussian attention bias (Kim et al., BMVC 2023, arXiv:2305.04722) in UPerNet on ADE20K: the
# paper's segmentation setting. Same recipe and the same ImageNet Swin-S checkpoint as the baseline beside it;
# every window attention adds a² · exp(-(dh² + dw²) / (2σ²)) of the in-window offsets on top of the relative
# position bias, one (σ, a) per block, from their init (supplement §C: A0 = 2, σ0 = 5). σ and a get no weight
# decay (supplement, Listing 1): mmengine reads no model list, so the rule is given here by parameter name.
_base_ = ['./swin-small-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py']

model = dict(
    backbone=dict(
        type='SwinTransformerGAB',
        gab_granularity='block',
        gab_sigma_init=5.0,
        gab_amplitude_init=2.0))

optim_wrapper = dict(
    paramwise_cfg=dict(custom_keys={
        'gab_sigma': dict(decay_mult=0.),
        'gab_amplitude': dict(decay_mult=0.)
    }))
