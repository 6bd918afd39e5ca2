"""Config glue: what a config says (:mod:`.inspect`) and rewriting a config (:mod:`.rewrite`).

Nothing is imported here: ``kim_plugins.config.rewrite`` and
``kim_plugins.config.inspect`` need neither mmseg nor mmengine at import time.
"""
