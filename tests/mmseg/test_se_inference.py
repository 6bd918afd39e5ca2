"""Scale equalizers are folded wherever a segmentor is used for inference only (kim_plugins.mmseg.se_inference).

init_model + inference_model, Runner.test (tools/test.py) and tools/benchmark.py fold; validation during
training does not; ``test_cfg.fold_scale_equalizers=False`` opts out. Folded predictions equal unfolded ones.
"""
import os

import numpy as np
import pytest
import torch

import kim_plugins.mmseg  # noqa: F401
from kim_plugins.layers.scale_equalizer import BorderCorrectedConv2d, ScaleEqualizer, fold_scale_equalizers
from kim_plugins.mmseg.se_inference import scale_equalizer_count

from tests.tools import run_tool

OPT_OUT = {"model.test_cfg.fold_scale_equalizers": False}


def _image(seed=0, size=(48, 64)):
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def test_init_model_and_inference_model_fold_exactly(se_aspp_run):
    from mmseg.apis import inference_model, init_model

    folded = init_model(se_aspp_run.config, se_aspp_run.checkpoint, device="cpu")
    plain = init_model(se_aspp_run.config, se_aspp_run.checkpoint, device="cpu", cfg_options=dict(OPT_OUT))
    n = scale_equalizer_count(folded)
    assert n == len(folded.decode_head.scale_equalizers) >= 4  # image pool, every ASPP branch; built unfolded
    for seed in range(2):
        img = _image(seed)
        a, b = inference_model(folded, img), inference_model(plain, img)
        torch.testing.assert_close(a.seg_logits.data, b.seg_logits.data, rtol=1e-4, atol=1e-5)
        assert torch.equal(a.pred_sem_seg.data, b.pred_sem_seg.data)
    # folded: no equalizer left, the head runs its parent's forward through the folded convolutions
    assert scale_equalizer_count(folded) == 0 and not folded.decode_head._se_active()
    assert all(not isinstance(m, ScaleEqualizer) for m in folded.modules())
    assert any(isinstance(m, BorderCorrectedConv2d) for m in folded.decode_head.modules())
    # opted out: every equalizer still runs
    assert scale_equalizer_count(plain) == n


def test_runner_test_folds_and_reports_the_unfolded_metrics(se_aspp_run, tmp_path):
    """Runner.test (mmseg's and our tools/test.py) folds; the metrics equal an unfolded run's."""
    from mmengine.runner import Runner

    results = {}
    for name, options in (("folded", {}), ("unfolded", OPT_OUT)):
        cfg = se_aspp_run.cfg.copy()
        cfg.merge_from_dict(options)
        cfg.work_dir = str(tmp_path / name)
        cfg.load_from = se_aspp_run.checkpoint
        cfg.experiment_name = f"fold_{name}"
        runner = Runner.from_cfg(cfg)
        results[name] = (runner.test(), scale_equalizer_count(runner.model))
    (m_folded, left_folded), (m_plain, left_plain) = results["folded"], results["unfolded"]
    assert left_folded == 0 and left_plain > 0
    assert m_folded.keys() == m_plain.keys()
    for k in m_plain:
        assert m_folded[k] == pytest.approx(m_plain[k], abs=1e-6), k


def test_validation_during_training_keeps_the_equalizers(se_aspp_run):
    """The fixture's run validated at iteration 2 (val_step): nothing was folded, training could go on."""
    assert scale_equalizer_count(se_aspp_run.model) == len(se_aspp_run.model.decode_head.scale_equalizers) > 0


def test_fold_switch_must_be_a_bool(se_aspp_run):
    from mmseg.apis import inference_model, init_model

    model = init_model(se_aspp_run.config, se_aspp_run.checkpoint, device="cpu",
                       cfg_options={"model.test_cfg.fold_scale_equalizers": "no"})
    for _ in range(2):  # every call, not only the first
        with pytest.raises(TypeError, match="fold_scale_equalizers must be True or False, got 'no'"):
            inference_model(model, _image())


def test_benchmark_times_the_folded_model_beside_its_unfolded_copy(se_aspp_run):
    rows = run_tool("benchmark", [se_aspp_run.config, "--checkpoint", se_aspp_run.checkpoint, "--shape", "64",
                                  "--rounds", "3", "--warmup", "0", "--device", "cpu", "--flops"])
    by_name = {r["name"]: r for r in rows}
    name = os.path.splitext(os.path.basename(se_aspp_run.config))[0]
    n = scale_equalizer_count(se_aspp_run.model)
    assert list(by_name) == [name, f"{name} (A/A)", f"{name} (unfolded)"]
    assert by_name[name]["equalizers"] == f"{n}/{n} folded"
    assert by_name[f"{name} (unfolded)"]["equalizers"] == f"{n} unfolded"
    assert all(r["median_ms"] > 0 for r in rows)
    # folding adds only the bias a bias-free conv (ConvModule + BN) needs to take the shift (and its adds)
    copy = __import__("copy").deepcopy(se_aspp_run.model)
    fold_scale_equalizers(copy)
    added = sum(m.out_channels for m in copy.modules() if isinstance(m, BorderCorrectedConv2d))
    assert by_name[name]["params"] - by_name[f"{name} (unfolded)"]["params"] == added
    assert by_name[name]["flops"] == pytest.approx(by_name[f"{name} (unfolded)"]["flops"], rel=1e-3)
