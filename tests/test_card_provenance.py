"""The model card says what was measured (issue #34 item 4): the data the run scored (its eval file, or the synthetic
set and protocol), and sizes relative to the model the run started from (its recorded --teacher) unless --reference
says otherwise; with no reference at all, no self-comparison."""

import json

import pytest
import torch
import yaml

from modeling_efficientvlm import EfficientVLMForImageTextRetrieval, EfficientVLMForPreTraining
from modeling_efficientvlm.processing_efficientvlm import EfficientVLMProcessor, build_image_processor
from efficientvlm.training.commands.cli import main
from efficientvlm.training.data.tokenization import tokenizer_from_captions
from efficientvlm.training.infra.presets import tiny_bench_config
from efficientvlm.training.infra.runs import RUN_FILE
from tests.conftest import write_own_dataset

FAST = ["--image_size", "32", "--itm_k", "2", "--per_device_train_batch_size", "2", "--report_to", "none",
        "--use_cpu", "true", "--disable_tqdm", "true", "--max_steps", "1", "--save_strategy", "no"]


def _card(folder) -> tuple[dict, str]:
    text = (folder / "README.md").read_text()
    _, header, body = text.split("---", 2)
    return yaml.safe_load(header), body


@pytest.fixture
def own_run(tmp_path, monkeypatch):
    """data/ (ALBEF JSON), teacher/ (tiny, own-caption tokenizer), and student/: a 1-step distill run scored on
    data/test.json."""
    write_own_dataset(tmp_path)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    EfficientVLMForPreTraining(tiny_bench_config()).save_pretrained("teacher")
    EfficientVLMProcessor(build_image_processor(32), tokenizer_from_captions("data/train.json")).save_pretrained(
        "teacher")
    assert main(["distill", "--teacher", "teacher", "--dataset", "data/train.json", "--eval_dataset",
                 "data/test.json", "--image_root", "data", "--output_dir", "student", *FAST]) == 0
    return tmp_path


def test_card_of_an_own_data_run_names_its_data_and_its_teacher(own_run):
    record = json.loads((own_run / "student" / RUN_FILE).read_text())
    assert record["inputs"]["--teacher"] == str(own_run / "teacher")
    assert main(["export", "--model", "student", "--output_dir", "export"]) == 0
    meta, body = _card(own_run / "export")
    datasets = {r["dataset"]["name"] for entry in meta["model-index"] for r in entry["results"]}
    assert datasets == {"test.json"}
    assert "synthetic" not in json.dumps(meta)
    assert "on data/test.json: 4 images, 8 captions (in %)" in body
    # measured against the teacher the run started from: a half-depth student is well below 100 %
    assert "teacher (the run's --teacher)" in body and "(no reference)" not in body
    row = next(line for line in body.splitlines() if line.startswith("| export |"))
    share = float(row.split("(")[1].split("%")[0])
    assert share < 80
    structure = json.loads((own_run / "export" / "structure.json").read_text())
    assert structure["sparsity"]["total"] > 0.2


def test_reference_flag_wins_and_no_reference_means_no_self_comparison(own_run):
    assert main(["export", "--model", "student", "--reference", "student", "--output_dir", "self_ref"]) == 0
    assert "100.0% of student" in _card(own_run / "self_ref")[1]  # asked for explicitly
    (own_run / "student" / RUN_FILE).unlink()  # a plain model folder: nothing recorded
    assert main(["export", "--model", "student", "--output_dir", "bare"]) == 0
    _, body = _card(own_run / "bare")
    assert "(no reference)" in body and "No reference model was given" in body
    assert "0.0%" not in body and "100.0%" not in body
    assert json.loads((own_run / "bare" / "structure.json").read_text())["sparsity"] is None


def test_synthetic_runs_name_the_protocol(tmp_path):
    torch.manual_seed(0)
    EfficientVLMForPreTraining(tiny_bench_config()).save_pretrained(tmp_path / "teacher")
    assert main(["distill", "--teacher", str(tmp_path / "teacher"), "--eval_images", "4", "--output_dir",
                 str(tmp_path / "s"), *FAST]) == 0
    assert main(["export", "--model", str(tmp_path / "s"), "--output_dir", str(tmp_path / "e")]) == 0
    meta, body = _card(tmp_path / "e")
    names = {r["dataset"]["name"] for entry in meta["model-index"] for r in entry["results"]}
    assert names == {"efficientvlm-synthetic-scenes (twins protocol)"}
    assert "built-in synthetic scenes (twins protocol)" in body
