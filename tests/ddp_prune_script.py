"""Run by tests/test_distributed.py: a few pruning steps on tiny models, single process or under torchrun (gloo)."""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from modeling_efficientvlm import EfficientVLMForImageTextRetrieval, EfficientVLMForPreTraining  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402
from tests.conftest import tiny_batches, stack_batch  # noqa: E402
from efficientvlm.training import (  # noqa: E402
    EfficientVLMPruningTrainer,
    PruningArguments,
    init_student_from_teacher,
    make_gated_model,
)
from efficientvlm.training.tasks import get_task  # noqa: E402


def main(out: str, per_device: int) -> None:
    torch.manual_seed(0)
    teacher = EfficientVLMForPreTraining._from_config(tiny_config(), attn_implementation="sdpa")
    initialised = init_student_from_teacher(teacher)
    student = EfficientVLMForImageTextRetrieval(initialised.config)
    student.load_state_dict(initialised.state_dict(), strict=False)
    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    args = PruningArguments(
        output_dir=out, per_device_train_batch_size=per_device, max_steps=4, learning_rate=1e-3, report_to=[],
        save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0,
        ddp_backend="gloo" if distributed else None, target_sparsity=0.5, reg_learning_rate=0.1,
    )
    gated = make_gated_model(student, args, get_task("retrieval"))
    trainer = EfficientVLMPruningTrainer(model=gated, args=args, train_dataset=tiny_batches(8),
                                         data_collator=stack_batch,
                                         teacher_model=teacher, task=get_task("retrieval"))
    trainer.train()
    state = {k: v.tolist() for k, v in gated.l0.state_dict().items() if v.dtype.is_floating_point}
    state["student.vision_model.layers.0.mlp.fc1.weight"] = student.vision_model.layers[0].mlp.fc1.weight.tolist()
    state["expected_sparsity"] = float(gated.l0.expected_sparsity()["total"].detach())
    with open(os.path.join(out, f"state_rank{os.environ.get('RANK', '0')}.json"), "w") as f:
        json.dump(state, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
