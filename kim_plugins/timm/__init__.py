"""timm registrations: importing this package registers every kim_plugins model name.

One file per model family, as in ``timm/models/``:

- ``kim_vit``: Gaussian-attention-bias and PreLayerNorm ViTs.
- ``kim_resnet``: stochastic-average-pooling ResNets.
"""
from . import kim_resnet, kim_vit  # noqa: F401
