"""The converged-teacher machinery: the convergence rule, the held-out curve callback, random → hard ITM negatives,
the no-KD baseline stages and the shipped demo teacher."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from tests.conftest import run_clean_python
from tests.conftest import training_args, tiny_batches, stack_batch, tiny_teacher
from efficientvlm.training.infra.learning_curve import HeldOutCurveCallback, converged
from efficientvlm.training.method import losses as L
from efficientvlm.training.method.arguments import DistillationArguments
from efficientvlm.training.method.trainers import EfficientVLMDistillationTrainer
from efficientvlm.training.tasks.retrieval import uniform_negative_share
from efficientvlm.training.tasks import get_task


SHIPPED_TASK_TEACHERS = ("captioning", "nlvr2", "vqa")  # `make task-teachers`


def _curve(values, itc=None, every=100):
    return [{"step": every * (i + 1), "r_mean": v, **({"r_mean_itc": itc[i]} if itc else {})}
            for i, v in enumerate(values)]


def test_convergence_rule_by_hand():
    rising = _curve([10, 20, 30, 40, 50, 60, 70, 80])
    assert not converged(rising, "r_mean")
    # last quarter of 800 steps = steps 600, 700, 800: 70, 71, 69 → mean 70, within ±1.5
    flat = _curve([10, 30, 50, 60, 65, 70, 71, 69])
    assert converged(flat, "r_mean") and not converged(flat, "r_mean", band=0.5)
    assert not converged(flat[:7], "r_mean")  # fewer than 8 points
    assert converged(flat, "r_mean", min_points=7)
    itm_worse = _curve([10, 30, 50, 60, 65, 70, 71, 69], itc=[0, 0, 0, 0, 0, 0, 0, 75])
    assert not converged(itm_worse, "r_mean", require_itm_gain=True) and converged(itm_worse, "r_mean")


def test_curve_callback_records_and_stops_training(tmp_path):
    calls = []

    def evaluate(model):
        calls.append(model.training)
        return {"r_mean": 50.0, "r_mean_itc": 40.0, "txt_r1": 1.0}

    callback = HeldOutCurveCallback(evaluate, "r_mean", every=2, stop_when_converged=True, min_points=3,
                                    require_itm_gain=True)
    teacher = tiny_teacher()
    args = training_args(DistillationArguments, tmp_path, max_steps=40)
    trainer = EfficientVLMDistillationTrainer(model=teacher, args=args, train_dataset=tiny_batches(40),
                                              data_collator=stack_batch, teacher_model=None, callbacks=[callback],
                                              task=get_task("retrieval"))
    trainer.train()
    # at step 6 the last quarter (steps >= 4.5) holds one point; at step 8 two flat ones: stop
    assert trainer.state.global_step == 8 and callback.converged_at == 8
    assert [p["step"] for p in callback.curve] == [2, 4, 6, 8] and callback.curve[0] == {
        "step": 2, "r_mean": 50.0, "r_mean_itc": 40.0, "txt_r1": 1.0}  # every number of the evaluation
    summary = callback.summary()
    assert summary["converged"] and summary["converged_at_step"] == 8
    assert calls == [False] * 4  # evaluated in eval mode
    assert summary["rule"].endswith("ITM re-ranking above ITC alone")
    # a task without an ITC-only value (NLVR2, VQA, captioning): the ITM condition neither applies nor is named
    other = HeldOutCurveCallback(lambda model: {"accuracy": 60.0}, "accuracy", every=2, require_itm_gain=True)
    other.curve = [{"step": 2, "accuracy": 60.0}]
    assert "ITM" not in other.summary()["rule"]


def test_negatives_go_from_random_to_hard(tmp_path):
    args = training_args(DistillationArguments, tmp_path, itm_negatives_warmup_steps=100)
    assert [uniform_negative_share(args, s) for s in (0, 50, 100, 500)] == [1.0, 0.5, 0.0, 0.0]
    assert uniform_negative_share(training_args(DistillationArguments, tmp_path), 0) == 0.0  # default: all hard
    # the sampler's mixture: (1 − u)·softmax + u·uniform, measured on image 0 of a batch of 8
    sim = torch.full((8, 8), 0.0)
    sim.fill_diagonal_(5.0)
    sim[0, 1] = 5.0  # the hardest negative of image 0: softmax share ~1
    g = torch.Generator().manual_seed(0)
    for share, expected in ((0.0, 1.0), (0.5, 0.5 + 0.5 / 7), (1.0, 1 / 7)):
        draws = torch.stack([L.sample_itm_negatives(sim / 0.07, generator=g, uniform_share=share)[0][0]
                             for _ in range(1500)])
        freq = float((draws == 1).float().mean())
        assert freq == pytest.approx(expected, abs=4 * (expected * (1 - expected) / 1500) ** 0.5 + 1e-3), share
    with pytest.raises(ValueError, match="uniform_share"):
        L.sample_itm_negatives(sim, uniform_share=1.5)


def test_no_kd_baselines_train_without_a_teacher(tmp_path, monkeypatch):
    from efficientvlm.training.commands import stages

    captured = []

    def fake_train(trainer_cls, model, teacher, *args, **kwargs):
        captured.append(teacher)
        return model, {}

    monkeypatch.setattr(stages, "_train_and_evaluate", fake_train)
    teacher_dir = tmp_path / "teacher"
    tiny_teacher().save_pretrained(teacher_dir)
    data = stages.DataArguments(image_size=32)
    monkeypatch.setattr(stages, "load_processor", lambda data, path=None: None)
    run_distill = stages.run_distill.__wrapped__  # the stage body, without output-dir ownership (nothing is saved)
    run_distill(stages.StudentArguments(teacher=str(teacher_dir), kd=False), data,
                training_args(DistillationArguments, tmp_path / "s"))
    run_distill(stages.StudentArguments(teacher=str(teacher_dir)), data, training_args(DistillationArguments, tmp_path))
    assert captured[0] is None and captured[1] is not None
    with pytest.raises(ValueError, match="--teacher must be an existing"):
        stages.PruneModelsArguments(student=str(teacher_dir), teacher="")
    assert stages.PruneModelsArguments(student=str(teacher_dir), teacher="", kd=False).kd is False


def test_shipped_demo_teacher_remote_code_is_real_files_equal_to_the_library():
    """Real files, not links (a copied folder must load); byte for byte the library's (`make remote-code`), in the
    demo teacher and every shipped task teacher."""
    import modeling_efficientvlm
    from efficientvlm.training.commands.demo import shipped_teacher_dirs

    library = os.path.dirname(os.path.abspath(modeling_efficientvlm.__file__))
    names = sorted(n for n in os.listdir(library) if n.endswith(".py") and n != "__init__.py")
    assert {"modeling_efficientvlm.py", "configuration_efficientvlm.py", "processing_efficientvlm.py",
            "pipeline_efficientvlm.py"} <= set(names)
    folders = shipped_teacher_dirs()
    assert len(folders) == 1 + len(SHIPPED_TASK_TEACHERS)
    for name, folder in ((n, f) for n in names for f in folders):
        shipped = os.path.join(folder, name)
        assert os.path.isfile(shipped) and not os.path.islink(shipped), f"{shipped} must be a real file"
        with open(shipped, "rb") as a, open(os.path.join(library, name), "rb") as b:
            assert a.read() == b.read(), f"{shipped} differs from the library's: run `make remote-code`"


def test_copy_remote_code_replaces_links_without_touching_the_library(tmp_path):
    import modeling_efficientvlm
    from efficientvlm.training.commands.demo import copy_remote_code

    library = os.path.dirname(os.path.abspath(modeling_efficientvlm.__file__))
    source = os.path.join(library, "modeling_efficientvlm.py")
    before = open(source, "rb").read()
    os.symlink(source, tmp_path / "modeling_efficientvlm.py")
    names = copy_remote_code(str(tmp_path))
    assert "modeling_efficientvlm.py" in names and not os.path.islink(tmp_path / "modeling_efficientvlm.py")
    assert (tmp_path / "modeling_efficientvlm.py").read_bytes() == before == open(source, "rb").read()
    assert {n for n in os.listdir(tmp_path)} == set(names)


@pytest.mark.slow
def test_shipped_demo_teacher_is_hub_ready_converged_and_small(tmp_path):
    from efficientvlm.training.commands.demo import DEMO_TEACHER_DIR, PROVENANCE_FILE

    files = set(os.listdir(DEMO_TEACHER_DIR))
    assert {"config.json", "model.safetensors", "processor_config.json", "README.md", PROVENANCE_FILE,
            "learning_curve.png"} <= files
    size = sum(os.path.getsize(os.path.join(DEMO_TEACHER_DIR, f)) for f in files)
    assert size <= 10 * 2**20, f"{size / 2**20:.1f} MB"
    provenance = json.loads(open(os.path.join(DEMO_TEACHER_DIR, PROVENANCE_FILE)).read())
    curve = provenance["learning_curve"]
    assert curve["converged"], "the shipped teacher must have met the convergence rule"
    assert converged(curve["curve"], "r_mean", require_itm_gain=True)
    last = curve["curve"][-1]
    assert last["r_mean"] > last["r_mean_itc"]  # ITM re-ranking helps
    assert provenance["command"].startswith("efficientvlm demo-teacher") and "seed" in provenance
    card = open(os.path.join(DEMO_TEACHER_DIR, "README.md")).read()
    assert "learning_curve.png" in card and "demo-teacher" in card
    # its remote code is the library's own (test below), and a copy of the folder loads as a Hub user would load it
    copy = shutil.copytree(DEMO_TEACHER_DIR, tmp_path / "demo_teacher")  # what `cp -r` makes of it
    out = run_clean_python(
        f"""
        from transformers import AutoModelForPreTraining
        model = AutoModelForPreTraining.from_pretrained({str(copy)!r}, trust_remote_code=True)
        print(type(model).__name__, sum(p.numel() for p in model.parameters()))
        """
    )
    name, params = out.split()[-2:]
    assert name == "EfficientVLMForPreTraining" and int(params) > 1_000_000


@pytest.mark.slow
@pytest.mark.parametrize("task", SHIPPED_TASK_TEACHERS)
def test_shipped_task_teachers_are_hub_ready_converged_and_small(task, tmp_path):
    """Each task teacher `demo --task T` starts from: Hub-ready, its curve met the rule (recorded), the command that
    built it recorded, small, and a copy of its folder loads with AutoModel as a Hub user loads it."""
    from efficientvlm.training.commands.demo import PROVENANCE_FILE, task_teacher_dir

    folder = task_teacher_dir(task)
    files = set(os.listdir(folder))
    assert {"config.json", "model.safetensors", "processor_config.json", "README.md", PROVENANCE_FILE,
            "learning_curve.png"} <= files
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in files if os.path.isfile(os.path.join(folder, f)))
    assert size <= 10 * 2**20, f"{size / 2**20:.1f} MB"
    provenance = json.loads(open(os.path.join(folder, PROVENANCE_FILE)).read())
    assert provenance["task"] == task and provenance["command"].startswith(f"efficientvlm demo-teacher --task {task}")
    curve = provenance["learning_curve"]
    assert curve["converged"], f"the shipped {task} teacher must have met the convergence rule"
    metric = get_task(task).metric
    assert provenance["metrics"][metric] == pytest.approx(curve["curve"][-1][metric], abs=1e-3)
    copy = shutil.copytree(folder, tmp_path / f"{task}_teacher")
    auto = {"captioning": "AutoModelForImageTextToText", "nlvr2": "AutoModelForSequenceClassification",
            "vqa": "AutoModelForVisualQuestionAnswering"}[task]
    out = run_clean_python(
        f"""
        import transformers
        model = transformers.{auto}.from_pretrained({str(copy)!r}, trust_remote_code=True)
        print(type(model).__name__)
        """
    )
    assert out.split()[-1] == get_task(task).model_class.__name__
