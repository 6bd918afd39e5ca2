"""Models and images for the diagnostic tools (ERF, atrous rates, dead-pixel test).

A tool's model argument is an mmseg config (built offline with
:func:`load_segmentor`) or a timm name (:func:`load_timm`); its images come from
a folder (:func:`image_files`, :func:`load_images`) or a synthetic dataset
fixture in the layout of the config's data (:func:`fixture_files`).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = ["IMAGE_EXTS", "is_config", "uncalibrated_equalizer_owners", "load_segmentor", "load_timm",
           "dataset_fixture_name", "image_files", "load_images", "fixture_files", "parse_size"]

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


# ----------------------------------------------------------------------------- models
def is_config(model: str) -> bool:
    """True when ``model`` names an mmseg config file rather than a timm model."""
    return model.endswith(".py") or os.path.isfile(model)


def uncalibrated_equalizer_owners(model: torch.nn.Module) -> List[str]:
    """Module paths of the heads whose ``'dataset'`` scale equalizers are uncalibrated and may not run so."""
    from kim_plugins.layers.scale_equalizer import ScaleEqualizer

    owners = []
    for name, m in model.named_modules():
        if isinstance(m, ScaleEqualizer) and m.mode == "dataset" and not m.is_calibrated and not m.allow_uncalibrated:
            owner = name.split(".scale_equalizers.")[0]
            if owner not in owners:
                owners.append(owner)
    return owners


def load_segmentor(config: Any, checkpoint: Optional[str] = None, cfg_options: Optional[Dict] = None,
                   device: str = "cpu", trust: bool = False) -> Tuple[torch.nn.Module, Any]:
    """Build an mmseg segmentor offline: no pretrained download, SyncBN -> BN.

    The model is :func:`kim_plugins.config.inspect.build_segmentor`'s (``mmseg.apis.init_model``;
    without ``checkpoint``, mmseg's own ``init_weights``: an untrained
    initialisation). ``trust`` (``--trust-checkpoint``) lets an old-style
    runner checkpoint that safe loading refuses be unpickled. Returns
    ``(model, cfg)``; ``cfg`` has the ``cfg_options`` and the offline, BN rewrite.

    Raises:
        SystemExit: Scale equalizers that were never calibrated (an untrained
            SE head): the message gives ``--checkpoint`` and the command-line
            spelling of ``allow_uncalibrated``.
    """
    from mmengine.config import Config

    from kim_plugins.config.inspect import build_segmentor
    from kim_plugins.config.rewrite import offline_weights, sync_bn_to_bn

    cfg = Config.fromfile(config) if isinstance(config, str) else config
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    sync_bn_to_bn(cfg.model)
    offline_weights(cfg.model)
    model = build_segmentor(cfg, checkpoint, device, trust=trust)
    owners = uncalibrated_equalizer_owners(model)
    if owners:
        flags = " ".join(f"model.{o}.allow_uncalibrated=True" for o in owners)
        weights = f"checkpoint {checkpoint}" if checkpoint else "untrained weights"
        raise SystemExit(f"{config if isinstance(config, str) else 'the config'}: the scale equalizers of "
                         f"{', '.join(owners)} were never calibrated ({weights}). Pass --checkpoint with a trained "
                         f"checkpoint, or measure the ERF with mean 0 / variance 1 equalizers: --cfg-options {flags}")
    return model, cfg


def load_timm(name: str, checkpoint: Optional[str] = None, device: str = "cpu",
              model_kwargs: Optional[Dict[str, Any]] = None,
              size: Optional[Tuple[int, int]] = None) -> torch.nn.Module:
    """``timm.create_model(name, pretrained=False, checkpoint_path=checkpoint, **model_kwargs)``.

    kim_plugins' names work too. A model whose timm config has a fixed input
    size (ViTs) is built for ``size`` (``img_size=size``) unless
    ``model_kwargs`` sets ``img_size``.
    """
    import timm
    from timm.models import get_pretrained_cfg_value

    import kim_plugins  # noqa: F401  timm registrations
    kwargs = dict(model_kwargs or {})
    if size is not None and "img_size" not in kwargs and get_pretrained_cfg_value(name, "fixed_input_size"):
        kwargs["img_size"] = size
    if checkpoint:
        kwargs["checkpoint_path"] = checkpoint
    return timm.create_model(name, pretrained=False, **kwargs).to(device).eval()


def dataset_fixture_name(cfg: Any) -> str:
    """The dataset fixture in the layout of a config's training data.

    Raises:
        SystemExit: No fixture for the config's dataset classes (through
            ``RepeatDataset``/``ConcatDataset``); the message names ``--fixture`` and ``--images``.
    """
    from kim_plugins.dry_run.dataset_fixtures import fixture_for_config

    try:
        return fixture_for_config(cfg)
    except ValueError as err:
        raise SystemExit(f"{err}: pass --fixture NAME or --images DIR") from None


# ----------------------------------------------------------------------------- images
def image_files(folder: str) -> List[str]:
    """Image files of a folder (recursive), sorted."""
    out = []
    for root, _, files in os.walk(folder):
        out.extend(os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_EXTS))
    if not out:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTS)}) under {folder!r}")
    return sorted(out)


def load_images(files: Sequence[str], size: Tuple[int, int], mean: Sequence[float], std: Sequence[float],
                scale: float) -> torch.Tensor:
    """Read RGB images, resize to ``size`` (H, W), normalise to ``((x/255*scale) - mean) / std``."""
    from PIL import Image

    h, w = size
    arrs = []
    for f in files:
        with Image.open(f) as im:
            arrs.append(np.asarray(im.convert("RGB").resize((w, h), Image.BILINEAR), dtype=np.float32))
    x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2) * (scale / 255.0)
    m = torch.tensor(mean, dtype=torch.float32)[None, :, None, None]
    s = torch.tensor(std, dtype=torch.float32)[None, :, None, None]
    return (x - m) / s


def fixture_files(name: str, num_images: int, size: Tuple[int, int], root: str) -> List[str]:
    """Write a synthetic dataset fixture of ``num_images`` training images and list them."""
    from kim_plugins.dry_run.dataset_fixtures import FIXTURES, make_dataset_fixture

    data_root = make_dataset_fixture(name, root, num_train=num_images, num_val=1, size=size)
    spec = FIXTURES[name]
    folder = os.path.join(data_root, spec.img_dir.format(split=spec.splits[0]))
    files = [f for f in image_files(folder) if f.endswith(spec.img_suffix)]
    return files[:num_images]


def parse_size(values: Optional[Sequence[int]]) -> Optional[Tuple[int, int]]:
    if not values:
        return None
    if len(values) > 2 or min(values) <= 0:
        raise SystemExit(f"--size takes one or two positive ints (H [W]), got {values}")
    return (values[0], values[-1])
