"""Stages never overwrite silently (issue #34 item 2): an --output_dir that is (or holds) one of the stage's inputs is
always refused; one holding a complete run or a model is refused unless --overwrite (or --resume_from_checkpoint);
`demo` refuses an existing folder unless --overwrite."""

import json
import os

import pytest

from modeling_efficientvlm import EfficientVLMForImageTextRetrieval
from efficientvlm.training.commands.cli import main
from efficientvlm.training.infra.presets import tiny_bench_config
from efficientvlm.training.infra.runs import RUN_FILE, OutputDirExistsError, check_output_dir
from tests.conftest import save_tiny_teacher_and_student

FAST = ["--image_size", "32", "--eval_images", "4", "--itm_k", "2", "--per_device_train_batch_size", "2",
        "--report_to", "none", "--use_cpu", "true", "--disable_tqdm", "true", "--max_steps", "1",
        "--save_strategy", "no"]


@pytest.fixture
def models(tmp_path):
    return save_tiny_teacher_and_student(tmp_path)


def _weights(folder) -> bytes:
    return (folder / "model.safetensors").read_bytes()


def test_a_stage_never_writes_into_its_own_input(models, capsys):
    before = _weights(models / "teacher")
    assert main(["distill", "--teacher", str(models / "teacher"), "--output_dir", str(models / "teacher"),
                 *FAST]) == 2
    err = capsys.readouterr().err
    assert f"--output_dir {models / 'teacher'} is the --teacher {models / 'teacher'}" in err, err
    assert main(["distill", "--teacher", str(models / "teacher"), "--output_dir", str(models / "teacher"),
                 "--overwrite", "true", *FAST]) == 2  # --overwrite does not make it right
    # a folder that holds an input (checkpoint rotation or --overwrite could remove it) is refused as well
    assert main(["prune", "--student", str(models / "student"), "--teacher", str(models / "teacher"),
                 "--output_dir", str(models), *FAST]) == 2
    assert "holds the --student" in capsys.readouterr().err
    assert _weights(models / "teacher") == before and not (models / "teacher" / RUN_FILE).exists()


def test_a_complete_run_is_replaced_only_with_overwrite(models, capsys):
    out = models / "t"
    command = ["teacher", "--preset", "tiny", "--output_dir", str(out), *FAST]
    assert main(command) == 0
    first = _weights(out)
    capsys.readouterr()
    assert main(command) == 2
    err = capsys.readouterr().err
    assert f"{out} holds a complete `efficientvlm teacher` run" in err and "--overwrite true" in err, err
    assert _weights(out) == first
    assert main([*command, "--overwrite", "true", "--seed", "1"]) == 0
    assert _weights(out) != first and json.loads((out / RUN_FILE).read_text())["status"] == "complete"


def test_a_model_folder_without_run_record_is_refused_unless_overwrite(models, capsys):
    export = models / "export"
    EfficientVLMForImageTextRetrieval(tiny_bench_config()).save_pretrained(export)
    command = ["distill", "--teacher", str(models / "teacher"), "--output_dir", str(export), *FAST]
    assert main(command) == 2
    assert "holds a model (config.json and weights, no run record)" in capsys.readouterr().err
    assert main([*command, "--overwrite", "true"]) == 0


def test_stale_files_of_the_replaced_run_are_removed(models):
    out = models / "s"
    command = ["distill", "--teacher", str(models / "teacher"), "--output_dir", str(out), *FAST]
    assert main(command) == 0 and (out / "eval_results.json").exists()
    (out / "eval_results.json").write_text('{"r_mean": 99}')  # as if a run had evaluated ...
    record = json.loads((out / RUN_FILE).read_text())
    # ... and a rerun does not evaluate: its old metrics must not stay beside the new weights
    from efficientvlm.training.commands import stages

    real = stages.evaluate_model
    stages.evaluate_model = lambda *a, **k: {"r_mean": 1.0}
    try:
        assert main([*command, "--overwrite", "true"]) == 0
    finally:
        stages.evaluate_model = real
    assert json.loads((out / "eval_results.json").read_text()) == {"r_mean": 1.0}
    assert "eval_results.json" in record["files"]


def test_resume_from_checkpoint_continues_a_complete_run(models):
    out = models / "r"
    command = ["distill", "--teacher", str(models / "teacher"), "--output_dir", str(out), *FAST[:-2],
               "--save_strategy", "steps", "--save_steps", "1"]
    assert main(command) == 0 and (out / "checkpoint-1").is_dir()
    command[command.index("--max_steps") + 1] = "2"
    assert main([*command, "--resume_from_checkpoint", str(out / "checkpoint-1")]) == 0
    assert (out / "checkpoint-2").is_dir()


def test_check_output_dir_rules(tmp_path):
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / RUN_FILE).write_text(json.dumps({"stage": "prune", "status": "complete"}))
    with pytest.raises(OutputDirExistsError, match="--overwrite true"):
        check_output_dir(str(tmp_path / "done"), "prune")
    check_output_dir(str(tmp_path / "done"), "prune", overwrite=True)
    check_output_dir(str(tmp_path / "done"), "prune", resume=True)
    (tmp_path / "failed").mkdir()  # an unfinished run may always be rerun into its folder
    (tmp_path / "failed" / RUN_FILE).write_text(json.dumps({"stage": "prune", "status": "failed"}))
    check_output_dir(str(tmp_path / "failed"), "prune")
    link = tmp_path / "link"
    os.symlink(tmp_path / "done", link)  # realpaths are compared
    with pytest.raises(ValueError, match="is the --teacher"):
        check_output_dir(str(link), "distill", {"--teacher": str(tmp_path / "done")}, overwrite=True)


def test_demo_refuses_an_existing_folder_without_overwrite(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "report.json").write_text("{}")
    assert main(["demo", "--quick", "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out} exists; pass --overwrite true" in err and len(err.strip().splitlines()) == 1
    assert (out / "report.json").read_text() == "{}"


@pytest.mark.slow
def test_demo_reruns_into_its_folder_with_overwrite(tmp_path):
    out = tmp_path / "demo"
    leftover = out / "checkpoints" / "student"  # a stopped demo's finished stage: the rerun must not trip over it
    leftover.mkdir(parents=True)
    (leftover / RUN_FILE).write_text(json.dumps({"stage": "distill", "status": "complete", "files": []}))
    steps = ["--quick", "--distill_steps", "2", "--prune_steps", "3", "--baselines", "false", "--output_dir", str(out)]
    assert main(["demo", *steps, "--overwrite", "true"]) == 0
    assert (out / "report.json").exists() and not (out / "checkpoints").exists()
    assert main(["demo", *steps, "--overwrite", "true"]) == 0
