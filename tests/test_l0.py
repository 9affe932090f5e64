import math

import pytest
import torch

from modeling_efficientvlm import EfficientVLMForImageTextRetrieval
from tests.conftest import lagrangian_game, tiny_config
from efficientvlm.training import ModalL0Module, materialize
from efficientvlm.training.method.materialize import pruned_config
from efficientvlm.training.method.structure import count_parameters, unit_groups


def _set_log_alpha(l0, value_fn):
    with torch.no_grad():
        for group in l0.groups:
            gate = l0.gate(group)
            gate.log_alpha.copy_(value_fn(group, gate.log_alpha.shape))


def test_gates_follow_config_sizes_and_masks_match_forward_signature():
    config = tiny_config(vision=dict(num_attention_heads=[4, 0]), fusion=dict(num_cross_attention_heads=[2, 4]))
    l0 = ModalL0Module(config)
    masks = l0.sample_masks()
    assert masks.vision.head[1] is None and masks.vision.head[0].shape == (4,)
    assert masks.fusion.cross_head[0].shape == (2,)
    assert masks.text.cross_head is None
    assert masks.fusion.ffn[1].shape == (37,)
    model = EfficientVLMForImageTextRetrieval(config)
    model(pixel_values=torch.randn(2, 3, 32, 32), input_ids=torch.randint(0, 99, (2, 5)), pruning_masks=masks,
          compute_itm=True)


def test_expected_size_matches_keep_probabilities_and_brute_force():
    config = tiny_config()  # vision 32 wide, text 24: cross-attention keys/values read 32
    l0 = ModalL0Module(config)
    g = torch.Generator().manual_seed(0)
    _set_log_alpha(l0, lambda group, shape: torch.randn(shape, generator=g) * 3)
    expected = 0.0
    for group in unit_groups(config):
        p = 1 - torch.sigmoid(2 / 3 * math.log(0.1 / 1.1) - l0.gate(group).log_alpha.detach())
        expected += float(p.sum()) * group.unit_params
    assert float(l0.expected_parameters()["total"].detach()) == pytest.approx(expected, rel=1e-6)
    # near-binary gates: expected size == prunable parameters of the materialized model, counted tensor by tensor
    _set_log_alpha(l0, lambda group, shape: torch.where(torch.rand(shape, generator=g) > 0.5, 20.0, -20.0))
    masks = l0.deterministic_masks()
    model = EfficientVLMForImageTextRetrieval(config).eval()
    pruned = materialize(model, masks)
    fixed = count_parameters(pruned.config)["total"] - count_parameters(pruned.config)["prunable"]
    assert pruned.num_parameters() - fixed == pytest.approx(float(l0.expected_parameters()["total"].detach()), rel=1e-6)
    assert l0.predicted_parameters(config) == pruned.num_parameters()


def test_deterministic_masks_keep_round_expected_count_per_layer():
    l0 = ModalL0Module(tiny_config())
    g = torch.Generator().manual_seed(1)
    _set_log_alpha(l0, lambda group, shape: torch.randn(shape, generator=g) * 2)
    masks = l0.deterministic_masks()
    for group in l0.groups:
        mask = getattr(getattr(masks, group.modality), group.kind)[group.layer]
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        expected_kept = round(float(l0.gate(group).keep_probability().detach().sum()))
        assert int(mask.sum()) == expected_kept


def _ascend(l0, step=0, lr=0.1):
    opt = torch.optim.SGD(l0.lambda_parameters(), lr=lr, maximize=True)
    loss, _ = l0.lagrangian(step)
    loss.backward()
    opt.step()


def test_multipliers_move_the_right_way():
    l0 = ModalL0Module(tiny_config(), target_sparsity=0.5)  # starts dense: ŝ ≈ 0 < t
    _ascend(l0)
    lam = l0.lambdas["global"].detach()
    assert lam[0] < 0 and lam[1] > 0  # signed form λ1(ŝ−t): ascent drives λ1 negative, making sparsity pay
    one_sided = ModalL0Module(tiny_config(), target_sparsity=0.5, one_sided=True)
    _ascend(one_sided)
    lam = one_sided.lambdas["global"].detach()
    assert lam[0] > 0 and lam[1] > 0  # one-sided λ1·max(t−ŝ, 0): up while under target


def test_target_warmup_by_global_step():
    l0 = ModalL0Module(tiny_config(), target_sparsity=0.4, warmup_steps=10)
    assert l0.current_target(0) == 0 and l0.current_target(5) == pytest.approx(0.2) and l0.current_target(50) == 0.4


@pytest.mark.parametrize("targets", [None, {"vision": 0.3, "text": 0.6, "fusion": 0.5}])
def test_lagrangian_game_reaches_targets(targets):
    """Gates (descent) vs multipliers (ascent) on the Lagrangian alone converge to the target(s) within 0.03."""
    torch.manual_seed(0)
    l0 = ModalL0Module(tiny_config(), target_sparsity=0.5, modality_targets=targets)
    lagrangian_game(l0, steps=400, lr=0.1)
    sparsity = l0.expected_sparsity()
    for name, target in (targets or {"total": 0.5}).items():
        assert float(sparsity[name].detach()) == pytest.approx(target, abs=0.03)


def test_pruned_config_matches_materialize():
    config = tiny_config()
    l0 = ModalL0Module(config)
    _set_log_alpha(l0, lambda group, shape: torch.linspace(-5, 5, shape[0]))
    masks = l0.deterministic_masks()
    pruned = materialize(EfficientVLMForImageTextRetrieval(config), masks)
    assert pruned.config.to_dict() == pruned_config(config, masks).to_dict()


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_target_out_of_range_is_refused(bad):
    with pytest.raises(ValueError, match="target_sparsity must lie in \\[0, 1\\)"):
        ModalL0Module(tiny_config(), target_sparsity=bad)


def test_gate_file_round_trip_keeps_the_constraint_set(tmp_path):
    from safetensors.torch import save_file

    config = tiny_config()
    l0 = ModalL0Module(config, target_sparsity=0.3, modality_targets={"vision": 0.2, "fusion": 0.5}, warmup_steps=7)
    _set_log_alpha(l0, lambda group, shape: torch.randn(shape))
    path = str(tmp_path / "gates.safetensors")
    l0.save(path)
    loaded = ModalL0Module.from_file(path, config)
    assert loaded.constraints == ["global", "vision", "fusion"]
    assert loaded.modality_targets == {"vision": 0.2, "fusion": 0.5}
    assert loaded.target_sparsity == 0.3 and loaded.warmup_steps == 7
    for a, b in zip(l0.deterministic_masks().vision.ffn, loaded.deterministic_masks().vision.ffn):
        assert torch.equal(a, b)
    # a file without our metadata (older trainer): the constraints are read off the multiplier keys
    legacy = str(tmp_path / "legacy.safetensors")
    save_file({k: v.detach().contiguous() for k, v in l0.state_dict().items()}, legacy)
    assert ModalL0Module.from_file(legacy, config).constraints == ["global", "vision", "fusion"]
    with pytest.raises(ValueError, match="does not match the model's config"):
        ModalL0Module.from_file(path, tiny_config(vision=dict(num_hidden_layers=3)))
    with pytest.raises(FileNotFoundError, match="no L0 gate file"):
        ModalL0Module.from_file(str(tmp_path / "missing.safetensors"), config)


def _heads_removed_by_lagrangian_game(l0, steps=60):
    lagrangian_game(l0, steps, lr=0.05)
    masks = l0.deterministic_masks()
    heads = [m for enc in (masks.vision, masks.text, masks.fusion) for kind in ("head", "cross_head")
             for m in (getattr(enc, kind) or []) if m is not None]
    return sum(int((m == 0).sum()) for m in heads)


def test_head_init_log_alpha_lets_heads_reach_the_cut_and_round_trips(tmp_path):
    """The paper's init (10 → clamped 4.6) keeps every head through a short Lagrangian game; starting heads where the
    FFN neurons start (0) lets the budget prune heads too. The init is saved with the gates; bad values are named."""
    torch.manual_seed(0)
    config = tiny_config()
    paper = ModalL0Module(config, target_sparsity=0.3, layer_gates=True)
    cofi = ModalL0Module(config, target_sparsity=0.3, layer_gates=True, head_init_log_alpha=0.0)
    for group in cofi.groups:  # heads now start with the neurons (FFN drop rate 0.5 → log α 0)
        assert float(cofi.gate(group).log_alpha.detach().mean()) == pytest.approx(0.0, abs=0.05)
        if group.kind != "ffn":
            assert float(paper.gate(group).log_alpha.detach().mean()) == pytest.approx(10.0, abs=0.05)
        assert float(cofi.layer_gate(group).log_alpha.detach()) == pytest.approx(10.0, abs=0.05)  # sub-layers: paper
    assert _heads_removed_by_lagrangian_game(paper) == 0
    assert _heads_removed_by_lagrangian_game(cofi) > 0
    path = str(tmp_path / "gates.safetensors")
    cofi.save(path)
    assert ModalL0Module.from_file(path, config).head_init_log_alpha == 0.0
    with pytest.raises(ValueError, match="head_init_log_alpha must be a finite number"):
        ModalL0Module(config, head_init_log_alpha=float("nan"))
