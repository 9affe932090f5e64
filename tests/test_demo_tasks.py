"""`efficientvlm demo --task <task> --quick` for the tasks whose teacher is fine-tuned first (nlvr2, captioning, vqa): the
whole chain with a few steps per stage (students from the task teacher's layers by default; general distillation with
`--student_from distilled`), report.json with the task's metric per model, Hub-ready folders."""

import json
import os

import pytest

from efficientvlm.training.commands import demo
from efficientvlm.training.commands.cli import main
from efficientvlm.training.tasks import TASKS, get_task

pytestmark = pytest.mark.slow  # runs the demo for every task

MODELS = {"teacher", "student", "pruned", "pruned_no_kd", "pruned_uniform"}  # no student_no_kd: it would be the student
STEPS = {"teacher_fine_tune": 2, "student_fine_tune": 3, "prune": 3}
ARCHITECTURE = {"nlvr2": "EfficientVLMForVisualReasoning", "captioning": "EfficientVLMForConditionalGeneration",
                "vqa": "EfficientVLMForQuestionAnswering"}


def _run_demo(task: str, out) -> dict:
    """The quick demo with tiny step overrides, 8 held-out items and one timed run (the task's own quick profile
    otherwise, e.g. nlvr2's data level and its domain pre-training stage, cut to 2 steps)."""
    entry = {**demo.TASK_PROFILES.get(task, {}).get("quick", {}), "eval_images": 8, "latency_repeats": 1}
    if entry.get("domain_steps"):
        entry["domain_steps"] = 2
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(demo.TASK_PROFILES, task, {"quick": entry})
        assert main(["demo", "--task", task, "--quick", "--output_dir", str(out), "--task_teacher_steps", "2",
                     "--prune_steps", "3"]) == 0
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module", params=sorted(ARCHITECTURE))
def task_demo(request, tmp_path_factory):
    task = request.param
    if task not in TASKS:
        pytest.skip(f"task {task!r} is not registered in training/tasks/__init__.py yet")
    out = tmp_path_factory.mktemp(f"demo_{task}") / "run"
    return task, out, _run_demo(task, out)


def test_report_has_the_task_metric_per_model(task_demo):
    task, _, report = task_demo
    metric, models = get_task(task).metric, report["models"]
    assert set(models) == MODELS  # the task teacher, the students and pruned models with and without KD, uniform
    assert "pruned_no_kd" in report["protocol"]["baselines"] and "uniform" in report["protocol"]["baselines"]
    assert report["protocol"]["student_from"] == "task_teacher"
    assert (report["protocol"]["task"], report["protocol"]["metric"]) == (task, metric)
    for name, entry in models.items():
        for key in ("params", metric, "latency_ms", "speedup", "speedup_min", "speedup_max", "sparsity_vs_teacher",
                    "structure", f"{metric}_fraction_of_teacher"):
            assert key in entry, f"{name}: {key}"
        assert entry[metric] >= 0  # percent; CIDEr may exceed 100
        assert entry["data"].get("items", entry["data"].get("images")) == 8  # the held-out set of the profile
    assert models["teacher"]["speedup"] == 1.0
    # (a teacher fine-tuned for 2 steps may score 0 on 8 VQA questions: its share of itself is then 0 / 0 → 0)
    assert models["teacher"][f"{metric}_fraction_of_teacher"] == (1.0 if models["teacher"][metric] > 0 else 0.0)
    # half depth, then materialized: the pruned model is physically smaller than its unpruned student
    assert models["pruned"]["params"] < models["student"]["params"] < models["teacher"]["params"]
    sparsity = models["pruned"]["sparsity_vs_student"]
    parts = {"vision", "text", "fusion", "total"} | ({"decoder"} if task == "vqa" else set())  # VQA: answer decoder
    assert set(sparsity) == parts and sparsity["total"] > 0
    assert set(models["pruned"]["expected_sparsity_at_export"]) == parts
    assert "sparsity_vs_student" not in models["student"]
    assert models["pruned_uniform"]["params"] < models["student"]["params"]
    for name, entry in models.items():  # the metric's 95 % interval over the held-out items brackets the metric
        low, high = entry[f"{metric}_ci95"]
        assert low <= entry[metric] + 1e-9 and entry[metric] - 1e-9 <= high, name
    blind = report["blind_baseline"]  # the predictor that never looks at the image, on the same held-out items
    assert 0 <= blind[metric] and blind["what"]
    assert set(report["paired"]) == {"pruned_kd_minus_no_kd", "pruned_learned_minus_uniform"}
    for name, (a, b) in [(name, pair) for name, pair in demo.PAIRED.items() if name in report["paired"]]:  # paired: mean(a) − mean(b) on the same items, inside its interval
        difference = report["paired"][name]
        assert difference["mean"] == pytest.approx(models[a][metric] - models[b][metric], abs=1e-6)
        assert difference["ci95"][0] <= difference["mean"] + 1e-9 <= difference["ci95"][1] + 2e-9


def test_report_says_how_each_model_was_made(task_demo):
    task, out, report = task_demo
    protocol = report["protocol"]
    domain = demo.demo_profile(task, quick=True).get("domain_task")
    assert protocol["steps"] == ({**STEPS, "domain": 2} if domain else STEPS) and protocol["profile"] == "quick"
    if domain:  # the task teacher is fine-tuned from the domain pre-training run, which reports its own metric
        record = report["teacher_provenance"]["domain_pretraining"]
        assert record["task"] == domain and record["steps"] == 2 and record["data"]["items"] == 8
        assert 0 <= record[get_task(domain).metric] <= 100 and "domain" in report["stage_seconds"]
    # pruning: the task's official λ and cross-attention KD, the gates at least as fast as the demo's schedule needs
    official = get_task(task).prune_defaults
    settings = protocol["prune_settings"]
    assert settings["lambda_vlp"] == official["lambda_vlp"]
    assert settings["cross_attention_kd"] == official["cross_attention_kd"]
    assert settings["reg_learning_rate"] == max(official["reg_learning_rate"], demo.DEMO_REG_LR)
    provenance = report["teacher_provenance"]
    assert f"fine-tuned for {task}" in provenance["source"] and provenance["fine_tune_steps"] == 2
    assert provenance["pretrained"]["source"].endswith("demo_teacher")  # the shipped pre-training teacher
    assert get_task(task).workload_text(demo._demo_data(demo.PROFILES["quick"], task), 8) in protocol["latency"]
    assert {"teacher", "init_student", "student", "pruned", "pruned_no_kd", "pruned_uniform", "pruned_eval",
            "latency"} <= set(report["stage_seconds"])
    assert not any(stage.startswith("distill") for stage in report["stage_seconds"])  # no general distillation
    assert "every other layer of the task teacher" in (out / "pruned" / "README.md").read_text()  # where it started


def test_hub_ready_folders_hold_the_task_models(task_demo):
    task, out, report = task_demo
    assert not (out / "checkpoints").exists()  # the intermediate runs are removed
    for name in MODELS:
        folder = out / name
        for file in ("model.safetensors", "config.json", "README.md", "structure.png", "processor_config.json",
                     "modeling_efficientvlm.py", "pipeline_efficientvlm.py"):
            assert (folder / file).exists(), f"{name}/{file}"
        card = (folder / "README.md").read_text()
        assert get_task(task).card.tag in card and f"EfficientVLM demo {name.replace('_', ' ')}" in card
        # each folder is the task's model, rebuilt by its config alone (the pruned one: materialized sizes)
        model = get_task(task).model_class.from_pretrained(str(folder))
        assert type(model).__name__ == ARCHITECTURE[task]
        assert sum(p.numel() for p in model.parameters()) == report["models"][name]["params"]
    pruned, student = (json.loads((out / name / "config.json").read_text()) for name in ("pruned", "student"))
    widths = [sum(sum(config[key]["intermediate_size"]) for key in ("vision_config", "text_config",
                                                                    "fusion_encoder_config"))
              for config in (pruned, student)]
    assert widths[0] < widths[1]


@pytest.mark.parametrize("task_demo", ["nlvr2"], indirect=True)  # one task is enough for the loading path
def test_a_given_task_teacher_is_loaded_not_fine_tuned(task_demo, tmp_path):
    """`--task_teacher FOLDER` (the shipped task teacher by default): no teacher stage runs, the report names the
    folder and scores the same teacher; `--student_from distilled`: the paper's chain, general distillation from the
    pre-training teacher before the task."""
    task, out, report = task_demo
    again = tmp_path / "again"
    entry = {**demo.TASK_PROFILES[task]["quick"], "eval_images": 8, "latency_repeats": 1}
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(demo.TASK_PROFILES, task, {"quick": entry})
        assert main(["demo", "--task", task, "--quick", "--output_dir", str(again), "--task_teacher",
                     str(out / "teacher"), "--baselines", "false", "--student_from", "distilled", "--distill_steps",
                     "2", "--prune_steps", "3"]) == 0
    second = json.loads((again / "report.json").read_text())
    assert set(second["models"]) == {"teacher", "student", "pruned"}
    assert second["teacher_provenance"]["source"] == str(out / "teacher")
    assert "teacher" not in second["stage_seconds"] and "domain" not in second["stage_seconds"]
    assert "distill_student" in second["stage_seconds"] and "init_student" not in second["stage_seconds"]
    assert second["protocol"]["student_from"] == "distilled"
    assert second["protocol"]["steps"] == {"distill": 2, "student_fine_tune": 3, "prune": 3}
    assert "general distillation" in (again / "student" / "README.md").read_text()
    metric = get_task(task).metric
    assert second["models"]["teacher"][metric] == pytest.approx(report["models"]["teacher"][metric])
    assert "make task-teachers" in (again / "teacher" / "README.md").read_text()


def test_the_task_teacher_defaults_to_the_shipped_folder(tmp_path):
    """Without --task_teacher the demo takes the shipped task teacher when there is one; --task_teacher_steps or
    --train_teacher fine-tune one in the run instead; a folder that is no checkpoint is refused by name."""
    from efficientvlm.training.commands.demo import DemoArguments, task_teacher_dir

    for task in ("nlvr2", "vqa", "captioning"):
        shipped = os.path.isfile(os.path.join(task_teacher_dir(task), "config.json"))
        assert DemoArguments(task=task).task_teacher == (task_teacher_dir(task) if shipped else "")
        assert DemoArguments(task=task, task_teacher_steps=5).task_teacher == ""
    assert DemoArguments(task="retrieval").task_teacher == ""
    with pytest.raises(ValueError, match="--task_teacher .*not a checkpoint folder"):
        DemoArguments(task="vqa", task_teacher=str(tmp_path))
