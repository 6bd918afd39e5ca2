"""mmseg dataset classes of kim_plugins."""
from mmseg.datasets import BaseSegDataset
from mmseg.registry import DATASETS

from kim_plugins.data.fashion_scenes import CLASSES, PALETTE

__all__ = ["FashionScenesDataset"]


@DATASETS.register_module()
class FashionScenesDataset(BaseSegDataset):
    """Fashion scenes: real Fashion-MNIST garments composed into multi-scale scenes (11 classes).

    Written by :func:`kim_plugins.data.fashion_scenes.generate_fashion_scenes`
    in the layout ``img_dir/{train,val}/*.png`` and ``ann_dir/{train,val}/*.png``;
    label 0 is background, 1..10 the Fashion-MNIST classes. ``reduce_zero_label``
    is False: the background is a class.
    """

    METAINFO = dict(classes=CLASSES, palette=PALETTE)

    def __init__(self, img_suffix: str = ".png", seg_map_suffix: str = ".png",
                 reduce_zero_label: bool = False, **kwargs) -> None:
        super().__init__(img_suffix=img_suffix, seg_map_suffix=seg_map_suffix,
                         reduce_zero_label=reduce_zero_label, **kwargs)
