"""Bad input gets a clear error that names the cause, and nothing half-written is left behind."""

import json
import os

import pytest
import torch

from modeling_efficientvlm import EfficientVLMConfig, EfficientVLMForImageTextRetrieval, EfficientVLMForPreTraining
from tests.conftest import tiny_config
from tests.conftest import training_args, tiny_batches, stack_batch, tiny_teacher
from efficientvlm.training import DistillationArguments, EfficientVLMDistillationTrainer, init_student_from_teacher
from efficientvlm.training.infra.runs import atomic_directory
from efficientvlm.training.tasks import get_task


def test_nan_loss_stops_with_step_and_term_and_saves_nothing(tmp_path):
    teacher = tiny_teacher()
    student = init_student_from_teacher(teacher)
    data = tiny_batches(2)
    for item in data:
        item["pixel_values"] = torch.full_like(item["pixel_values"], float("nan"))
    args = training_args(DistillationArguments, tmp_path / "out", max_steps=3, save_strategy="steps", save_steps=1)
    trainer = EfficientVLMDistillationTrainer(model=student, args=args, train_dataset=data, data_collator=stack_batch,
                                              teacher_model=teacher, task=get_task("retrieval"))
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 0: terms \[.*'itc'"):
        trainer.train()
    assert not any(name.startswith("checkpoint-") for name in os.listdir(tmp_path / "out"))


def test_incompatible_teacher_vocabulary_is_refused(tmp_path):
    teacher = tiny_teacher()
    student = EfficientVLMForPreTraining(tiny_config(text=dict(vocab_size=50)))
    with pytest.raises(ValueError, match=r"student vocab_size \(50\) != teacher vocab_size \(99\)"):
        EfficientVLMDistillationTrainer(model=student, args=training_args(DistillationArguments, tmp_path),
                                        train_dataset=tiny_batches(1), data_collator=stack_batch, teacher_model=teacher,
                                        task=get_task("retrieval"))


def test_width_mismatch_without_projection_is_refused(tmp_path):
    teacher = tiny_teacher()
    student = EfficientVLMForPreTraining(tiny_config(vision=dict(hidden_size=16, head_dim=4)))
    with pytest.raises(ValueError, match="vision_config.hidden_size differs .* set beta_hidden=0"):
        EfficientVLMDistillationTrainer(model=student, args=training_args(DistillationArguments, tmp_path),
                                        train_dataset=tiny_batches(1), data_collator=stack_batch, teacher_model=teacher,
                                        task=get_task("retrieval"))


def test_truncated_safetensors_and_corrupt_config_are_reported(tmp_path):
    EfficientVLMForImageTextRetrieval(tiny_config()).save_pretrained(tmp_path / "ok")
    weights = tmp_path / "ok" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(Exception, match="(?i)safetensors|header|deserializ|incomplete|invalid"):
        EfficientVLMForImageTextRetrieval.from_pretrained(tmp_path / "ok")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text('{"model_type": "efficientvlm", "vision_config": {')
    with pytest.raises(Exception, match="(?i)config.json|json"):
        EfficientVLMConfig.from_pretrained(tmp_path / "bad")
    config = tiny_config().to_dict()
    config["vision_config"]["num_attention_heads"] = [4, 4, 4]
    (tmp_path / "ragged").mkdir()
    (tmp_path / "ragged" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="num_attention_heads has 3 entries but num_hidden_layers is 2"):
        EfficientVLMConfig.from_pretrained(tmp_path / "ragged")


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "export"
    with pytest.raises(RuntimeError):
        with atomic_directory(str(target)) as tmp:
            (open(os.path.join(tmp, "half.bin"), "w")).write("x")
            raise RuntimeError("boom")
    assert not target.exists() and os.listdir(tmp_path) == []


def test_foreign_pth_is_loaded_without_pickle_execution(tmp_path):
    from efficientvlm.training.method.initializers import convert_xvlm_checkpoint

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"model": {"x": torch.zeros(1)}, "evil": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(Exception):
        convert_xvlm_checkpoint(str(tmp_path / "evil.pth"))
    assert not (tmp_path / "pwned").exists()


def test_interrupted_checkpoint_leaves_no_checkpoint_folder(tmp_path, monkeypatch):
    """A save that dies half-way (here: in the RNG-state step) leaves neither checkpoint-N nor its staging dir."""
    teacher = tiny_teacher()
    args = training_args(DistillationArguments, tmp_path / "out", max_steps=2, save_strategy="steps", save_steps=1)
    trainer = EfficientVLMDistillationTrainer(model=init_student_from_teacher(teacher), args=args,
                                              train_dataset=tiny_batches(2), data_collator=stack_batch, teacher_model=teacher,
                                              task=get_task("retrieval"))

    def die(output_dir):
        raise OSError("disk full")

    monkeypatch.setattr(trainer, "_save_rng_state", die)
    with pytest.raises(OSError, match="disk full"):
        trainer.train()
    assert os.listdir(tmp_path / "out") == []


def test_checkpoints_are_renamed_into_place_and_rotated(tmp_path):
    teacher = tiny_teacher()
    args = training_args(DistillationArguments, tmp_path / "out", max_steps=3, save_strategy="steps", save_steps=1,
                 save_total_limit=2)
    EfficientVLMDistillationTrainer(model=init_student_from_teacher(teacher), args=args, train_dataset=tiny_batches(3),
                                    data_collator=stack_batch, teacher_model=teacher, task=get_task("retrieval")).train()
    assert sorted(os.listdir(tmp_path / "out")) == ["checkpoint-2", "checkpoint-3"]
    assert (tmp_path / "out" / "checkpoint-3" / "trainer_state.json").exists()
