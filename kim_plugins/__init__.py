"""kim_plugins: the methods of Bum Jun Kim and Sang Woo Kim's papers for timm and mmseg.

``import kim_plugins`` registers the timm models (``timm.create_model`` names)
and never imports mmseg or mmcv. ``import kim_plugins.mmseg`` (or
``custom_imports=dict(imports=['kim_plugins.mmseg'])`` in an mmseg config)
registers the mmseg heads, backbones and hooks.
"""
from . import layers  # noqa: F401
from . import timm  # noqa: F401  registers timm entry points

__version__ = "0.1.0"
