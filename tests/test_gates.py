"""HardConcreteGate against its closed forms (Louizos et al. 2018; CoFiPruning constants γ=−0.1, ζ=1.1, β=2/3)."""

import math

import pytest
import torch

from efficientvlm.training.method.gates import HardConcreteGate


def _keep_probability(log_alpha: float) -> float:
    """P(z > 0) = 1 − σ(β·log(−γ/ζ) − log α), by hand."""
    x = 2 / 3 * math.log(0.1 / 1.1) - log_alpha
    return 1 - 1 / (1 + math.exp(-x))


def _gate(values, **kwargs) -> HardConcreteGate:
    values = torch.tensor(values)
    gate = HardConcreteGate(tuple(values.shape), init_std=0.0, **kwargs)
    with torch.no_grad():
        gate.log_alpha.copy_(values)
    return gate


def test_init_values_and_errors():
    assert torch.equal(HardConcreteGate((2, 4), init_mean=10.0, init_std=0.0).log_alpha, torch.full((2, 4), 10.0))
    assert torch.equal(HardConcreteGate(7, init_mean=None, drop_rate=0.5, init_std=0.0).log_alpha, torch.zeros(7))
    p = 0.2
    gate = HardConcreteGate(3, drop_rate=p, init_std=0.0)
    assert torch.allclose(gate.log_alpha, torch.full((3,), math.log(1 - p) - math.log(p)))
    torch.manual_seed(0)
    noisy = HardConcreteGate((100, 100)).log_alpha.detach()  # default: mean 10, std 0.01 (CoFi)
    assert float(noisy.mean()) == pytest.approx(10.0, abs=1e-3) and float(noisy.std()) == pytest.approx(0.01, rel=0.05)
    with pytest.raises(ValueError, match="drop_rate"):
        HardConcreteGate(3, drop_rate=1.0)
    with pytest.raises(ValueError, match="init_mean or drop_rate"):
        HardConcreteGate(3, init_mean=None)


def test_keep_probability_closed_form_and_expected_l0():
    values = [-3.0, 0.0, 2.0]
    gate = _gate(values)
    expected = [_keep_probability(v) for v in values]
    assert gate.keep_probability().tolist() == pytest.approx(expected, rel=1e-5)
    assert float(gate.expected_l0().detach()) == pytest.approx(sum(expected), rel=1e-5)


def test_keep_probability_matches_monte_carlo():
    values = [-3.0, -1.0, 0.0, 1.0, 3.0]
    gate = _gate([values] * 4000)  # 4000 independent copies of each gate per sample() call
    generator = torch.Generator().manual_seed(0)
    samples = torch.cat([gate.sample(generator) for _ in range(5)])  # (20000, 5)
    empirical = (samples > 0).float().mean(0)
    # 20k Bernoulli draws per gate: std ≤ 0.0036, so 0.015 is > 4 std
    closed = torch.tensor([_keep_probability(v) for v in values])
    assert torch.allclose(empirical, closed, atol=0.015)


def test_sample_range_shape_exact_zeros_and_ones_and_seeding():
    gate = _gate([[0.0] * 50, [1.0] * 50])
    z = gate.sample(torch.Generator().manual_seed(0)).detach()
    assert z.shape == (2, 50) and float(z.min()) >= 0.0 and float(z.max()) <= 1.0
    assert (z == 0).any() and (z == 1).any() and ((z > 0) & (z < 1)).any()  # stretched and clipped
    again = gate.sample(torch.Generator().manual_seed(0))
    assert torch.equal(z, again)
    assert not torch.equal(z, gate.sample(torch.Generator().manual_seed(1)))


def test_gradient_flows_to_log_alpha_through_sample():
    gate = _gate([0.0, 0.5, -0.5, 0.2])
    z = torch.stack([gate.sample(torch.Generator().manual_seed(i)) for i in range(8)])
    z.sum().backward()
    assert gate.log_alpha.grad is not None and (gate.log_alpha.grad != 0).any()


def test_deterministic_keeps_round_expected_per_row_and_only_0_1():
    torch.manual_seed(0)
    gate = HardConcreteGate((3, 7), drop_rate=0.5)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.randn(3, 7) * 3)
    mask = gate.deterministic()
    assert mask.shape == (3, 7) and set(mask.unique().tolist()) <= {0.0, 1.0}
    for row in range(3):
        probs = [_keep_probability(v) for v in gate.log_alpha[row].tolist()]
        kept = 7 - round(7 - sum(probs))
        assert int(mask[row].sum()) == kept
        # the kept gates are those with the highest log α (= highest σ(log α / β · 0.8))
        top = set(gate.log_alpha[row].argsort(descending=True)[:kept].tolist())
        assert set(mask[row].nonzero().flatten().tolist()) == top


def test_deterministic_hand_example_dim_and_no_grad():
    gate = _gate([[9.0, 9.0, 9.0, 9.0], [-9.0, -9.0, 4.0, -9.0]])
    # row 0: Σ P ≈ 4 → keep all; row 1: Σ P ≈ 1 → keep only gate 2
    assert gate.deterministic().tolist() == [[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]]
    # P(log α = −1) ≈ 0.645: a row of 3 keeps 2 (Σ ≈ 1.94); dim=0 budgets columns of 2, each keeps 1 (Σ ≈ 1.29)
    tied = _gate([[-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])
    assert tied.deterministic().tolist() == [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]]
    assert tied.deterministic(dim=0).tolist() == [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]
    assert not gate.deterministic().requires_grad
    one_d = _gate([5.0, -5.0, 0.3, 4.0, -4.0, 0.1, 6.0])
    expected_kept = 7 - round(7 - sum(_keep_probability(v) for v in [5.0, -5.0, 0.3, 4.0, -4.0, 0.1, 6.0]))
    assert expected_kept == 5 and one_d.deterministic().tolist() == [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0]  # Σ P ≈ 4.82
    assert _gate(3.0).deterministic().item() == 1.0 and _gate(-5.0).deterministic().item() == 0.0  # 0-d gate


def test_deterministic_ties_are_broken_by_index():
    gate = _gate([-1.0, -1.0, -1.0])  # P ≈ 0.645 each: Σ ≈ 1.94 → zero round(1.06) = 1, the highest index
    assert gate.deterministic().tolist() == [1.0, 1.0, 0.0]


def test_clamp_bounds():
    gate = _gate([-20.0, 0.0, 20.0])
    gate.clamp_()
    assert gate.log_alpha.tolist() == pytest.approx([math.log(0.01), 0.0, math.log(100.0)], rel=1e-6)
    assert gate.log_alpha.requires_grad


def test_forward_samples_in_training_and_is_deterministic_in_eval():
    gate = _gate([0.0] * 20)
    gate.train()
    z = gate(torch.Generator().manual_seed(0)).detach()
    assert ((z > 0) & (z < 1)).any()
    gate.eval()
    assert torch.equal(gate(), gate.deterministic())
