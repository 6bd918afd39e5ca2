"""mmseg's ``TIMMBackbone`` that reads its pretrained weights when training starts, not when it is built.

mmseg's ``TIMMBackbone(pretrained=True, pretrained_cfg_overlay=dict(file=...))``
loads the file inside ``timm.create_model``, at construction. So a config
fine-tuning from a local timm checkpoint (the GAB / PLN ViT configs) cannot
even be built where the file is absent -- ``mmseg.apis.init_model(cfg, ckpt)``,
``tools/test.py`` and ``tools/benchmark.py`` failed with a bare
``FileNotFoundError('')``, although the finished checkpoint replaces every
weight anyway.

:class:`LazyPretrainedTIMMBackbone` takes exactly ``TIMMBackbone``'s arguments
and builds the same network without weights; ``init_weights()`` -- which
mmengine's runner calls when training starts, and which ``init_model``,
``Runner.test`` / ``val`` and the tools never call -- builds mmseg's own
``TIMMBackbone`` with the given arguments (the same timm loading path:
checkpoint filter, position-embedding resampling) and copies its weights in,
strictly. The random stream of the run is left untouched. A missing file at
that point is an error naming the file, the config key it comes from, how to
save it from timm, and the option that trains without it.
"""
from __future__ import annotations

import copy
import os.path as osp
from typing import Any, Dict, Optional

import torch
from mmengine.logging import print_log
from mmseg.models.backbones import TIMMBackbone
from mmseg.registry import MODELS

__all__ = ["LazyPretrainedTIMMBackbone"]


@MODELS.register_module()
class LazyPretrainedTIMMBackbone(TIMMBackbone):
    """``TIMMBackbone`` whose pretrained weights are loaded in ``init_weights`` (training), not at construction.

    Args:
        model_name: timm model name.
        features_only: As ``TIMMBackbone``.
        pretrained: Load timm's pretrained weights in ``init_weights``
            (from ``pretrained_cfg_overlay=dict(file=...)`` when given).
        checkpoint_path: A timm checkpoint loaded in ``init_weights``.
        in_channels: Input channels.
        init_cfg: mmengine init config (applied before the pretrained weights).
        **kwargs: Other timm arguments (``pretrained_cfg_overlay``,
            ``img_size``, ``dynamic_img_size``, plugin options, ...).
    """

    def __init__(self, model_name: str, features_only: bool = True, pretrained: bool = True,
                 checkpoint_path: str = "", in_channels: int = 3, init_cfg: Optional[Dict[str, Any]] = None,
                 **kwargs: Any) -> None:
        weights_args = dict(model_name=model_name, features_only=features_only, pretrained=pretrained,
                            checkpoint_path=checkpoint_path, in_channels=in_channels, **copy.deepcopy(kwargs))
        super().__init__(model_name, features_only=features_only, pretrained=False, checkpoint_path="",
                         in_channels=in_channels, init_cfg=init_cfg, **kwargs)
        self._weights_args = weights_args

    @property
    def loads_pretrained_weights(self) -> bool:
        """Whether ``init_weights`` reads pretrained weights."""
        return bool(self._weights_args["pretrained"] or self._weights_args["checkpoint_path"])

    def _check_files(self) -> None:
        args = self._weights_args
        overlay = args.get("pretrained_cfg_overlay") or {}
        files = []
        if args["pretrained"] and overlay.get("file"):
            files.append(("model.backbone.pretrained_cfg_overlay.file", overlay["file"]))
        if args["checkpoint_path"]:
            files.append(("model.backbone.checkpoint_path", args["checkpoint_path"]))
        for key, path in files:
            if osp.isfile(path):
                continue
            host = osp.splitext(osp.basename(path))[0]
            raise FileNotFoundError(
                f"{type(self).__name__}({args['model_name']!r}): the pretrained weights {path!r} ({key} of the "
                f"config; resolved to {osp.abspath(path)}) do not exist. They are a plain timm state dict of "
                f"{host!r}; save one on a machine with network access with: python -c \"import timm, torch; "
                f"torch.save(timm.create_model('{host}', pretrained=True).state_dict(), '{path}')\". Or train "
                f"from scratch: tools/train.py --no-pretrained (it sets model.backbone.pretrained=False and drops "
                f"checkpoint_path). Building the model for inference (init_model, tools/test.py) never reads "
                f"this file.")

    def init_weights(self) -> None:
        """mmengine's initialisation, then the pretrained weights (strictly) when asked for."""
        if self._is_init:
            return super().init_weights()  # mmengine's own 'already initialised' warning
        super().init_weights()
        if not self.loads_pretrained_weights:
            return
        self._check_files()
        with torch.random.fork_rng(devices=[]):  # the run's random stream is the one a plain build leaves
            source = TIMMBackbone(**copy.deepcopy(self._weights_args))
        self.timm_model.load_state_dict(source.timm_model.state_dict(), strict=True)
        origin = (self._weights_args.get("pretrained_cfg_overlay") or {}).get("file") \
            or self._weights_args["checkpoint_path"] or "timm's pretrained_cfg"
        print_log(f"{type(self).__name__}: loaded the pretrained weights of {self._weights_args['model_name']!r} "
                  f"from {origin}", logger="current")
