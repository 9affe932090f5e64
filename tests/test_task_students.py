"""`efficientvlm init-student` (and `demo --task T --student_from task_teacher`, which runs it): the student built from
every other layer of a teacher — a shipped task teacher keeps its embeddings and task head — written as a stage writes
a student (weights, processor, layer map), atomically."""

import json
import os

import pytest
import torch
from efficientvlm.training.commands import demo
from efficientvlm.training.commands.cli import main
from efficientvlm.training.commands.demo import DemoArguments, task_teacher_dir
from efficientvlm.training.method.structure import ENCODER_MODULES
from efficientvlm.training.method.student import load_layer_map
from efficientvlm.training.tasks import get_task


@pytest.mark.parametrize("task", ["nlvr2", "vqa"])
def test_the_student_is_every_other_layer_of_the_task_teacher(task, tmp_path):
    folder = task_teacher_dir(task)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        pytest.skip(f"no shipped {task} teacher")
    spec = get_task(task)
    out = str(tmp_path / "student")
    assert main(["init-student", "--teacher", folder, "--task", task, "--output_dir", out]) == 0

    teacher = spec.teacher_class.from_pretrained(folder)
    student = spec.model_class.from_pretrained(out)  # as the fine-tuning and pruning stages load it
    layer_map = load_layer_map(out)
    assert layer_map["vision"] == [1, 3, 5, 7, 9, 11] and layer_map["text"] == [1, 3, 5]  # layer i ← teacher 2i+1
    if task == "nlvr2":  # the paired fusion keeps whole copy pairs: every other pair
        assert layer_map["fusion"] == [2, 3, 6, 7, 10, 11]
    else:
        assert layer_map["fusion"] == [1, 3, 5] and layer_map["decoder"] == [1, 3, 5]  # VQA: the answer decoder too
    modules = {module: modality for modality, module in ENCODER_MODULES.items()}
    teacher_state = teacher.state_dict()
    for key, tensor in student.state_dict().items():  # layer i of each stack ← its mapped teacher layer, rest as is
        parts = key.split(".")
        if parts[0] in modules and parts[1] == "layers":
            parts[2] = str(layer_map[modules[parts[0]]][int(parts[2])])
        torch.testing.assert_close(tensor, teacher_state[".".join(parts)], rtol=0, atol=0, msg=key)
    assert sum(p.numel() for p in student.parameters()) < 0.6 * sum(p.numel() for p in teacher.parameters())
    assert demo._processor(out) is not None  # the stages read the tokenizer from the student's folder


def test_student_from_is_checked():
    with pytest.raises(ValueError, match="--student_from must be one of"):
        DemoArguments(task="nlvr2", student_from="teacher")
    with pytest.raises(ValueError, match="needs a task teacher.*pre-training teacher"):
        DemoArguments(task="retrieval", student_from="task_teacher")


def test_the_task_chains_start_from_the_task_teacher_by_default():
    assert DemoArguments(task="nlvr2").student_from == "task_teacher"
    assert DemoArguments(task="retrieval").student_from == "distilled"  # its teacher is the pre-training one
    assert DemoArguments(task="vqa", student_from="distilled", distill_steps=5).distill_steps == 5
    with pytest.raises(ValueError, match="--distill_steps .*--student_from distilled"):
        DemoArguments(task="captioning", distill_steps=5)  # no general distillation runs to take the steps


def test_init_student_refuses_a_used_folder_and_leaves_nothing_on_bad_input(tmp_path, capsys):
    teacher = demo.DEMO_TEACHER_DIR  # the pre-training teacher: the start of `distill`
    out = tmp_path / "student"
    assert main(["init-student", "--teacher", teacher, "--output_dir", str(out), "--text_layers", "2"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["layer_map"]["text"] == [2, 5] and record["params"] < record["teacher_params"]
    # a model is there: refused unless --overwrite
    assert main(["init-student", "--teacher", teacher, "--output_dir", str(out)]) != 0
    assert "--overwrite true" in capsys.readouterr().err
    assert main(["init-student", "--teacher", teacher, "--output_dir", str(out), "--overwrite", "true"]) == 0
    bad = tmp_path / "bad"  # a layer map outside the teacher: refused, no folder written
    assert main(["init-student", "--teacher", teacher, "--output_dir", str(bad), "--layer_map", "text=1,3,9"]) != 0
    assert "layer_map['text'] points outside the teacher" in capsys.readouterr().err and not bad.exists()
