# Dropout placement ("How to Use Dropout Correctly on Residual Networks with Batch Normalization",
# Kim, Choi, Jang et al.) on pspnet_r50-d8_4xb2-40k_cityscapes-512x1024.py: one dropout in every
# bottleneck's residual branch, after its last BN + ReLU that precede the last conv (mmseg's
# 'after_conv2' plugin position: conv2 -> norm2 -> relu -> [dropout] -> conv3). p = 0.1 [decision].
# No parameter is added: the baseline's checkpoints load, evaluation is the baseline's.
_base_ = ['./pspnet_r50-d8_4xb2-40k_cityscapes-512x1024.py']
model = dict(backbone=dict(plugins=[dict(cfg=dict(type='BranchDropout', p=0.1), position='after_conv2')]))
