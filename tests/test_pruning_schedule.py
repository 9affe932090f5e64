"""Pruning schedule defaults (#31): the structure is frozen and snapped before the last steps, and the optimizer of
log α and λ matches the official `create_L0_optimizer` (AdamW (0.9, 0.98), no clipping)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from modeling_efficientvlm import EfficientVLMForImageTextRetrieval
from tests.conftest import stack_batch, tiny_batches, tiny_teacher, training_args
from efficientvlm.training.method.arguments import PruningArguments, default_freeze_step
from efficientvlm.training.method.l0 import GATES_FILE
from efficientvlm.training.method.student import init_student_from_teacher
from efficientvlm.training.method.trainers import EfficientVLMPruningTrainer, make_gated_model
from efficientvlm.training.tasks import get_task


def _trainer(out, steps: int = 8, **kwargs):
    teacher = tiny_teacher()
    student = EfficientVLMForImageTextRetrieval(init_student_from_teacher(teacher).config)
    student.load_state_dict(init_student_from_teacher(teacher).state_dict(), strict=False)
    kwargs = {"save_strategy": "steps", "save_steps": 1, **kwargs}
    args = training_args(PruningArguments, out, max_steps=steps, target_sparsity=0.5, reg_learning_rate=0.5,
                         sparsity_warmup_steps=0, **kwargs)
    gated = make_gated_model(student, args, get_task("retrieval"))
    trainer = EfficientVLMPruningTrainer(model=gated, args=args, train_dataset=tiny_batches(steps),
                                         data_collator=stack_batch, teacher_model=teacher, task=get_task("retrieval"))
    return gated, trainer


def test_default_freeze_step_leaves_a_fine_tuning_tail():
    assert default_freeze_step(0.85, 300) == 255
    assert default_freeze_step(0.85, 8) == 6
    assert default_freeze_step(0.85, 1) == 1  # at least one step of gate training
    assert default_freeze_step(1.0, 300) is None  # at the end (the old default)
    with pytest.raises(ValueError, match="freeze_masks_at must lie in"):
        PruningArguments(output_dir="/tmp/unused", freeze_masks_at=0.0)


def test_a_run_without_freeze_masks_step_snaps_before_its_last_steps_and_trains_after(tmp_path):
    gated, trainer = _trainer(tmp_path)  # no --freeze_masks_step: frozen after 85 % of 8 steps = step 6
    trainer.train()
    assert trainer.args.freeze_masks_step == 6
    states = {step: load_file(tmp_path / f"checkpoint-{step}" / GATES_FILE) for step in range(1, 9)}
    assert not any(bool(states[s]["frozen"]) for s in range(1, 6))
    assert all(bool(states[s]["frozen"]) for s in range(6, 9))
    # snapped at the freeze: the deterministic masks meet the target there, and the gates stay put afterwards
    assert float(gated.l0.achieved_sparsity()["params"]["total"]) == pytest.approx(0.5, abs=0.05)
    for key, value in states[6].items():
        assert torch.equal(states[8][key], value), key
    # the weights train after the snap, under the structure that is exported
    w6 = load_file(tmp_path / "checkpoint-6" / "model.safetensors")
    w8 = load_file(tmp_path / "checkpoint-8" / "model.safetensors")
    assert any(not torch.equal(w6[k], w8[k]) for k in w6)
    tail = [e for e in trainer.state.log_history if e.get("masks_frozen")]
    assert tail and all("loss_lagrangian" not in e for e in tail)


def test_freeze_masks_at_one_keeps_the_snap_at_the_end(tmp_path):
    gated, trainer = _trainer(tmp_path, steps=3, freeze_masks_at=1.0, save_strategy="no")
    trainer.train()
    assert trainer.args.freeze_masks_step is None and bool(gated.l0.frozen)  # snapped by on_train_end


def test_lambda_optimizer_and_clipping_follow_the_official_l0_optimizer(tmp_path):
    gated, trainer = _trainer(tmp_path, steps=1, save_strategy="no", max_grad_norm=1.0)
    groups = trainer.create_optimizer().param_groups
    assert groups[2]["betas"] == groups[3]["betas"] == (0.9, 0.98)
    assert groups[3]["maximize"] and not groups[2].get("maximize", False)
    gate_params = list(gated.l0.parameters())
    for p in gated.parameters():
        p.grad = torch.full_like(p, 10.0)
    trainer._clip_grad_norm(gated)
    assert all(torch.equal(p.grad, torch.full_like(p, 10.0)) for p in gate_params)  # log α and λ: not clipped
    gate_ids = {id(p) for p in gate_params}
    weights = [p.grad for p in gated.parameters() if id(p) not in gate_ids]
    assert float(torch.linalg.vector_norm(torch.stack([g.norm() for g in weights]))) == pytest.approx(1.0, rel=1e-4)
