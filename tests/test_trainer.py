"""Distillation and pruning Trainers on tiny models (CPU, a few steps each)."""

import copy
import math

import pytest
import torch
from safetensors.torch import load_file

from modeling_efficientvlm import EfficientVLMForImageTextRetrieval, EfficientVLMForPreTraining
from tests.conftest import stack_batch, tiny_batches, tiny_teacher, training_args
from efficientvlm.training import (
    DistillationArguments,
    EfficientVLMDistillationTrainer,
    EfficientVLMPruningTrainer,
    PruningArguments,
    init_student_from_teacher,
    make_gated_model,
    materialize,
)
from efficientvlm.training.method.distillation import layer_maps
from efficientvlm.training.method.l0 import GATES_FILE
from efficientvlm.training.tasks.retrieval import retrieval_losses
from efficientvlm.training.tasks import get_task


def test_kd_is_exactly_zero_when_student_equals_teacher_and_pairs_are_shared(tmp_path):
    """Identical student and teacher: every KD term is 0 — which also proves both scored the same ITM pairs."""
    teacher = tiny_teacher().eval()
    student = copy.deepcopy(teacher)
    args = training_args(DistillationArguments, tmp_path)
    batch = stack_batch(tiny_batches(1)[:4])
    total, parts = retrieval_losses(student, teacher, batch, args, layer_maps(student.config, teacher.config),
                                       generator=torch.Generator().manual_seed(0))
    for name in ("attn", "hidden", "logits"):
        assert float(parts[name].detach()) == pytest.approx(0.0, abs=1e-10), name
    assert float(parts["itm"].detach()) > 0 and float(parts["mlm"].detach()) > 0


def test_negative_pairs_are_shared(tmp_path, monkeypatch):
    """The teacher's ITM inputs are exactly the same (image, text) pairs the student was scored on."""
    teacher = tiny_teacher().eval()
    student = init_student_from_teacher(teacher)
    seen = {}

    def spy(name, model):
        original = model.itm_logits

        def wrapped(text_tokens, attention_mask, image_tokens, *a, **k):
            seen[name] = (text_tokens.detach(), image_tokens.detach())
            return original(text_tokens, attention_mask, image_tokens, *a, **k)

        monkeypatch.setattr(model, "itm_logits", wrapped)

    spy("student", student)
    spy("teacher", teacher)
    batch = stack_batch(tiny_batches(1)[:4])
    retrieval_losses(student, teacher, batch, training_args(DistillationArguments, tmp_path),
                        layer_maps(student.config, teacher.config), generator=torch.Generator().manual_seed(3))
    # map fused rows back to batch rows through the text tokens of each model's own text encoder
    s_text = student.encode_text(batch["input_ids"], batch["attention_mask"]).last_hidden_state
    t_text = teacher.encode_text(batch["input_ids"], batch["attention_mask"]).last_hidden_state
    s_rows = [int((s_text - row).abs().flatten(1).sum(1).argmin()) for row in seen["student"][0]]
    t_rows = [int((t_text - row).abs().flatten(1).sum(1).argmin()) for row in seen["teacher"][0]]
    assert s_rows == t_rows and len(s_rows) == 12  # 3B pairs: B positives, B negative texts, B negative images


def test_distillation_decreases_losses_and_leaves_teacher_unchanged(tmp_path):
    teacher = tiny_teacher()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = init_student_from_teacher(teacher)
    with torch.no_grad():  # perturb so that KD has something to do
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    data = tiny_batches(1)[:4] * 30  # one fixed batch, repeated
    # KD only (λ = 0): with an untrained tiny teacher the VLP terms would pull the other way; attention MSE is small
    # in absolute terms, so it gets a larger weight to move within 30 steps
    args = training_args(DistillationArguments, tmp_path, max_steps=30, lambda_vlp=0.0, alpha_attn=100.0)
    trainer = EfficientVLMDistillationTrainer(model=student, args=args, train_dataset=data, data_collator=stack_batch,
                                              teacher_model=teacher, task=get_task("retrieval"))
    batch = stack_batch(data[:4])
    maps = layer_maps(student.config, teacher.config)
    _, first = retrieval_losses(student, teacher, batch, args, maps, generator=torch.Generator().manual_seed(0))
    trainer.train()
    student.eval()
    _, last = retrieval_losses(student, teacher, batch, args, maps, generator=torch.Generator().manual_seed(0))
    for name in ("total", "attn", "hidden", "logits"):
        assert float(last[name].detach()) < float(first[name].detach()), name
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not teacher.training
    logged = [entry for entry in trainer.state.log_history if "loss_itc" in entry]
    assert logged and {"loss_attn", "loss_hidden", "loss_logits", "loss_mlm"} <= set(logged[0])
    trainer.save_model(str(tmp_path / "final"))
    reloaded = EfficientVLMForPreTraining.from_pretrained(tmp_path / "final")
    assert torch.equal(reloaded.state_dict()["vision_model.layers.0.mlp.fc1.weight"],
                       student.state_dict()["vision_model.layers.0.mlp.fc1.weight"])


@pytest.mark.slow
def test_pruning_run_reaches_target_and_materializes_to_predicted_size(tmp_path):
    teacher = tiny_teacher()
    student = EfficientVLMForImageTextRetrieval(init_student_from_teacher(teacher).config)
    student.load_state_dict(init_student_from_teacher(teacher).state_dict(), strict=False)
    args = training_args(PruningArguments, tmp_path, max_steps=120, target_sparsity=0.5, reg_learning_rate=0.1,
                 sparsity_warmup_steps=20, save_strategy="steps", save_steps=60, learning_rate=5e-4)
    gated = make_gated_model(student, args, get_task("retrieval"))
    trainer = EfficientVLMPruningTrainer(model=gated, args=args, train_dataset=tiny_batches(30),
                                         data_collator=stack_batch,
                                         teacher_model=teacher, task=get_task("retrieval"))
    trainer.train()
    # the structure is snapped to the target when training ends: what materialize keeps removes 0.5
    assert bool(gated.l0.frozen)
    assert float(gated.l0.achieved_sparsity()["params"]["total"]) == pytest.approx(0.5, abs=0.03)
    assert float(gated.l0.expected_sparsity()["total"].detach()) == pytest.approx(0.5, abs=0.06)
    # the clamp callback ran: heads start at log α = 10, above the clamp bound log 100
    assert max(float(p.max()) for p in gated.l0.gate_parameters()) <= math.log(100) + 1e-6
    groups = trainer.optimizer.param_groups
    assert groups[3]["maximize"] and groups[2]["weight_decay"] == 0 and groups[2]["lr"] == pytest.approx(0.1)
    assert {id(p) for p in gated.l0.lambda_parameters()} == {id(p) for p in groups[3]["params"]}
    logged = [e for e in trainer.state.log_history if "expected_sparsity_vision" in e]
    assert logged and {"lambda1_global", "lambda2_global", "target_global"} <= set(logged[-1])
    pruned = materialize(student.eval(), gated.l0.deterministic_masks())
    assert pruned.num_parameters() == gated.l0.predicted_parameters(student.config)
    checkpoint = tmp_path / "checkpoint-60"
    assert (checkpoint / GATES_FILE).exists() and (checkpoint / "model.safetensors").exists()
    gates = load_file(checkpoint / GATES_FILE)
    assert any(k.startswith("lambdas.") for k in gates)


def test_out_of_range_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="target_sparsity must lie in \\[0, 1\\)"):
        training_args(PruningArguments, tmp_path, target_sparsity=1.0)
    with pytest.raises(ValueError, match="kd_temperature must be > 0"):
        training_args(DistillationArguments, tmp_path, kd_temperature=-1.0)
    with pytest.raises(ValueError, match="lambda_vlp must lie in \\[0, 1\\]"):
        training_args(DistillationArguments, tmp_path, lambda_vlp=1.5)


@pytest.mark.parametrize("pruning", [False, True])
def test_resume_from_checkpoint_is_exact(tmp_path, pruning):
    """k steps + checkpoint + resume == an uninterrupted run: weights, gate log α and λ (noise RNG checkpointed)."""
    data = tiny_batches(6)

    def run(out, resume=None):
        teacher = tiny_teacher()
        student = init_student_from_teacher(teacher)
        if pruning:
            cls, kw = PruningArguments, dict(target_sparsity=0.5, reg_learning_rate=0.1)
            student = EfficientVLMForImageTextRetrieval(student.config)
            student.load_state_dict(init_student_from_teacher(teacher).state_dict(), strict=False)
        else:
            cls, kw = DistillationArguments, {}
        args = training_args(cls, out, max_steps=6, save_strategy="steps", save_steps=3, **kw)
        model = make_gated_model(student, args, get_task("retrieval")) if pruning else student
        trainer_cls = EfficientVLMPruningTrainer if pruning else EfficientVLMDistillationTrainer
        trainer = trainer_cls(model=model, args=args, train_dataset=data, data_collator=stack_batch,
                              teacher_model=teacher, task=get_task("retrieval"))
        trainer.train(resume_from_checkpoint=resume)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    straight = run(tmp_path / "a")  # 6 steps, writing checkpoint-3 on the way
    resumed = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-3"))
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-6, msg=key)
    if pruning:
        assert any(k.startswith("l0.lambdas") for k in straight)
