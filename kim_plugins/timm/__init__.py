"""timm registrations: importing this package registers every kim_plugins model name.

One file per model family, as in ``timm/models/``:

- ``kim_vit``: Gaussian-attention-bias and PreLayerNorm ViTs.
- ``kim_resnet``: stochastic-average-pooling ResNets.
- ``even_kernel_resnet``: even-kernel ResNets of the dead-pixel paper.
"""
from . import even_kernel_resnet, kim_resnet, kim_vit  # noqa: F401
