"""The suite's segmentation mechanism probes, checked against the scale equalizer's own math."""
import copy

import pytest
import torch


def _segmentor(head, **kw):
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    import kim_plugins.mmseg  # noqa: F401
    from kim_plugins.suite.seg import seg_model_cfg

    init_default_scope("mmseg")
    torch.manual_seed(0)
    return MODELS.build(seg_model_cfg(head, 64, **kw))


def _decode_forward(model, x):
    return model.decode_head(model.extract_feat(x))


@pytest.mark.parametrize("plain, se, sites", [("UPerHead", "SEUPerHead", ["ppm_0", "ppm_1", "ppm_2", "ppm_3"]),
                                              ("ASPPHead", "SEASPPHead", ["image_pool"])])
def test_variance_probe_matches_calibration_and_baseline(plain, se, sites):
    """After calibrating on these images, each equalized branch enters its fusion with variance v / (v + eps),
    and removing the equalizer (Var / s^2) gives back the plain head's variance for the same weights."""
    from kim_plugins.layers.scale_equalizer import calibrate_scale_equalizers
    from kim_plugins.suite.seg import measure_fusion_variances

    base = _segmentor(plain)
    model = _segmentor(se, se_mode="dataset")
    assert model.load_state_dict(base.state_dict(), strict=False).unexpected_keys == []
    x = torch.rand(4, 3, 64, 64)
    stats = calibrate_scale_equalizers(model, [x], forward_fn=_decode_forward)
    bvar = measure_fusion_variances(base, x)
    svar = measure_fusion_variances(model, x)
    assert len(bvar["fusions"]) == len(svar["fusions"]) > 0
    found = {}
    for fb, fs in zip(bvar["fusions"], svar["fusions"]):
        for ob, os_ in zip(fb["operands"], fs["operands"]):
            if os_.get("site") in sites:
                found[os_["site"]] = (ob, os_)
    assert sorted(found) == sorted(sites)
    for site, (ob, os_) in found.items():
        v = next(var for name, (mean, var) in stats.items() if name.endswith(site))
        assert os_["var"] == pytest.approx(v / (v + 1e-5), rel=1e-4)  # standardised, exactly as calibrated
        assert os_["var_without_se"] == pytest.approx(ob["var"], rel=1e-4)  # = the plain head's branch
        assert ob["var"] == pytest.approx(v, rel=1e-4)  # what calibration measured is what the plain head fuses
    # the measurement leaves the model untouched (it runs on a copy)
    before = copy.deepcopy(model.state_dict())
    measure_fusion_variances(model, x)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
