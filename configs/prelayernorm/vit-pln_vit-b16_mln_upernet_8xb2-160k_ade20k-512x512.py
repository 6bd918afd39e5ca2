# ViT-B/16 with PreLayerNorm patch embedding (arXiv:2111.08413) in UPerNet + MLN on ADE20K; see vit-pln_vit-s16.
_base_ = './vit_vit-b16_mln_upernet_8xb2-160k_ade20k-512x512.py'

model = dict(backbone=dict(model_name='vit_base_patch16_pln_224'))
