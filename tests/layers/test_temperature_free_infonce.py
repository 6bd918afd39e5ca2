"""Temperature-free InfoNCE (METHODS.md §7): logit = 2 artanh(s), clamped, self-pairs masked first."""
import math

import pytest
import torch
import torch.nn.functional as F

from kim_plugins.layers.temperature_free_infonce import (DEFAULT_EPS, TemperatureFreeInfoNCE, artanh_logits,
                                                          contrastive_logits, info_nce_loss,
                                                          temperature_free_info_nce_loss)


def _views(n=6, d=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=g, dtype=dtype)
    return z1, z1 + 0.5 * torch.randn(n, d, generator=g, dtype=dtype)


def _reference_loss(z1, z2, logit):
    """NT-Xent by hand: anchors [z1; z2], positive = partner, negatives = the other 2N - 2."""
    z = torch.cat([F.normalize(z1, dim=1), F.normalize(z2, dim=1)])
    n2 = z.shape[0]
    total = 0.0
    for i in range(n2):
        j = (i + n2 // 2) % n2
        others = [logit(float(z[i] @ z[k])) for k in range(n2) if k != i]
        total += -logit(float(z[i] @ z[j])) + math.log(sum(math.exp(v) for v in others))
    return total / n2


def test_logits_are_two_artanh_of_the_cosine_similarity():
    z1, z2 = _views()
    logits = contrastive_logits(z1, z2, artanh_logits)
    z = torch.cat([F.normalize(z1, dim=1), F.normalize(z2, dim=1)])
    s = z @ z.t()
    off = ~torch.eye(12, dtype=torch.bool)
    assert torch.equal(artanh_logits(s[off]), 2 * torch.atanh(s[off]))   # |s| < 1 - eps: no clamp, bit for bit
    assert torch.allclose(logits[off], torch.log((1 + s[off]) / (1 - s[off])), rtol=0, atol=1e-12)
    assert torch.equal(artanh_logits(torch.tensor([1.0, -1.0], dtype=torch.float64)),
                       2 * torch.atanh(torch.tensor([1 - DEFAULT_EPS, -1 + DEFAULT_EPS], dtype=torch.float64)))
    assert torch.isneginf(logits.diagonal()).all()


def test_loss_equals_hand_written_nt_xent_and_cross_entropy_on_the_same_logits():
    z1, z2 = _views()
    loss = temperature_free_info_nce_loss(z1, z2)
    ref = _reference_loss(z1, z2, lambda s: math.log((1 + s) / (1 - s)))
    assert abs(loss.item() - ref) < 1e-10
    logits = contrastive_logits(z1, z2, artanh_logits)
    target = torch.cat([torch.arange(6) + 6, torch.arange(6)])
    assert torch.equal(loss, F.cross_entropy(logits, target))


def test_temperature_mode_is_plain_infonce():
    z1, z2 = _views(seed=1)
    for tau in (0.07, 0.5):
        ref = _reference_loss(z1, z2, lambda s: s / tau)
        assert abs(info_nce_loss(z1, z2, temperature=tau).item() - ref) < 1e-9


def test_known_value_for_two_orthogonal_pairs():
    # N = 2, views identical and orthogonal: positive logit L = 2 artanh(1 - eps), negatives 0
    z = torch.eye(2, dtype=torch.float64)
    big = math.log((2 - DEFAULT_EPS) / DEFAULT_EPS)
    expected = math.log(1 + 2 * math.exp(-big))
    assert abs(temperature_free_info_nce_loss(z, z.clone()).item() - expected) < 1e-12


@pytest.mark.parametrize("case", ["positives_equal", "positives_opposite", "duplicate_negatives"])
def test_gradients_finite_at_similarity_plus_minus_one(case):
    z1 = torch.randn(4, 8, dtype=torch.float32)
    if case == "positives_equal":
        z2 = z1.clone()
    elif case == "positives_opposite":
        z2 = -z1.clone()
    else:
        z1[1] = z1[0]
        z2 = z1.clone() * 2.0
    z1.requires_grad_(True)
    z2.requires_grad_(True)
    loss = temperature_free_info_nce_loss(z1, z2)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(z1.grad).all() and torch.isfinite(z2.grad).all()


def test_masking_after_artanh_alone_would_give_nan_gradients():
    # the reason self-pairs are replaced before artanh: where/masked_fill after it leaks 0 * inf
    z = torch.eye(3, 4).requires_grad_(True)  # unit rows: s_ii is exactly 1
    s = z @ z.t()
    eye = torch.eye(3, dtype=torch.bool)
    naive = torch.atanh(s).masked_fill(eye, float("-inf"))
    F.cross_entropy(naive, torch.tensor([1, 2, 0])).backward()
    assert not torch.isfinite(z.grad).all()


def test_batch_of_two_works_and_batch_of_one_is_a_clear_error():
    z1, z2 = _views(n=2)
    assert torch.isfinite(temperature_free_info_nce_loss(z1, z2))
    with pytest.raises(ValueError, match="at least 2 pairs"):
        temperature_free_info_nce_loss(z1[:1], z2[:1])
    with pytest.raises(ValueError, match="same shape"):
        temperature_free_info_nce_loss(z1, z2[:, :3])
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        temperature_free_info_nce_loss(z1[None], z2[None])
    with pytest.raises(ValueError, match="eps"):
        TemperatureFreeInfoNCE(eps=0.0)
    with pytest.raises(ValueError, match="temperature"):
        TemperatureFreeInfoNCE(temperature=-1.0)


def test_cross_view_form_is_n_by_n_cross_entropy():
    z1, z2 = _views()
    loss = info_nce_loss(z1, z2, symmetric=False)
    s = F.normalize(z1, dim=1) @ F.normalize(z2, dim=1).t()
    assert torch.allclose(loss, F.cross_entropy(2 * torch.atanh(s), torch.arange(6)), atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_and_autocast_stay_finite_and_close(dtype):
    z1, z2 = _views(n=16, d=32, dtype=torch.float32)
    ref = temperature_free_info_nce_loss(z1, z2)
    a, b = z1.to(dtype).requires_grad_(True), z2.to(dtype).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = TemperatureFreeInfoNCE()(a, b)
    loss.backward()
    assert loss.dtype == torch.float32
    assert torch.isfinite(a.grad.float()).all()
    assert abs(loss.item() - ref.item()) < 0.02 * ref.item()
