"""mmseg config names: parse ``{model}_{N}xb{B}-{schedule}_{dataset}`` and pair plugin configs with baselines.

mmsegmentation names a config ``{algorithm}_{backbone}_{gpus}xb{batch}-{schedule}_{dataset}-{crop}``
(``pspnet_r50-d8_4xb2-80k_cityscapes-512x1024``). kim_plugins marks the plugin
by a ``-{tag}`` suffix on one ``_``-separated part of the algorithm/backbone
segment (``pspnet-se_r50-d8_...``, ``unet-s5-d16_deeplabv3-ra_...``) and keeps
a baseline config named exactly like mmseg's beside it. Removing that suffix
gives the baseline's name; that is how ``tools/summarize.py`` and the config
matrix pair runs. Pure string functions, no mmseg import.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Collection, Optional, Tuple

__all__ = ["ConfigName", "parse_config_name", "find_baseline", "METHOD_TAGS"]

_GPU_BATCH = re.compile(r"^(\d+)xb(\d+)(?:-(.+))?$")

#: Plugin suffix -> method, as used in config names.
METHOD_TAGS = {
    "se": "scale equalizer",
    "ra": "resolution-aware atrous rates",
    "sap": "stochastic average pooling",
    "gab": "Gaussian attention bias",
    "pln": "PreLayerNorm patch embedding",
    "nansafe": "NaN-safe depth loss and log-space head",
    "gammadecay": "L2 on BatchNorm gammas by category",
    "branchdrop": "dropout placement in residual branches",
}


@dataclass(frozen=True)
class ConfigName:
    """The parts of an mmseg config name.

    Attributes:
        name: The full name (no ``.py``).
        model: Everything before the ``NxbB`` part (algorithm and backbone).
        gpus: ``N`` of ``NxbB``: the number of GPUs the schedule was written for.
        batch_per_gpu: ``B`` of ``NxbB``.
        schedule: What follows ``NxbB-`` in that part (``80k``, ``amp-160k``).
        dataset: Everything after that part (``cityscapes-512x1024``).
    """

    name: str
    model: str
    gpus: int
    batch_per_gpu: int
    schedule: str
    dataset: str

    @property
    def dataset_name(self) -> str:
        """The dataset without its crop size (``cityscapes``, ``chase-db1``, ``voc12aug``)."""
        return re.sub(r"-\d+x\d+$", "", self.dataset)

    @property
    def crop(self) -> str:
        m = re.search(r"(\d+x\d+)$", self.dataset)
        return m.group(1) if m else ""


def parse_config_name(name: str) -> ConfigName:
    """Split an mmseg config name (a path or ``.py`` suffix is allowed).

    Raises:
        ValueError: The name has no ``{N}xb{B}`` part, so it does not follow mmseg's scheme.
    """
    base = re.sub(r"\.py$", "", name.replace("\\", "/").rsplit("/", 1)[-1])
    parts = base.split("_")
    for i, part in enumerate(parts):
        m = _GPU_BATCH.match(part)
        if m and 0 < i < len(parts) - 1:
            return ConfigName(name=base, model="_".join(parts[:i]), gpus=int(m.group(1)),
                              batch_per_gpu=int(m.group(2)), schedule=m.group(3) or "",
                              dataset="_".join(parts[i + 1:]))
    raise ValueError(f"config name {base!r} does not follow mmseg's scheme "
                     f"'{{model}}_{{gpus}}xb{{batch}}-{{schedule}}_{{dataset}}' (no '{{N}}xb{{B}}' part)")


def find_baseline(name: str, known: Collection[str]) -> Optional[Tuple[str, str]]:
    """Return ``(baseline_name, tag)`` if dropping one ``-tag`` suffix of a part of ``name`` gives a name in ``known``.

    Only the parts before ``NxbB`` (model parts) are considered, so crop sizes
    and schedules never pair. Returns ``None`` for a baseline or an unpaired config.
    """
    parsed = parse_config_name(name)
    parts = parsed.name.split("_")
    n_model = len(parsed.model.split("_"))
    for i in range(n_model):
        if "-" not in parts[i]:
            continue
        head, tag = parts[i].rsplit("-", 1)
        candidate = "_".join(parts[:i] + [head] + parts[i + 1:])
        if candidate in known:
            return candidate, tag
    return None
