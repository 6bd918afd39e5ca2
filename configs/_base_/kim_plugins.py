# Shared piece: load the kim_plugins mmseg registrations (heads, backbones, hooks, the
# torch>=2.6 resume fix). Inherit it beside mmseg's bases:
#   _base_ = ['mmseg::_base_/models/pspnet_r50-d8.py', ..., '../_base_/kim_plugins.py']
# (tools/train.py, tools/test.py and tools/benchmark.py import kim_plugins.mmseg anyway).
custom_imports = dict(imports=['kim_plugins.mmseg'], allow_failed_imports=False)
