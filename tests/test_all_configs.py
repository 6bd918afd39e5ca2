"""Every config under configs/ builds its model and its datasets (on the dataset fixtures).

Configs are discovered by globbing ``configs/**/*.py`` (``_base_`` pieces
excluded), so a config added later is covered without touching this file.
Each one is shrunk with ``kim_plugins.dry_run.tiny.tiny_config`` — the same
overrides as ``tools/train.py --tiny``: data_root -> the fixture of its
dataset class, small crops, BN, no pretrained download — and then:

- its segmentor is built by mmseg's registry, exactly as ``Runner`` builds it
  (model structure untouched by the shrinking: same backbone depth, heads,
  plugin modules). To keep ViT-B/R-101/Swin/ConvNeXt within the time budget
  the parameters are allocated on the ``meta`` device (every constructor runs
  with the config's arguments; only the random weight values are skipped); a
  model whose constructor needs real values (Swin's drop-path ``.item()``) is
  built on the CPU instead;
- its train/val/test datasets are built and yield a first sample through the
  config's own pipeline;
- its name follows mmseg's ``{model}_{N}xb{B}-{schedule}_{dataset}`` scheme, and
  a plugin config has its baseline beside it.
"""
import copy
import glob
import os

import pytest
import torch
from mmengine.config import Config

from kim_plugins.config.inspect import dataset_leaves
from kim_plugins.config_names import find_baseline, parse_config_name
from kim_plugins.dry_run.dataset_fixtures import FIXTURES
from kim_plugins.dry_run.tiny import tiny_config

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
CONFIGS = sorted(p for p in glob.glob(os.path.join(REPO, "configs", "**", "*.py"), recursive=True)
                 if f"{os.sep}_base_{os.sep}" not in p)
FIXTURE_OF_CLASS = {spec.mmseg_class: name for name, spec in FIXTURES.items()}


def _rel(path):
    return os.path.relpath(path, os.path.join(REPO, "configs"))


@pytest.fixture(scope="module", autouse=True)
def _cached_mmseg_metafiles():
    """Read mmseg's model-index metafiles once for the whole module.

    ``_base_ = ['mmseg::pspnet/pspnet_r50-....py']`` makes mmengine 0.10.7 parse
    all of mmseg's ~200 ``metafile.yml`` files (``_get_cfg_metainfo``) on every
    ``Config.fromfile``: ~2 s per config. The cache returns exactly what the
    function returns; only the repeated file reads go.
    """
    import functools

    from mmengine.config import utils

    original = utils._get_cfg_metainfo

    @functools.lru_cache(maxsize=None)
    def cached(package_path, cfg_path):
        return original(package_path, cfg_path)

    utils._get_cfg_metainfo = lambda package_path, cfg_path: copy.deepcopy(cached(package_path, cfg_path))
    yield
    utils._get_cfg_metainfo = original


def _no_serialization(loader_cfg):
    """``serialize_data=False`` on every dataset: mmengine's serialisation runs a full ``gc.collect()`` per dataset."""
    def walk(node):
        if isinstance(node, dict):
            if "data_root" in node:
                node["serialize_data"] = False
            for v in node.values():
                walk(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                walk(v)
    walk(loader_cfg)


def _build_model(registry, model_cfg):
    try:
        with torch.device("meta"):
            return registry.build(model_cfg.copy())
    except (RuntimeError, NotImplementedError) as e:
        if "meta" not in str(e):
            raise
    return registry.build(model_cfg.copy())  # constructor reads tensor values: build for real


def test_configs_are_discovered():
    folders = {_rel(p).split(os.sep)[0] for p in CONFIGS}
    assert {"smoke", "scale_equalizer", "atrous_rates", "stochastic_pooling"} <= folders
    assert len(CONFIGS) >= 20


@pytest.mark.parametrize("path", CONFIGS, ids=_rel)
def test_config_builds_model_and_datasets(path, fixture_root, tmp_path):
    from mmengine.registry import init_default_scope
    from mmseg.registry import DATASETS, MODELS

    import kim_plugins.mmseg  # noqa: F401

    cfg = Config.fromfile(path)
    types = {leaf["type"] for leaf in dataset_leaves(cfg.train_dataloader.dataset)}
    assert len(types) == 1, f"{_rel(path)} mixes dataset classes {types}"
    (ds_type,) = types
    assert ds_type in FIXTURE_OF_CLASS, f"{_rel(path)}: no fixture for dataset class {ds_type}"
    cfg = tiny_config(cfg, os.path.join(fixture_root, FIXTURE_OF_CLASS[ds_type]), str(tmp_path), device="cpu")
    init_default_scope(cfg.get("default_scope", "mmseg"))

    model = _build_model(MODELS, cfg.model)
    assert isinstance(model, torch.nn.Module)
    assert sum(p.numel() for p in model.parameters()) > 0
    depth = cfg.model.type == "DepthEstimator"  # depth heads predict one channel; NYU's classes are scene types
    assert model.decode_head.num_classes == (1 if depth else len(DATASETS.get(ds_type).METAINFO["classes"]))

    for split in ("train", "val", "test"):
        loader = cfg.get(f"{split}_dataloader")
        assert loader is not None, f"{_rel(path)} has no {split}_dataloader"
        _no_serialization(loader.dataset)
        dataset = DATASETS.build(loader.dataset)
        assert len(dataset) > 0
        sample = dataset[0]
        assert sample["inputs"].ndim == 3 and sample["inputs"].shape[0] == 3
        if split == "train":  # a training pair is cropped together; val/test keep the label's original size
            gt = sample["data_samples"].gt_depth_map if depth else sample["data_samples"].gt_sem_seg
            assert gt.data.shape[-2:] == sample["inputs"].shape[-2:]


@pytest.mark.parametrize("path", CONFIGS, ids=_rel)
def test_config_name_follows_mmseg_scheme_and_plugins_sit_beside_their_baseline(path):
    name = os.path.splitext(os.path.basename(path))[0]
    parsed = parse_config_name(name)
    assert parsed.gpus >= 1 and parsed.batch_per_gpu >= 1
    folder = os.path.dirname(path)
    siblings = {os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(folder, "*.py"))}
    found = find_baseline(name, siblings)
    if found is None:
        # a baseline: some plugin config in the folder must pair with it, unless the folder is not a method folder
        if _rel(path).split(os.sep)[0] != "smoke":
            partners = [s for s in siblings if (find_baseline(s, siblings) or (None,))[0] == name]
            assert partners, f"{_rel(path)} is neither a plugin config with its baseline beside it nor a baseline " \
                             f"of one"


def test_config_matrix_readme_is_in_sync_with_the_files():
    """configs/README.md is generated from the files: a config added, renamed or removed must regenerate it."""
    from kim_plugins.cli import config_matrix as tool

    text = open(os.path.join(REPO, "configs", "README.md")).read()
    assert text == tool.render(), "configs/README.md is out of date: run python tools/config_matrix.py"
    for path in CONFIGS:  # every config appears, with a link
        assert f"({_rel(path)})" in text, _rel(path)


def test_shared_base_piece_loads_the_plugins(tmp_path):
    child = tmp_path / "child.py"
    child.write_text(f"_base_ = ['mmseg::_base_/default_runtime.py', "
                     f"{os.path.join(REPO, 'configs', '_base_', 'kim_plugins.py')!r}]\n")
    cfg = Config.fromfile(str(child))
    assert cfg.custom_imports == dict(imports=["kim_plugins.mmseg"], allow_failed_imports=False)
    assert cfg.default_scope == "mmseg"
