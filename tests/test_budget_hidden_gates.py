"""Hidden-dimension gates in the size / cost model and snapping the frozen structure to its budget (issue #19)."""

import pytest
import torch
from tests.conftest import ragged_config, tiny_config

from efficientvlm.training.method.cost import path_to_json, prunable_flops, retrieval_path
from efficientvlm.training.method.l0 import ModalL0Module
from efficientvlm.training.method.materialize import pruned_config
from efficientvlm.training.method.structure import prunable_parameters
from efficientvlm.training.tasks import get_task


def _randomise(l0: ModalL0Module, seed: int, spread: float = 3.0, mean: float = 0.0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in l0.gates.values():
            gate.log_alpha.copy_(mean + torch.randn(gate.log_alpha.shape, generator=g) * spread)


def _flops_l0(config, **kwargs) -> tuple[ModalL0Module, dict]:
    path = retrieval_path(config, images=10, texts=50, text_length=12, k=8)
    return ModalL0Module(config, budget="flops", cost_path=path_to_json(path), **kwargs), path


@pytest.mark.parametrize("config_fn", [tiny_config, ragged_config])
def test_hidden_gates_achieved_sizes_equal_the_materialized_config(config_fn):
    """At the deterministic masks the size model (unit weights linear in the kept widths) gives exactly the prunable
    parameters and the path FLOPs of the config materialize would build (hidden widths shrunk)."""
    config = config_fn()
    l0, path = _flops_l0(config, target_sparsity=0.5, hidden_gates=True, layer_gates=True)
    _randomise(l0, seed=1)
    masks = l0.deterministic_masks()
    assert masks.vision.hidden.shape == (config.vision_config.hidden_size,)
    assert masks.text.hidden.shape == (config.text_config.hidden_size,)
    assert masks.fusion.hidden is None  # the fusion encoder reads the text stream's mask
    assert 0 < int(masks.vision.hidden.sum()) < config.vision_config.hidden_size
    small = pruned_config(config, masks)
    assert small.vision_config.hidden_size == int(masks.vision.hidden.sum())
    assert small.fusion_encoder_config.hidden_size == small.text_config.hidden_size == int(masks.text.hidden.sum())
    achieved = l0.achieved_sparsity()
    kept_params = prunable_parameters(small)["total"] / prunable_parameters(config)["total"]
    kept_flops = prunable_flops(small, path)["total"] / prunable_flops(config, path)["total"]
    assert float(achieved["params"]["total"]) == pytest.approx(1 - kept_params, abs=1e-6)
    assert float(achieved["budget"]["total"]) == pytest.approx(1 - kept_flops, abs=1e-6)


def test_hidden_gates_expected_size_is_linear_in_expected_widths():
    """A unit's expected cost is c0 + c_d·E[d] + c_kv·E[kv]: at full widths the full path FLOPs, with the vision stream
    gone the vision encoder costs only its attention scores, and the Lagrangian's gradient reaches the channel gates."""
    config = tiny_config()
    l0, path = _flops_l0(config, hidden_gates=True)
    with torch.no_grad():
        for gate in l0.gates.values():
            gate.log_alpha.fill_(50.0)  # P(z > 0) = 1 for every unit and channel
    full = prunable_flops(config, path)["total"]
    assert float(l0.expected_cost()["total"].detach()) == pytest.approx(full, rel=1e-5)
    with torch.no_grad():
        l0.gates["vision_hidden"].log_alpha.fill_(-50.0)  # the whole vision stream gone: P(kept) = 0
    cost = l0.expected_cost()
    # left: what no width scales, the attention scores (QKᵀ and PV) of the vision heads
    groups = [g for g in l0.groups if g.modality == "vision"]
    scores = sum(g.size * 2 * 10 * 2 * 17 * 17 * g.head_dim for g in groups if g.kind == "head")  # 10 images, 17 tokens
    assert float(cost["vision"].detach()) == pytest.approx(scores, rel=1e-5)
    assert float(cost["text"].detach()) == pytest.approx(prunable_flops(config, path)["text"], rel=1e-5)
    # gradients reach the hidden gates through the Lagrangian
    _, logs = l0.lagrangian(step=0)
    l0.lambdas["global"].data.fill_(1.0)
    loss, _ = l0.lagrangian(step=0)
    loss.backward()
    assert l0.gates["text_hidden"].log_alpha.grad is not None and l0.gates["text_hidden"].log_alpha.grad.abs().sum() > 0
    assert 0.0 <= logs["expected_hidden_vision"] < 0.01 and logs["expected_hidden_text"] > 0.99


def test_hidden_gates_are_refused_for_the_vqa_decoder():
    from modeling_efficientvlm.configuration_efficientvlm import decoder_config_from_fusion

    config = tiny_config()
    config.decoder_config = decoder_config_from_fusion(config)
    with pytest.raises(ValueError, match="decoder's residual stream has no hidden-dimension gates"):
        ModalL0Module(config, hidden_gates=True)


@pytest.mark.parametrize("budget", ["params", "flops"])
@pytest.mark.parametrize("extra", [{}, {"layer_gates": True}, {"layer_gates": True, "hidden_gates": True}])
def test_snap_moves_the_deterministic_structure_to_the_target(budget, extra):
    """An overshooting structure (random log α centred below 0) snapped to 0.3: the deterministic masks then remove
    0.3 of the budget within the rounding of one unit per layer, and the ranking of the gates is unchanged."""
    config = tiny_config()
    if budget == "flops":
        l0, _ = _flops_l0(config, target_sparsity=0.3, **extra)
    else:
        l0 = ModalL0Module(config, target_sparsity=0.3, **extra)
    _randomise(l0, seed=0, mean=-1.5)  # more removed than the target, as after an overshoot
    before = float(l0.achieved_sparsity()["budget"]["total"])
    order = {k: g.log_alpha.detach().argsort() for k, g in l0.gates.items()}
    deltas = l0.snap_to_target_()
    after = float(l0.achieved_sparsity()["budget"]["total"])
    assert abs(before - 0.3) > 0.05  # there was something to snap
    assert after == pytest.approx(0.3, abs=0.03)
    assert set(deltas) == {"global"}
    for key, gate in l0.gates.items():
        assert torch.equal(gate.log_alpha.detach().argsort(), order[key]), key


def test_snap_holds_each_modality_target():
    config = tiny_config()
    l0 = ModalL0Module(config, target_sparsity=0.3, modality_targets={"vision": 0.6})
    _randomise(l0, seed=2)
    l0.snap_to_target_()
    achieved = l0.achieved_sparsity()["params"]
    assert float(achieved["vision"]) == pytest.approx(0.6, abs=0.05)
    text_fusion = 1 - (  # the global constraint covers text + fusion
        (1 - achieved["text"]) * l0.prunable_by_modality["text"] + (1 - achieved["fusion"]) * l0.prunable_by_modality["fusion"]
    ) / (l0.prunable_by_modality["text"] + l0.prunable_by_modality["fusion"])
    assert float(text_fusion) == pytest.approx(0.3, abs=0.05)


def test_hidden_gate_settings_round_trip(tmp_path):
    config = tiny_config()
    l0, _ = _flops_l0(config, hidden_gates=True)
    _randomise(l0, seed=3)
    l0.save(str(tmp_path / "gates.safetensors"))
    loaded = ModalL0Module.from_file(str(tmp_path / "gates.safetensors"), config)
    assert loaded.hidden_gates
    assert torch.equal(loaded.deterministic_masks().text.hidden, l0.deterministic_masks().text.hidden)


def test_short_flops_run_with_layer_and_hidden_gates_meets_its_budget_and_materializes(tmp_path):
    """A 40-step pruning run with a FLOPs budget, sub-layer and hidden-dimension gates: the frozen structure removes the
    target share of the path FLOPs within 0.03 (snapped at the freeze), materialize shrinks the residual widths, and
    the exported structure reports the same achieved FLOPs."""
    from efficientvlm.training import EfficientVLMPruningTrainer, PruningArguments, init_student_from_teacher
    from efficientvlm.training.method.materialize import materialize
    from efficientvlm.training.method.trainers import make_gated_model
    from modeling_efficientvlm import EfficientVLMForImageTextRetrieval
    from tests.conftest import training_args, tiny_batches, stack_batch, tiny_teacher

    teacher = tiny_teacher()
    student = EfficientVLMForImageTextRetrieval(init_student_from_teacher(teacher).config)
    student.load_state_dict(init_student_from_teacher(teacher).state_dict(), strict=False)
    args = training_args(PruningArguments, tmp_path, max_steps=40, target_sparsity=0.4, reg_learning_rate=0.1,
                 sparsity_warmup_steps=10, freeze_masks_step=30, learning_rate=5e-4, budget="flops",
                 budget_path="images=16,texts=16,k=4,text_length=7", layer_gates=True, hidden_gates=True)
    gated = make_gated_model(student, args, get_task("retrieval"))
    trainer = EfficientVLMPruningTrainer(model=gated, args=args, train_dataset=tiny_batches(10),
                                         data_collator=stack_batch,
                                         teacher_model=teacher, task=get_task("retrieval"))
    trainer.train()
    assert bool(gated.l0.frozen)
    achieved = gated.l0.achieved_sparsity()["budget"]["total"]
    assert float(achieved) == pytest.approx(0.4, abs=0.03)
    masks = gated.l0.deterministic_masks()
    pruned = materialize(student.eval(), masks)
    path = {m: [list(r) for r in runs] for m, runs in gated.l0.cost_path.items()}
    from efficientvlm.training.method.cost import path_from_json

    runs = path_from_json(path)
    kept = prunable_flops(pruned.config, runs)["total"] / prunable_flops(student.config, runs)["total"]
    assert 1 - kept == pytest.approx(float(achieved), abs=1e-6)
    assert pruned.config.text_config.hidden_size == int(masks.text.hidden.sum())


def test_deterministic_hidden_widths_are_multiples_of_eight():
    """Hidden gates keep the multiple of 8 nearest to Σ P(z>0) (at least 8); unit gates keep the exact rounding."""
    from efficientvlm.training.method.gates import HardConcreteGate

    gate = HardConcreteGate((64,))
    with torch.no_grad():
        gate.log_alpha.copy_(torch.linspace(-8, 8, 64))
    expected = float(gate.expected_l0().detach())
    assert int(gate.deterministic().sum()) == round(expected)
    assert int(gate.deterministic(multiple=8).sum()) == 8 * round(expected / 8)
    with torch.no_grad():
        gate.log_alpha.fill_(-50.0)
    assert int(gate.deterministic(multiple=8).sum()) == 8
    l0 = ModalL0Module(tiny_config(), hidden_gates=True)
    _randomise(l0, seed=4)
    masks = l0.deterministic_masks()
    assert int(masks.vision.hidden.sum()) % 8 == 0 and int(masks.text.hidden.sum()) % 8 == 0
