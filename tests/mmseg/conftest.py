"""A trained scale-equalizer segmentor checkpoint shared by the checkpoint-loading and inference-folding tests."""
import os
from types import SimpleNamespace

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SMOKE = os.path.join(REPO, "configs", "smoke", "fcn_r18-tiny-d8_1xb2-4i_stare-32x32.py")

# The smoke segmentor (ResNetV1c-18, 8 base channels, output stride 8) with a scale-equalized ASPP head whose
# every fusion operand is equalized, and three resolution-aware rates for its 64x64 crop.
SE_ASPP_HEAD = dict(type="SEASPPHead", in_channels=64, in_index=3, channels=8, dilations="auto", crop_size=(64, 64),
                    output_stride=8, num_rates=3, equalize_all_branches=True, num_classes=2, dropout_ratio=0.0,
                    norm_cfg=dict(type="BN", requires_grad=True), align_corners=False,
                    loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0))


@pytest.fixture(scope="session")
def se_aspp_run(fixture_root, tmp_path_factory):
    """Two training iterations (calibrated equalizers) written by mmengine's runner with kim_plugins imported.

    Returns ``config`` (the dumped config file), ``checkpoint`` (``iter_2.pth``), ``cfg``, ``work_dir``, and the
    runner's ``message_hub`` and ``model`` after training (and its validation at iteration 2).
    """
    from mmengine.config import ConfigDict
    from mmengine.runner import Runner

    import kim_plugins.mmseg  # noqa: F401  registrations, safe checkpoints
    from kim_plugins.dry_run.tiny import tiny_config

    work = tmp_path_factory.mktemp("se_aspp_run")
    cfg = tiny_config(SMOKE, os.path.join(fixture_root, "stare"), str(work), crop_size=(64, 64), max_iters=2,
                      device="cpu")
    cfg.model.decode_head = ConfigDict(SE_ASPP_HEAD)
    cfg.custom_hooks = [dict(type="ScaleEqualizerCalibrationHook", num_batches=1)]
    runner = Runner.from_cfg(cfg)
    runner.train()
    config = os.path.join(str(work), "se_aspp_config.py")
    cfg.dump(config)
    return SimpleNamespace(config=config, checkpoint=os.path.join(str(work), "iter_2.pth"), cfg=cfg,
                           work_dir=str(work), message_hub=runner.message_hub, model=runner.model)
