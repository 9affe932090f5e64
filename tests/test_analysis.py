"""Module sensitivity analysis and per-encoder pruning targets."""

import json

import pytest
import torch

from modeling_efficientvlm import EfficientVLMForImageTextRetrieval
from tests.conftest import tiny_config
from tests.conftest import training_args, tiny_batches, stack_batch, tiny_teacher
from efficientvlm.training import EfficientVLMPruningTrainer, PruningArguments, init_student_from_teacher, make_gated_model
from efficientvlm.training.method.sensitivity import encoder_masks, magnitude_importance, unit_importance
from efficientvlm.training.method.materialize import pruned_config
from efficientvlm.training.method.structure import prunable_parameters, unit_groups
from efficientvlm.training.tasks import get_task


@pytest.mark.parametrize("modality", ["vision", "text", "fusion"])
@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.6])
def test_removes_the_requested_fraction_from_that_encoder_only(modality, ratio):
    torch.manual_seed(0)
    model = EfficientVLMForImageTextRetrieval(tiny_config())
    masks = encoder_masks(model.config, modality, ratio, unit_importance(model, "magnitude"))
    before, after = prunable_parameters(model.config), prunable_parameters(pruned_config(model.config, masks))
    largest_unit = max(g.unit_params for g in unit_groups(model.config) if g.modality == modality)
    removed = 1 - after[modality] / before[modality]
    assert ratio <= removed < ratio + largest_unit / before[modality]
    for other in {"vision", "text", "fusion"} - {modality}:
        assert after[other] == before[other]


def test_magnitude_importance_of_a_head_by_hand():
    torch.manual_seed(0)
    model = EfficientVLMForImageTextRetrieval(tiny_config())
    group = next(g for g in unit_groups(model.config) if g.modality == "fusion" and g.kind == "cross_head")
    attn = model.fusion_model.layers[0].cross_attn
    rows = slice(6, 12)  # head 1, head_dim 6
    squares = sum(float(w[rows].detach().pow(2).sum()) for w in (attn.q_proj.weight, attn.k_proj.weight,
                                                                 attn.v_proj.weight))
    squares += float(attn.out_proj.weight[:, rows].detach().pow(2).sum())
    assert float(magnitude_importance(model, group)[1]) == pytest.approx((squares / group.unit_params) ** 0.5)


def test_least_important_units_go_first():
    model = EfficientVLMForImageTextRetrieval(tiny_config())
    scores = unit_importance(model, "magnitude")
    scores = {name: torch.arange(len(v), dtype=torch.float) for name, v in scores.items()}  # index = importance
    masks = encoder_masks(model.config, "text", 0.1, scores)
    assert masks.text.ffn[0][0] == 0 and masks.text.ffn[0][-1] == 1


@pytest.mark.slow
def test_per_encoder_targets_are_met_by_a_short_pruning_run(tmp_path):
    teacher = tiny_teacher()
    initialised = init_student_from_teacher(teacher)
    student = EfficientVLMForImageTextRetrieval(initialised.config)
    student.load_state_dict(initialised.state_dict(), strict=False)
    targets = {"vision_target": 0.3, "text_target": 0.6, "fusion_target": 0.45}
    # the per-encoder multipliers themselves (no snapping at the end, which would shift the expectation)
    args = training_args(PruningArguments, tmp_path, max_steps=400, reg_learning_rate=0.1, sparsity_warmup_steps=50,
                 learning_rate=5e-4, snap_to_target=False, **targets)
    gated = make_gated_model(student, args, get_task("retrieval"))
    assert gated.l0.constraints == ["vision", "text", "fusion"]  # each encoder has its own multipliers
    EfficientVLMPruningTrainer(model=gated, args=args, train_dataset=tiny_batches(100), data_collator=stack_batch,
                               teacher_model=teacher, task=get_task("retrieval")).train()
    sparsity = gated.l0.expected_sparsity()
    for modality in ("vision", "text", "fusion"):
        assert float(sparsity[modality].detach()) == pytest.approx(targets[f"{modality}_target"], abs=0.03)


def test_analyze_modules_cli_writes_table_json_and_plot(tmp_path, capsys):
    from tests.conftest import CLI_COMMON
    from efficientvlm.training.commands.cli import main

    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    assert main(["teacher", "--preset", "tiny", "--output_dir", str(model_dir), "--max_steps", "1", *CLI_COMMON]) == 0
    capsys.readouterr()
    out = tmp_path / "analysis"
    assert main(["analyze-modules", "--model", str(model_dir), "--ratios", "0.2,0.5", "--output_dir", str(out),
                 "--image_size", "32", "--eval_images", "8", "--itm_k", "2"]) == 0
    assert "magnitude" in capsys.readouterr().out
    result = json.loads((out / "analysis.json").read_text())
    assert set(result["curves"]) == {"vision", "text", "fusion"} and len(result["curves"]["text"][0]) == 3
    assert (out / "sensitivity.png").stat().st_size > 0
    assert main(["analyze-modules", "--model", str(model_dir), "--importance", "gates", "--output_dir", str(out),
                 "--image_size", "32"]) == 2
