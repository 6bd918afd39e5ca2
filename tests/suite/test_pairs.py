"""The registry of main-job pairs: one object per pair, run order, --only groups and plots derived from it."""
import dataclasses

import pytest

from kim_plugins.suite import pairs as registry
from kim_plugins.suite.pairs import Cost, Pair, Variant
from kim_plugins.suite.settings import preset


def test_every_pair_is_one_registered_object_with_its_baseline_first():
    ps = registry.all_pairs()
    assert [p.name for p in ps] == ["se-uper", "se-aspp", "rates-small", "rates-large", "vit", "swin", "sap",
                                    "dropout", "gamma", "infonce", "depth", "deadpixel", "vitaug"]
    assert list(registry.pair_groups()) == ["se", "rates", "vit", "swin", "sap", "dropout", "gamma", "infonce",
                                            "depth", "deadpixel", "vitaug"]
    quick = preset("quick")
    for p in ps:
        assert isinstance(p, Pair) and p.variants[0].baseline and not any(v.baseline for v in p.variants[1:])
        assert p.iters(quick) == getattr(quick, p.iters_field) > 0
    from kim_plugins.suite.report import PLOTS

    assert PLOTS == {"metric_bars.png": None, "se_variance.png": "se", "erf_rates.png": "rates",
                     "robustness.png": "vit", "sap_consistency.png": "sap"}


def test_a_new_pair_is_added_by_registering_one_object():
    @dataclasses.dataclass
    class Toy(Pair):
        def estimate_cost(self, settings, cost, seen):
            return Cost(1.0, 2.0)

    toy = Toy(name="toy", group="toys", title="toy", metric="top-1", iters_field="cls_iters",
              variants=(Variant("a", True), Variant("b")))
    registry.register(toy)
    try:
        assert registry.all_pairs()[-1] is toy and registry.pair_groups()["toys"] == ("toy",)
        from kim_plugins.suite.core import _selected_pairs, estimate_pair_costs

        assert _selected_pairs(["toys"]) == [toy]
        assert estimate_pair_costs(["toy"], None, {"toy": {}}) == [Cost(1.0, 2.0)]
        with pytest.raises(ValueError, match="registered twice"):
            registry.register(dataclasses.replace(toy))
    finally:
        registry._REGISTRY.pop("toy")
    with pytest.raises(ValueError, match="must be the baseline"):
        Toy(name="bad", variants=(Variant("a"), Variant("b", True)))


def test_the_se_heads_and_the_variance_probe_share_one_fusion_tracer():
    pytest.importorskip("mmseg")
    from kim_plugins.layers.fusion_trace import FusionTracingMode
    from kim_plugins.mmseg.se_heads import _FusionSiteMode
    from kim_plugins.suite.seg import FusionVarianceRecorder

    assert issubclass(_FusionSiteMode, FusionTracingMode) and issubclass(FusionVarianceRecorder, FusionTracingMode)
    import kim_plugins.layers.atrous as atrous
    import kim_plugins.suite.seg as seg

    assert seg.REFERENCE_RATES is atrous.REFERENCE_RATES
