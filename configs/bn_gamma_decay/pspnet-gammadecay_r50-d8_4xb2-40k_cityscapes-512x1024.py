# L2 on BatchNorm gammas by category ("Guidelines for the Regularization of Gammas in Batch
# Normalization for Deep Residual Networks", Kim, Choi, Jang et al.) on
# pspnet_r50-d8_4xb2-40k_cityscapes-512x1024.py: the backbone's gammas are sorted into
# branch_last / branch_inner / shortcut / outside and each category's weight decay is
# weight_decay * gamma_decay_mult[category]. The multipliers below are the project's reading of the
# paper's two arguments [decision]; the paper's exact rules were not available: set them here.
_base_ = ['./pspnet_r50-d8_4xb2-40k_cityscapes-512x1024.py']
optim_wrapper = dict(
    constructor='BNGammaDecayOptimWrapperConstructor',
    paramwise_cfg=dict(gamma_decay_mult=dict(branch_last=1.0, branch_inner=1.0, shortcut=0.0, outside=0.0)))
