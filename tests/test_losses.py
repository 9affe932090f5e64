"""training.losses against numbers written out by hand (math.exp/log), not by the functions under test."""

import math

import pytest
import torch

from efficientvlm.training.method import losses as L


def _ce(logits: list[float], target: int) -> float:
    """−log softmax(logits)[target], by hand."""
    return -logits[target] + math.log(sum(math.exp(x) for x in logits))


def _softmax(logits: list[float], temperature: float = 1.0) -> list[float]:
    exps = [math.exp(x / temperature) for x in logits]
    return [e / sum(exps) for e in exps]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


# ---------------------------------------------------------------------------------------------------------- VLP
def test_clamp_temperature():
    assert float(L.clamp_temperature(torch.tensor(0.07))) == pytest.approx(0.07)
    assert float(L.clamp_temperature(torch.tensor(1e-5))) == pytest.approx(0.001)
    assert float(L.clamp_temperature(torch.tensor(3.0))) == pytest.approx(0.5)
    assert float(L.clamp_temperature(torch.tensor(3.0), min=0.01, max=1.0)) == pytest.approx(1.0)


def test_itc_loss_hand_computed():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    # sim / τ with τ = 0.5: [[2, 1.2], [0, 1.6]]; rows = image→text, columns = text→image
    i2t = (_ce([2.0, 1.2], 0) + _ce([0.0, 1.6], 1)) / 2
    t2i = (_ce([2.0, 0.0], 0) + _ce([1.2, 1.6], 1)) / 2
    assert float(L.itc_loss(image, text, torch.tensor(0.5))) == pytest.approx((i2t + t2i) / 2, rel=1e-6)
    # explicit labels: image 0 ↔ text 1, image 1 ↔ text 0
    i2t = (_ce([2.0, 1.2], 1) + _ce([0.0, 1.6], 0)) / 2
    t2i = (_ce([2.0, 0.0], 1) + _ce([1.2, 1.6], 0)) / 2
    swapped = L.itc_loss(image, text, 0.5, labels=torch.tensor([1, 0]))
    assert float(swapped) == pytest.approx((i2t + t2i) / 2, rel=1e-6)


def test_itc_loss_gradient_reaches_temperature():
    temp = torch.tensor(0.1, requires_grad=True)
    feats = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    L.itc_loss(feats, feats, L.clamp_temperature(temp)).backward()
    assert temp.grad is not None and torch.isfinite(temp.grad)


def test_itm_loss_hand_computed():
    logits = torch.tensor([[0.0, 1.0], [2.0, 0.0], [0.5, 0.5]])
    labels = torch.tensor([1, 1, 0])
    expected = (_ce([0.0, 1.0], 1) + _ce([2.0, 0.0], 1) + math.log(2)) / 3
    assert float(L.itm_loss(logits, labels)) == pytest.approx(expected, rel=1e-6)


def test_mlm_loss_hand_computed_both_layouts():
    logits = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]])  # (1, 3, 3)
    labels = torch.tensor([[-100, 0, 2]])
    expected = (_ce([1.0, 0.0, 0.0], 0) + _ce([0.0, 2.0, 0.0], 2)) / 2
    assert float(L.mlm_loss(logits, labels)) == pytest.approx(expected, rel=1e-6)
    masked = labels != -100
    assert float(L.mlm_loss(logits[masked], labels[masked])) == pytest.approx(expected, rel=1e-6)  # (M, V)


def test_mlm_loss_without_masks_is_zero_not_nan():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    loss = L.mlm_loss(logits, torch.full((2, 3), -100))
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_negative_sampling_never_picks_positive_and_is_seeded():
    sim = torch.randn(6, 6)
    a = L.sample_itm_negatives(sim, torch.Generator().manual_seed(0))
    b = L.sample_itm_negatives(sim, torch.Generator().manual_seed(0))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    generator = torch.Generator().manual_seed(1)
    for _ in range(50):
        # a huge positive logit makes the softmax mass of the negatives underflow: fallback, still no positive
        sim = torch.randn(6, 6) * 20 + torch.eye(6) * 1e4
        neg_text, neg_image = L.sample_itm_negatives(sim, generator)
        assert (neg_text != torch.arange(6)).all() and (neg_image != torch.arange(6)).all()
        assert neg_text.shape == neg_image.shape == (6,) and neg_text.dtype == torch.long


def test_negative_sampling_follows_the_softmax():
    # image 0: texts 1 and 2 have logits 0 and log 3 → P(text 2) = 3/4 once the positive is excluded
    sim = torch.zeros(3, 3)
    sim[0, 0] = 5.0
    sim[0, 2] = math.log(3)
    sim[1, 0] = math.log(4)  # text 0: images 1 and 2 have logits log 4 and 0 → P(image 1) = 4/5
    generator = torch.Generator().manual_seed(0)
    draws = [L.sample_itm_negatives(sim, generator) for _ in range(1000)]
    freq_text2 = sum(int(t[0] == 2) for t, _ in draws) / 1000
    freq_image1 = sum(int(i[0] == 1) for _, i in draws) / 1000
    assert freq_text2 == pytest.approx(0.75, abs=0.06)  # binomial std ≈ 0.014
    assert freq_image1 == pytest.approx(0.8, abs=0.06)


def test_negative_sampling_positive_mask_and_errors():
    # texts 0 and 1 are both captions of image 0 (and of nothing else)
    positives = torch.eye(4, dtype=torch.bool)
    positives[0, 1] = positives[1, 0] = True
    generator = torch.Generator().manual_seed(0)
    for _ in range(30):
        neg_text, neg_image = L.sample_itm_negatives(torch.randn(4, 4), generator, positives)
        assert int(neg_text[0]) not in (0, 1) and int(neg_image[1]) not in (0, 1)
    with pytest.raises(ValueError, match="row 0 of positive_mask"):
        L.sample_itm_negatives(torch.randn(2, 2), positive_mask=torch.tensor([[True, True], [False, True]]))
    with pytest.raises(ValueError, match="at least 2"):
        L.sample_itm_negatives(torch.randn(1, 1))
    with pytest.raises(ValueError, match="square"):
        L.sample_itm_negatives(torch.randn(2, 3))


def test_build_itm_pairs_layout():
    image_idx, text_idx, labels = L.build_itm_pairs(torch.tensor([2, 0, 1]), torch.tensor([1, 2, 0]), 3)
    assert image_idx.tolist() == [0, 1, 2, 0, 1, 2, 1, 2, 0]  # positives, (i, neg_text[i]), (neg_image[j], j)
    assert text_idx.tolist() == [0, 1, 2, 2, 0, 1, 0, 1, 2]
    assert labels.tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0] and labels.dtype == torch.long
    with pytest.raises(ValueError, match="shape"):
        L.build_itm_pairs(torch.tensor([1, 0]), torch.tensor([1, 0]), 3)


# ------------------------------------------------------------------------------------------------- layer maps
def test_default_layer_maps():
    assert L.default_layer_map(3, 6) == [(0, 1), (1, 3), (2, 5)]
    assert L.default_layer_map(3, 6, include_embeddings=True) == [(0, 0), (1, 2), (2, 4), (3, 6)]
    assert L.default_layer_map(6, 12) == [(i, 2 * i + 1) for i in range(6)]
    assert L.default_layer_map(2, 2) == [(0, 0), (1, 1)]
    assert L.default_layer_map(0, 6) == [] and L.default_layer_map(0, 6, include_embeddings=True) == [(0, 0)]
    with pytest.raises(ValueError, match="whole factor"):
        L.default_layer_map(4, 6)
    with pytest.raises(ValueError, match="whole factor"):
        L.default_layer_map(6, 3)


def test_out_of_range_pairs_are_named():
    with pytest.raises(ValueError, match=r"\(1, 7\) out of range.*0\.\.1.*0\.\.5"):
        L.validate_layer_map([(0, 0), (1, 7)], 2, 6)
    attn = [torch.zeros(1, 1, 2, 2)]
    with pytest.raises(ValueError, match=r"\(0, 5\) out of range"):
        L.attention_kd_loss(attn, attn, [(0, 5)])
    with pytest.raises(ValueError, match=r"\(3, 0\) out of range"):
        L.hidden_kd_loss(attn, attn, [(3, 0)])


# ----------------------------------------------------------------------------------------------------------- KD
def test_attention_kd_hand_computed():
    student = torch.tensor([[0.5, 0.5], [1.0, 0.0]]).reshape(1, 1, 2, 2)
    teacher = torch.tensor([[1.0, 0.0], [0.5, 0.5]]).reshape(1, 1, 2, 2)
    # every squared difference is 0.25 → MSE 0.25; × Tk = 2 with the official key-length scaling
    assert float(L.attention_kd_loss([student], [teacher], [(0, 0)])) == pytest.approx(0.25)
    assert float(L.attention_kd_loss([student], [teacher], [(0, 0)], key_length_scale=True)) == pytest.approx(0.5)
    assert float(L.attention_kd_loss([teacher], [teacher], [(0, 0)])) == 0.0
    # two pairs are averaged: (0.25 + 0) / 2
    assert float(L.attention_kd_loss([student, teacher], [teacher], [(0, 0), (1, 0)])) == pytest.approx(0.125)
    assert float(L.attention_kd_loss([student], [teacher], [])) == 0.0


def test_attention_kd_excludes_padded_query_rows():
    student = torch.zeros(1, 1, 3, 2)
    teacher = torch.tensor([[0.5, 0.5], [1.0, 0.0], [9.0, 9.0]]).reshape(1, 1, 3, 2)
    # rows 0 and 1 only: squared diffs 0.25, 0.25, 1, 0 → mean 0.375
    loss = L.attention_kd_loss([student], [teacher], [(0, 0)], query_mask=torch.tensor([[1, 1, 0]]))
    assert float(loss) == pytest.approx(0.375)


def test_attention_kd_shape_mismatch_names_the_pair():
    with pytest.raises(ValueError, match=r"layer pair \(0, 1\).*\(1, 2, 3, 3\).*\(1, 4, 3, 3\)"):
        L.attention_kd_loss([torch.zeros(1, 2, 3, 3)], [torch.zeros(1, 4, 3, 3)] * 2, [(0, 1)])


def test_hidden_kd_hand_computed_mask_and_projection():
    h_s = [torch.zeros(1, 2, 3), torch.ones(1, 2, 3)]
    h_t = [torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.full((1, 2, 3), 3.0)]
    assert float(L.hidden_kd_loss(h_s, h_t, [(0, 0), (1, 2)])) == pytest.approx((0 + (3 - 1) ** 2) / 2)
    assert float(L.hidden_kd_loss(h_t, h_t, [(0, 0), (1, 1), (2, 2)])) == 0.0
    # token 1 is padding: only token 0 counts; (1 − 3)² = 4 vs (1 − 0)² = 1
    h_t2 = [torch.tensor([[[3.0, 3.0, 3.0], [0.0, 0.0, 0.0]]])]
    assert float(L.hidden_kd_loss(h_s[1:], h_t2, [(0, 0)], mask=torch.tensor([[1, 0]]))) == pytest.approx(4.0)
    assert float(L.hidden_kd_loss(h_s[1:], h_t2, [(0, 0)])) == pytest.approx((4 + 1) / 2)
    # a projection bridges widths 3 → 4: a zero projection against teacher ones gives MSE 1
    proj = torch.nn.Linear(3, 4)
    torch.nn.init.zeros_(proj.weight), torch.nn.init.zeros_(proj.bias)
    loss = L.hidden_kd_loss(h_s, [torch.ones(1, 2, 4)], [(1, 0)], projection=proj)
    assert float(loss.detach()) == pytest.approx(1.0)


def test_hidden_kd_width_mismatch_names_both_widths():
    with pytest.raises(ValueError, match=r"student 3 vs teacher 4.*projection"):
        L.hidden_kd_loss([torch.zeros(1, 2, 3)], [torch.zeros(1, 2, 4)], [(0, 0)])


def test_logit_kd_hand_computed_and_t_squared():
    s, t = [0.0, 1.0, 2.0], [2.0, 0.0, 1.0]
    student, teacher = torch.tensor([s]), torch.tensor([t])
    kl = _kl(_softmax(t), _softmax(s))  # KL(teacher ‖ student)
    assert float(L.logit_kd_loss(student, teacher)) == pytest.approx(kl, rel=1e-5)
    # T = 2: T² = 4 times the KL of the softened distributions
    kl2 = _kl(_softmax(t, 2.0), _softmax(s, 2.0))
    assert float(L.logit_kd_loss(student, teacher, 2.0)) == pytest.approx(4 * kl2, rel=1e-5)
    assert float(L.logit_kd_loss(teacher, teacher, 3.0)) == 0.0
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature must be > 0"):
            L.logit_kd_loss(student, teacher, bad)


def test_logit_kd_batchmean_over_flattened_rows():
    s = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])  # (1, 2, 2): two rows
    t = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    row0 = _kl(_softmax([1.0, 0.0]), _softmax([0.0, 1.0]))
    assert float(L.logit_kd_loss(s, t)) == pytest.approx(row0 / 2, rel=1e-5)  # row 1 contributes 0
    empty = torch.zeros(0, 5, requires_grad=True)
    assert float(L.logit_kd_loss(empty, empty.detach()).detach()) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        L.logit_kd_loss(torch.zeros(2, 3), torch.zeros(2, 4))


def test_itc_kd_both_directions_hand_computed():
    s = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    t = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    rows = (_kl(_softmax([0.0, 0.0]), _softmax([1.0, 0.0])) + _kl(_softmax([0.0, 1.0]), _softmax([0.0, 0.0]))) / 2
    cols = (_kl(_softmax([0.0, 0.0]), _softmax([1.0, 0.0])) + _kl(_softmax([0.0, 1.0]), _softmax([0.0, 0.0]))) / 2
    assert float(L.itc_kd_loss(s, t)) == pytest.approx((rows + cols) / 2, rel=1e-5)
    assert float(L.itc_kd_loss(t, t, 2.0)) == 0.0


def test_combine_losses_arithmetic():
    vlp = {"itc": torch.tensor(1.0), "itm": torch.tensor(2.0)}
    kd = {"attn": torch.tensor(3.0), "hidden": torch.tensor(5.0), "logits": torch.tensor(7.0)}
    total, parts = L.combine_losses(vlp, kd, lambda_vlp=0.6, alpha_attn=1.0, beta_hidden=0.5, gamma_logits=2.0)
    assert float(total) == pytest.approx(0.6 * 3 + 0.4 * (3 + 2.5 + 14))
    assert set(parts) == {"itc", "itm", "attn", "hidden", "logits", "total"}
    # missing KD terms count as 0; λ = 1 is VLP only
    total, _ = L.combine_losses(vlp, {"logits": torch.tensor(7.0)}, lambda_vlp=0.5, alpha_attn=1.0, beta_hidden=1.0,
                                gamma_logits=2.0)
    assert float(total) == pytest.approx(0.5 * 3 + 0.5 * 14)
    assert float(L.combine_losses(vlp, {}, lambda_vlp=1.0, alpha_attn=0.0, beta_hidden=0.0,
                                  gamma_logits=0.0)[0]) == pytest.approx(3.0)


def test_combine_losses_validation_names_the_argument():
    vlp, kd = {"itc": torch.tensor(1.0)}, {"attn": torch.tensor(1.0)}
    for args, name in (((1.5, 1, 1, 1), "lambda_vlp"), ((-0.1, 1, 1, 1), "lambda_vlp"),
                       ((0.5, -1, 1, 1), "alpha_attn"), ((0.5, 1, -1, 1), "beta_hidden"),
                       ((0.5, 1, 1, -1), "gamma_logits")):
        with pytest.raises(ValueError, match=name):
            L.combine_losses(vlp, kd, **dict(zip(("lambda_vlp", "alpha_attn", "beta_hidden", "gamma_logits"), args)))
    with pytest.raises(ValueError, match="unknown KD terms"):
        L.combine_losses(vlp, {"itc_kd": torch.tensor(1.0)}, lambda_vlp=0.5, alpha_attn=1, beta_hidden=1,
                         gamma_logits=1)
