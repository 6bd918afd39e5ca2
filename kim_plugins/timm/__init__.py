"""timm registrations: importing this package registers every kim_plugins model name.

One file per model family, as in ``timm/models/``:

- ``kim_vit``: Gaussian-attention-bias and PreLayerNorm ViTs.
- ``kim_swin``: Gaussian-attention-bias Swin Transformers (the paper's ADE20K / COCO hosts).
- ``kim_resnet``: stochastic-average-pooling ResNets.
- ``resnet_dropout``: pre-activation ResNets with the dropout placement guideline.
- ``even_kernel_resnet``: even-kernel ResNets of the dead-pixel paper.
- ``gamma_param_groups``: optimizer param groups with L2 on BatchNorm gammas by category (no model names).
"""
from . import even_kernel_resnet, kim_resnet, kim_swin, kim_vit  # noqa: F401
from . import resnet_dropout  # noqa: F401
from . import gamma_param_groups  # noqa: F401
