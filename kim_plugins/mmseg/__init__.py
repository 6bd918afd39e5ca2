"""mmseg registrations: heads, backbones, hooks, datasets.

Name this module in an mmseg config to use the plugins::

    custom_imports = dict(imports=['kim_plugins.mmseg'], allow_failed_imports=False)

Importing it also registers the timm models (``import kim_plugins``), so
``TIMMBackbone(model_name='vit_small_patch16_gab_224', ...)`` works, and scopes
mmengine's torch>=2.6 checkpoint-resume fix (see :mod:`kim_plugins.mmseg.resume`), and makes
every runner write checkpoints that load safely (:mod:`kim_plugins.mmseg.weights_only`).
Every mmengine/mmseg internal these rely on is reached through one module,
:mod:`kim_plugins.mmseg.compat`, which lists each with the versions it was checked against.
"""
import kim_plugins  # noqa: F401  timm registrations

from . import resume  # noqa: F401  must come first: patches the runner's resume path only
from . import weights_only  # noqa: F401  runner checkpoints that torch.load(weights_only=True) reads
from . import datasets  # noqa: F401
from . import distributed  # noqa: F401  CPU-capable launch (gloo, CPU DDP wrapper, SyncBN -> BN)
from . import complexity  # noqa: F401  SDPA FLOP handler for mmengine's complexity analysis
from . import se_heads, se_hook, se_inference  # noqa: F401  scale equalizers (folded at test_step)
from . import ra_aspp_heads  # noqa: F401  resolution-aware atrous rates
from . import sap  # noqa: F401  stochastic average pooling
from . import contrastive_loss  # noqa: F401  temperature-free InfoNCE
from . import nan_safe_depth  # noqa: F401  NaN-safe depth loss, log-space head, non-finite-loss hook
from . import branch_dropout  # noqa: F401  dropout placement plugin for ResNet branches
from . import bn_gamma_decay  # noqa: F401  L2 on BatchNorm gammas by category
from . import timm_backbone  # noqa: F401  TIMMBackbone that reads pretrained weights at init_weights
from . import swin_gab  # noqa: F401  Gaussian attention bias on Swin
