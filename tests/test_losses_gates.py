"""Loss values against hand-computed numbers; the hard-concrete gate against its closed forms."""

import math

import pytest
import torch

from training import losses as L
from training.gates import HardConcreteGate


def test_itc_loss_hand_computed():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    tau = 0.5
    # sim/τ = [[2, 1.2], [0, 1.6]]; rows (i2t) and columns (t2i) each a softmax CE on the diagonal
    i2t = [-math.log(math.exp(2) / (math.exp(2) + math.exp(1.2))), -math.log(math.exp(1.6) / (1 + math.exp(1.6)))]
    t2i = [-math.log(math.exp(2) / (math.exp(2) + 1)), -math.log(math.exp(1.6) / (math.exp(1.2) + math.exp(1.6)))]
    expected = (sum(i2t) / 2 + sum(t2i) / 2) / 2
    assert float(L.itc_loss(image, text, tau)) == pytest.approx(expected, rel=1e-6)


def test_itm_and_mlm_losses_hand_computed():
    logits = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    labels = torch.tensor([1, 1])
    expected = (-math.log(math.e / (1 + math.e)) - math.log(1 / (1 + math.e**2))) / 2
    assert float(L.itm_loss(logits, labels)) == pytest.approx(expected, rel=1e-6)
    mlm_logits = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]])
    mlm_labels = torch.tensor([[-100, 0]])
    assert float(L.mlm_loss(mlm_logits, mlm_labels)) == pytest.approx(-math.log(math.e / (math.e + 2)), rel=1e-6)


def test_logit_kd_hand_computed_and_t_squared():
    s = torch.tensor([[0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0]])
    p = [math.e / (1 + math.e), 1 / (1 + math.e)]  # teacher softmax
    q = [1 / (1 + math.e), math.e / (1 + math.e)]  # student softmax
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    assert float(L.logit_kd_loss(s, t, 1.0)) == pytest.approx(kl, rel=1e-6)
    # T = 2: KL of the softened distributions, times T² = 4
    p2 = [math.exp(0.5) / (1 + math.exp(0.5)), 1 / (1 + math.exp(0.5))]
    q2 = p2[::-1]
    kl2 = sum(pi * math.log(pi / qi) for pi, qi in zip(p2, q2))
    assert float(L.logit_kd_loss(s, t, 2.0)) == pytest.approx(4 * kl2, rel=1e-6)
    assert float(L.logit_kd_loss(t, t, 3.0)) == 0.0
    with pytest.raises(ValueError, match="temperature must be > 0"):
        L.logit_kd_loss(s, t, -1.0)


def test_attention_and_hidden_kd_hand_computed():
    a = torch.zeros(1, 1, 2, 2)
    b = torch.full((1, 1, 2, 2), 0.5)
    assert float(L.attention_kd_loss([a], [b], [(0, 0)])) == pytest.approx(0.25)
    assert float(L.attention_kd_loss([a], [b], [(0, 0)], key_length_scale=True)) == pytest.approx(0.5)
    # a padded query row is excluded
    b2 = b.clone()
    b2[0, 0, 1] = 10.0
    assert float(L.attention_kd_loss([a], [b2], [(0, 0)], query_mask=torch.tensor([[1, 0]]))) == pytest.approx(0.25)
    h_s = [torch.zeros(1, 2, 3), torch.ones(1, 2, 3)]
    h_t = [torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.full((1, 2, 3), 3.0)]
    assert float(L.hidden_kd_loss(h_s, h_t, [(0, 0), (1, 2)])) == pytest.approx((0 + 4) / 2)
    with pytest.raises(ValueError, match="pass a projection"):
        L.hidden_kd_loss([torch.zeros(1, 2, 3)], [torch.zeros(1, 2, 4)], [(0, 0)])
    with pytest.raises(ValueError, match="out of range"):
        L.attention_kd_loss([a], [b], [(0, 5)])
    assert float(L.attention_kd_loss([b], [b], [(0, 0)])) == 0.0


def test_itc_kd_both_directions():
    s = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    t = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    expected = (L.logit_kd_loss(s, t) + L.logit_kd_loss(s.t(), t.t())) / 2
    assert float(L.itc_kd_loss(s, t)) == pytest.approx(float(expected))


def test_negative_sampling_excludes_positives_and_is_seeded():
    sim = torch.randn(6, 6)
    a = L.sample_itm_negatives(sim, torch.Generator().manual_seed(0))
    b = L.sample_itm_negatives(sim, torch.Generator().manual_seed(0))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    for _ in range(20):
        neg_text, neg_image = L.sample_itm_negatives(torch.randn(6, 6) * 20)
        assert (neg_text != torch.arange(6)).all() and (neg_image != torch.arange(6)).all()
    # the distribution follows the similarity: a dominant negative is drawn almost always
    sim = torch.zeros(3, 3)
    sim[0, 2] = 20.0
    draws = [int(L.sample_itm_negatives(sim)[0][0]) for _ in range(20)]
    assert draws.count(2) >= 19


def test_itm_pair_layout():
    image_idx, text_idx, labels = L.build_itm_pairs(torch.tensor([1, 0]), torch.tensor([1, 0]), 2)
    assert image_idx.tolist() == [0, 1, 0, 1, 1, 0]
    assert text_idx.tolist() == [0, 1, 1, 0, 0, 1]
    assert labels.tolist() == [1, 1, 0, 0, 0, 0]


def test_default_layer_maps():
    assert L.default_layer_map(3, 6) == [(0, 1), (1, 3), (2, 5)]
    assert L.default_layer_map(3, 6, include_embeddings=True) == [(0, 0), (1, 2), (2, 4), (3, 6)]
    with pytest.raises(ValueError, match="whole factor"):
        L.default_layer_map(4, 6)


def test_combine_losses_arithmetic_and_validation():
    vlp = {"itc": torch.tensor(1.0), "itm": torch.tensor(2.0)}
    kd = {"attn": torch.tensor(3.0), "hidden": torch.tensor(5.0), "logits": torch.tensor(7.0)}
    total, parts = L.combine_losses(vlp, kd, 0.6, 1.0, 0.5, 2.0)
    assert float(total) == pytest.approx(0.6 * 3 + 0.4 * (3 + 2.5 + 14))
    assert set(parts) == {"itc", "itm", "attn", "hidden", "logits", "total"}
    with pytest.raises(ValueError, match="lambda_vlp"):
        L.combine_losses(vlp, kd, 1.5, 1, 1, 1)
    with pytest.raises(ValueError, match="beta_hidden"):
        L.combine_losses(vlp, kd, 0.5, 1, -1, 1)


def test_gate_keep_probability_matches_monte_carlo():
    torch.manual_seed(0)
    gate = HardConcreteGate((5,), init_mean=None, drop_rate=0.5, init_std=0.0)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0]))
    g = torch.Generator().manual_seed(0)
    samples = torch.stack([gate.sample(g) for _ in range(20000)])
    empirical = (samples > 0).float().mean(0)
    closed = 1 - torch.sigmoid(2 / 3 * math.log(0.1 / 1.1) - gate.log_alpha.detach())
    assert torch.allclose(empirical, closed, atol=0.015)  # 20k samples: std ≤ 0.0036
    assert samples.min() == 0.0 and samples.max() == 1.0 and ((samples > 0) & (samples < 1)).any()


def test_gate_init_clamp_gradient_and_deterministic():
    heads = HardConcreteGate((2, 4), init_mean=10.0, init_std=0.0)
    assert torch.equal(heads.log_alpha, torch.full((2, 4), 10.0))
    ffn = HardConcreteGate(7, drop_rate=0.5, init_std=0.0)
    assert torch.equal(ffn.log_alpha, torch.zeros(7))
    heads.clamp_()
    assert float(heads.log_alpha.max()) == pytest.approx(math.log(100))
    heads.sample().sum().backward()
    assert heads.log_alpha.grad is not None
    with torch.no_grad():
        ffn.log_alpha.copy_(torch.tensor([5.0, -5.0, 0.3, 4.0, -4.0, 0.1, 6.0]))
    mask = ffn.deterministic()
    assert set(mask.tolist()) <= {0.0, 1.0}
    assert int(mask.sum()) == round(float(ffn.keep_probability().sum()))
    assert mask[0] == 1 and mask[6] == 1 and mask[1] == 0  # the highest log α are kept
    rows = HardConcreteGate((2, 4), init_mean=None, drop_rate=0.5)
    with torch.no_grad():
        rows.log_alpha.copy_(torch.tensor([[9.0, 9.0, 9.0, 9.0], [-9.0, -9.0, 9.0, -9.0]]))
    assert rows.deterministic().sum(-1).tolist() == [4.0, 1.0]
