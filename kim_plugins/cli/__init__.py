"""The command-line tools, one module per tool, each with ``parse_args(argv)``, ``run(args)`` and ``main(argv) -> int``.

``tools/<name>.py`` (mmseg's convention) and the console script ``kim-<name>``
(``setup.py``) both call :func:`main`; ``run`` returns what the tool computed
(rows, numbers, written paths), for the tests and for use from Python::

    from kim_plugins.cli import erf
    out = erf.run(erf.parse_args(['resnet18', '--size', '64']))

:mod:`~kim_plugins.cli.common` holds what several tools share (``--trust-checkpoint``,
``--cfg-options`` without mmengine, the train/test config head) and
:mod:`~kim_plugins.cli.inputs` the models and images of the diagnostic tools. Nothing is imported here.
"""
