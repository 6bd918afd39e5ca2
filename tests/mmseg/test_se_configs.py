"""The scale-equalizer configs train + evaluate (tiny), and the calibration hook inside mmengine's Runner."""
import copy
import glob
import os
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("mmseg.models", reason="mmseg is part of the project's environment (tools/setup.sh)")

from mmengine.config import Config  # noqa: E402
from mmengine.hooks import Hook  # noqa: E402
from mmseg.registry import HOOKS  # noqa: E402

import kim_plugins.mmseg  # noqa: E402,F401
import kim_plugins.mmseg.se_hook as se_hook  # noqa: E402
from kim_plugins.layers.scale_equalizer import ScaleEqualizer  # noqa: E402
from kim_plugins.dry_run.tiny import tiny_config  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "scale_equalizer")
SE_HEAD = {"pspnet": "SEPSPHead", "deeplabv3": "SEASPPHead", "deeplabv3plus": "SEDepthwiseSeparableASPPHead",
           "fcn": "SEFCNHead", "upernet": "SEUPerHead"}
PAIR = ("pspnet_r50-d8_4xb2-80k_cityscapes-512x1024.py", "pspnet-se_r50-d8_4xb2-80k_cityscapes-512x1024.py")
# One tiny run per config family (head x backbone); every dataset of the matrix is covered.
FAMILIES = [
    ("deeplabv3-se_r50-d8_4xb4-40k_voc12aug-512x512.py", "voc2012"),
    ("deeplabv3plus-se_r50-d8_4xb2-80k_cityscapes-512x1024.py", "cityscapes"),
    ("fcn-se_hr18_4xb4-40k_voc12aug-512x512.py", "voc2012"),
    ("swin-tiny-patch4-window7-in1k-pre_upernet-se_8xb2-160k_ade20k-512x512.py", "ade20k"),
    ("convnext-tiny-timm_upernet-se_8xb2-amp-160k_ade20k-512x512.py", "ade20k"),
]

RECORDED = {}


@HOOKS.register_module(force=True)
class _RecordTrainBatches(Hook):
    """Test helper: records what every training iteration is fed."""

    priority = "LOWEST"

    def __init__(self, key):
        self.key = key

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        RECORDED.setdefault(self.key, []).append(
            ([s.img_path for s in data_batch["data_samples"]], [t.clone() for t in data_batch["inputs"]]))


def _tiny(name, data_root, work_dir, num_batches=2, record=None, validate=True, **kw):
    cfg = tiny_config(os.path.join(CONFIGS, name), data_root, str(work_dir), device="cpu", crop_size=(32, 32), **kw)
    if not validate:
        cfg.train_cfg.val_interval = 10 ** 6
    hooks = [dict(h) for h in cfg.get("custom_hooks", [])]
    for h in hooks:
        if h["type"] == "ScaleEqualizerCalibrationHook":
            h["num_batches"] = num_batches
    if record:
        hooks.append(dict(type="_RecordTrainBatches", key=record))
    cfg.custom_hooks = hooks
    return cfg


def _train(cfg):
    from mmengine.runner import Runner
    runner = Runner.from_cfg(cfg)
    caught = {}

    class Catch(Hook):
        def after_val_epoch(self, runner, metrics=None):
            caught.update(metrics or {})

    runner.register_hook(Catch(), priority="LOWEST")
    runner.train()
    return runner, caught


def _assert_calibrated_in_checkpoint(work_dir, max_iters=2):
    ckpt = torch.load(os.path.join(work_dir, f"iter_{max_iters}.pth"), map_location="cpu", weights_only=False)
    keys = [k for k in ckpt["state_dict"] if k.startswith("decode_head.scale_equalizers.")]
    assert keys
    for k in keys:
        if k.endswith(".calibrated"):
            assert bool(ckpt["state_dict"][k]), k
        if k.endswith(".var"):
            assert ckpt["state_dict"][k].item() != 1.0, k  # measured, not the initial value
    return ckpt


def _assignments(path):
    """The top-level names a config file defines itself (its bases not merged)."""
    ns = {}
    exec(compile(open(path).read(), path, "exec"), {"dict": dict}, ns)
    return ns


def test_every_config_pairs_a_baseline_with_an_se_config():
    files = sorted(os.path.basename(f) for f in glob.glob(os.path.join(CONFIGS, "*.py")))
    se = [f for f in files if "-se_" in f]
    assert len(se) == 10 and len(files) == 20
    for f in se:
        baseline = f.replace("-se_", "_")
        assert baseline in files, f
        algo = "upernet" if "upernet" in f else f.split("-se_")[0]
        # The SE config is its baseline plus the head type and the calibration hook, nothing else.
        a = _assignments(os.path.join(CONFIGS, f))
        assert set(a) == {"_base_", "custom_imports", "model", "custom_hooks"}, f
        assert a["_base_"] == [f"./{baseline}"]
        assert a["model"] == dict(decode_head=dict(type=SE_HEAD[algo], se_mode="dataset")), f
        assert a["custom_hooks"] == [dict(type="ScaleEqualizerCalibrationHook", num_batches=50)]
        assert a["custom_imports"] == dict(imports=["kim_plugins.mmseg"], allow_failed_imports=False)
        base_src = open(os.path.join(CONFIGS, baseline)).read()
        assert "mmseg::" in base_src and "kim_plugins.mmseg" in base_src
    # one merged config, end to end
    cfg = Config.fromfile(os.path.join(CONFIGS, PAIR[1]))
    assert cfg.model.decode_head.type == "SEPSPHead" and cfg.model.decode_head.pool_scales == (1, 2, 3, 6)
    assert [h.type for h in cfg.custom_hooks] == ["ScaleEqualizerCalibrationHook"]


@pytest.fixture(scope="module")
def psp_pair(fixture_root, tmp_path_factory):
    root = os.path.join(fixture_root, "cityscapes")
    RECORDED.clear()
    runs = {}
    for name, key in zip(PAIR, ("baseline", "se")):
        work = tmp_path_factory.mktemp(key)
        runs[key] = (work,) + _train(_tiny(name, root, work, record=key, validate=key == "se"))
    return runs


def test_pspnet_pair_sees_identical_batches_and_se_is_calibrated(psp_pair):
    base, se = RECORDED["baseline"], RECORDED["se"]
    assert len(base) == len(se) == 2
    for (paths_a, imgs_a), (paths_b, imgs_b) in zip(base, se):
        assert paths_a == paths_b  # the calibration hook left the train loader's order alone
        for a, b in zip(imgs_a, imgs_b):
            assert torch.equal(a, b)  # ... and the RNG streams (random resize / crop / flip / photometric)
    work, runner, metrics = psp_pair["se"]
    assert "mIoU" in metrics
    _assert_calibrated_in_checkpoint(str(work))


def test_hook_skips_when_the_checkpoint_holds_statistics(psp_pair, monkeypatch):
    work, runner, _ = psp_pair["se"]
    model = copy.deepcopy(runner.model)
    ses = [m for m in model.modules() if isinstance(m, ScaleEqualizer)]
    for m in ses:  # a fresh SE model ...
        m.mean.zero_(), m.var.fill_(1.0), m.calibrated.fill_(False)
    ckpt = torch.load(os.path.join(str(work), "iter_2.pth"), map_location="cpu", weights_only=False)
    model.load_state_dict(ckpt["state_dict"])  # ... resumed from the SE run's checkpoint
    assert ses and all(bool(m.calibrated) for m in ses)
    calls = []
    monkeypatch.setattr(se_hook, "calibrate_scale_equalizers", lambda *a, **k: calls.append(1) or {})
    fake_runner = SimpleNamespace(model=model, logger=runner.logger, train_dataloader=runner.train_dataloader)
    hook = se_hook.ScaleEqualizerCalibrationHook(num_batches=1)
    hook.before_train(fake_runner)
    assert calls == []
    ses[0].calibrated.fill_(False)  # a checkpoint without (some) statistics is calibrated
    hook.before_train(fake_runner)
    assert calls == [1]


def test_hook_rejects_zero_batches():
    with pytest.raises(ValueError, match="num_batches=0"):
        se_hook.ScaleEqualizerCalibrationHook(num_batches=0)


@pytest.mark.parametrize("name, dataset", FAMILIES, ids=[f[0].split("_")[0] for f in FAMILIES])
def test_config_family_trains_and_evaluates(name, dataset, fixture_root, tmp_path):
    cfg = _tiny(name, os.path.join(fixture_root, dataset), tmp_path)
    runner, metrics = _train(cfg)
    assert "mIoU" in metrics
    _assert_calibrated_in_checkpoint(str(tmp_path))


def test_calibration_sampler_is_seeded_rank_strided_and_cycles():
    g = torch.Generator().manual_seed(3)
    stream = sum((torch.randperm(5, generator=g).tolist() for _ in range(4)), [])
    for rank in range(2):
        s = se_hook._CalibrationSampler(5, 7, seed=3, rank=rank, world_size=2)
        assert list(s) == list(s) == stream[rank::2][:7] and len(s) == 7


def test_hook_without_dataset_equalizers_only_warns():
    messages = []
    logger = SimpleNamespace(warning=messages.append, info=messages.append)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1), ScaleEqualizer("batch"))
    se_hook.ScaleEqualizerCalibrationHook().before_train(SimpleNamespace(model=model, logger=logger))
    assert len(messages) == 1 and "nothing to calibrate" in messages[0]
