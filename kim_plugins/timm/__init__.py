"""timm registrations: importing this package registers every kim_plugins model name.

One file per model family, as in ``timm/models/``:

- ``kim_vit``: Gaussian-attention-bias and PreLayerNorm ViTs.
- ``kim_swin``: Gaussian-attention-bias Swin Transformers (the paper's ADE20K / COCO hosts).
- ``kim_resnet``: stochastic-average-pooling ResNets.
"""
from . import kim_resnet, kim_swin, kim_vit  # noqa: F401
