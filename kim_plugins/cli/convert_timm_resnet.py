"""Convert timm ResNet / ResNet-D weights to an mmseg backbone checkpoint.

mmseg publishes no ``ResNetV1d`` weights; timm's ``resnet50d`` has the same
architecture. This writes a checkpoint that mmseg's ``ResNetV1d`` (and
``ResNetV1dSAP``) load with ``pretrained='<out>'`` or
``init_cfg=dict(type='Pretrained', checkpoint='<out>')``; the key mapping is
:func:`kim_plugins.mmseg.sap.timm_resnet_to_mmseg`.

Examples::

    # from timm's hub (needs the network, or a filled Hugging Face cache)
    python tools/convert_timm_resnet.py resnet50d.ra2_in1k checkpoints/resnet50d_ra2-mmseg.pth
    # from a local timm checkpoint (.pth / .pth.tar / .safetensors)
    python tools/convert_timm_resnet.py path/to/resnet50d.safetensors checkpoints/resnet50d-mmseg.pth

The converted weights are checked by loading them strictly into mmseg's
backbone (``--depth``, default 50; ``ResNetV1d`` for a deep stem, ``ResNet``
for a 7x7 stem) before the file is written.
"""
from __future__ import annotations

import argparse
import os
from typing import Dict, Optional, Sequence

import torch

from kim_plugins.cli.common import doc_parser


def _load_source(src: str) -> Dict[str, torch.Tensor]:
    if os.path.isfile(src):
        if src.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(src)
        ckpt = torch.load(src, map_location="cpu", weights_only=True)
        return ckpt.get("state_dict", ckpt.get("model", ckpt)) if isinstance(ckpt, dict) else ckpt
    import timm
    return timm.create_model(src, pretrained=True).state_dict()


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = doc_parser(__doc__)
    parser.add_argument("src", help="timm model name with tag (pretrained from the hub) or a local checkpoint file")
    parser.add_argument("dst", help="output checkpoint (.pth) for mmseg")
    parser.add_argument("--depth", type=int, default=50, help="ResNet depth, to verify the weights (default 50)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> str:
    """Convert, verify by a strict load into mmseg's backbone, save; return the output path."""
    from kim_plugins.mmseg.sap import timm_resnet_to_mmseg
    from mmseg.models.backbones import ResNet, ResNetV1d

    state = timm_resnet_to_mmseg(_load_source(args.src))
    backbone_cls = ResNetV1d if any(k.startswith("stem.") for k in state) else ResNet
    backbone_cls(depth=args.depth).load_state_dict(state, strict=True)  # raises on any mismatch
    os.makedirs(os.path.dirname(os.path.abspath(args.dst)), exist_ok=True)
    torch.save({"state_dict": state, "meta": {"source": args.src, "converter": "timm_resnet_to_mmseg",
                                              "mmseg_backbone": backbone_cls.__name__}}, args.dst)
    print(f"{args.src} -> {args.dst}: {len(state)} tensors, loads strictly into mmseg {backbone_cls.__name__}"
          f"(depth={args.depth})")
    return args.dst


def main(argv: Optional[Sequence[str]] = None) -> int:
    run(parse_args(argv))
    return 0
