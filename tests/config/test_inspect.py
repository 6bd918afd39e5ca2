"""kim_plugins.config.inspect: the training crop (one precedence) and the dataset walker (wrappers, clear errors)."""
import pytest
from mmengine.config import Config

from kim_plugins.config.inspect import crop_size, dataset_leaves
from kim_plugins.dry_run.dataset_fixtures import fixture_for_config

STARE = dict(type="STAREDataset", data_root="data/STARE",
             pipeline=[dict(type="LoadImageFromFile"), dict(type="RandomCrop", crop_size=(48, 40)),
                       dict(type="Resize", scale=(100, 60), keep_ratio=False)])


def _cfg(**kw):
    return Config(dict(model=dict(type="EncoderDecoder", data_preprocessor=dict(type="SegDataPreProcessor")), **kw))


def test_crop_size_precedence_preprocessor_then_crop_size_then_pipeline():
    cfg = _cfg(data_preprocessor=dict(size=(20, 30)), crop_size=(64, 64),
               train_dataloader=dict(dataset=dict(type="RepeatDataset", times=2, dataset=STARE)))
    cfg.model.data_preprocessor.size = (10, 12)
    assert crop_size(cfg) == (10, 12)  # 1. what the model is fed
    cfg.model.data_preprocessor.size = None
    assert crop_size(cfg) == (20, 30)  # 2. the top-level data_preprocessor
    cfg.data_preprocessor.size = None
    assert crop_size(cfg) == (64, 64)  # 3. the crop_size variable
    cfg.crop_size = None
    assert crop_size(cfg) == (48, 40)  # 4. RandomCrop of the train pipeline, through RepeatDataset
    cfg.train_dataloader.dataset.dataset.pipeline.pop(1)
    assert crop_size(cfg) == (60, 100)  # ... else a fixed-size Resize, (w, h) -> (h, w)
    cfg.train_dataloader.dataset.dataset.pipeline.pop(1)
    assert crop_size(cfg) is None


def test_crop_size_int_and_plain_dicts():
    assert crop_size(dict(model=dict(data_preprocessor=dict(size=96)))) == (96, 96)
    assert crop_size(dict(model=dict(), crop_size=[32, 16])) == (32, 16)
    assert crop_size(dict(model=dict())) is None


def test_crop_size_of_a_real_config_prefers_the_preprocessor_size():
    import os

    root = os.path.join(os.path.dirname(__file__), "..", "..")
    cfg = Config.fromfile(os.path.join(root, "configs", "smoke", "fcn_r18-tiny-d8_1xb2-4i_stare-32x32.py"))
    cfg.model.data_preprocessor.size = (24, 24)  # e.g. --cfg-options: the model sees this, not crop_size
    assert crop_size(cfg) == (24, 24)


def test_dataset_leaves_open_repeat_and_concat_wrappers():
    ade = dict(type="ADE20KDataset", data_root="a")
    concat = dict(type="ConcatDataset", datasets=[dict(type="RepeatDataset", times=3, dataset=STARE), ade])
    assert [d["type"] for d in dataset_leaves(concat)] == ["STAREDataset", "ADE20KDataset"]
    assert dataset_leaves(dict(type="RepeatDataset", times=2, dataset=ade)) == [ade]
    assert dataset_leaves(ade) == [ade]


def test_dataset_leaves_reject_what_is_not_a_dataset():
    with pytest.raises(ValueError, match="must be a dict"):
        dataset_leaves([dict(type="ADE20KDataset")])
    with pytest.raises(ValueError, match="without 'type'"):
        dataset_leaves(dict(data_root="x"))


def test_fixture_for_config_reads_through_wrappers_and_never_falls_back():
    def cfg(dataset):
        return Config(dict(train_dataloader=dict(dataset=dataset)))

    assert fixture_for_config(cfg(dict(type="RepeatDataset", times=2, dataset=STARE))) == "stare"
    assert fixture_for_config(cfg(dict(type="ConcatDataset", datasets=[STARE, dict(STARE)]))) == "stare"
    with pytest.raises(ValueError, match=r"no dataset fixture for \['ADE20KDataset', 'STAREDataset'\]"):
        fixture_for_config(cfg(dict(type="ConcatDataset", datasets=[STARE, dict(type="ADE20KDataset")])))
    with pytest.raises(ValueError, match=r"no dataset fixture for \['MyDataset'\]; fixtures exist for"):
        fixture_for_config(cfg(dict(type="MyDataset")))
    with pytest.raises(ValueError, match="no train_dataloader.dataset"):
        fixture_for_config(Config(dict(model=dict())))
