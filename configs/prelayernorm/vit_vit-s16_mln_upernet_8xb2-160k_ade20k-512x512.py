# Baseline for the PreLayerNorm comparison: the plain ViT-S/16 UPerNet + MLN config of the
# Gaussian-attention-bias folder (one definition of the baseline for both plugins).
_base_ = '../gaussian_attention_bias/vit_vit-s16_mln_upernet_8xb2-160k_ade20k-512x512.py'
