# ViT-S/16 with PreLayerNorm patch embedding (Kim et al., arXiv:2111.08413) in UPerNet + MLN on ADE20K:
# LayerNorm on the projected patch tokens before the position embedding is added. Same recipe as the
# baseline beside it; fine-tunes from the same plain timm ViT-S checkpoint (the new LayerNorm starts at
# weight 1, bias 0, and gets no weight decay through the baseline's 'norm' rule).
_base_ = './vit_vit-s16_mln_upernet_8xb2-160k_ade20k-512x512.py'

model = dict(backbone=dict(model_name='vit_small_patch16_pln_224'))
