"""mmseg registrations: heads, backbones, hooks, datasets.

Name this module in an mmseg config to use the plugins::

    custom_imports = dict(imports=['kim_plugins.mmseg'], allow_failed_imports=False)

Importing it also registers the timm models (``import kim_plugins``), so
``TIMMBackbone(model_name='vit_small_patch16_gab_224', ...)`` works, and scopes
mmengine's torch>=2.6 checkpoint-resume fix (see :mod:`kim_plugins.mmseg.resume`).
"""
import kim_plugins  # noqa: F401  timm registrations

from . import resume  # noqa: F401  must come first: patches the runner's resume path only
from . import datasets  # noqa: F401
from . import distributed  # noqa: F401  CPU-capable launch (gloo, CPU DDP wrapper, SyncBN -> BN)
from . import complexity  # noqa: F401  SDPA FLOP handler for mmengine's complexity analysis
from . import se_heads, se_hook  # noqa: F401  scale equalizers
from . import ra_aspp_heads  # noqa: F401  resolution-aware atrous rates
from . import sap  # noqa: F401  stochastic average pooling
from . import swin_gab  # noqa: F401  Gaussian attention bias on Swin
