"""Every data file a stage reads is checked before its first training step (issue #34 item 1): a bad evaluation file
(missing image, unreadable image, missing field, empty list; VQA: no answer list) or an empty training set fails at
once with exit 2, naming the file and the record, for every task, and for teacher, distill and prune."""

import json
from pathlib import Path

import pytest
import torch
import transformers
from PIL import Image

from modeling_efficientvlm import EfficientVLMForPreTraining
from efficientvlm.training.commands.cli import main
from efficientvlm.training.commands.stages import DataArguments, load_processor
from efficientvlm.training.data.tokenization import build_tokenizer
from efficientvlm.training.infra.presets import tiny_bench_config
from efficientvlm.training.method.student import init_student_from_teacher

FAST = ["--per_device_train_batch_size", "2", "--use_cpu", "true", "--report_to", "none", "--save_strategy", "no",
        "--disable_tqdm", "true", "--itm_k", "2", "--max_steps", "1000"]
FIELD = {"retrieval": "caption", "captioning": "caption", "nlvr2": "sentence", "vqa": "question"}


def _record(task: str, index: int) -> dict:
    image = f"img/{index}.png"
    if task == "nlvr2":
        return {"images": [image, f"img/{index + 1}.png"], "sentence": "a red square", "label": index % 2}
    if task == "vqa":
        return {"question_id": index, "question": "what color is the square", "answer": ["red"], "image": image}
    return {"image": image, "caption": [f"a red square number {index}", "one red box"]}


def _write_data(root: Path, task: str) -> Path:
    """root/data: 6 PNGs, train.json and good.json in the task's format (VQA: + answer_list.json), a tokenizer."""
    data = root / "data"
    (data / "img").mkdir(parents=True)
    for index in range(7):
        Image.new("RGB", (32, 32), (40 * index, 0, 0)).save(data / "img" / f"{index}.png")
    (data / "train.json").write_text(json.dumps([_record(task, i) for i in range(4)]))
    (data / "good.json").write_text(json.dumps([_record(task, i) for i in range(4, 6)]))
    (data / "answer_list.json").write_text(json.dumps(["red", "blue"]))
    words = "a red square number one box what color is the blue 0 1 2 3 4 5".split()
    build_tokenizer(words, str(data / "tokenizer"))
    return data


def _bad_file(data: Path, task: str, case: str) -> tuple[Path, str]:
    """A bad evaluation file and what the error must say about it."""
    records = [_record(task, i) for i in range(4, 6)]
    image_key = "images" if task == "nlvr2" else "image"
    if case == "missing_image":
        if task == "nlvr2":
            records[1]["images"][0] = "img/nope.png"
        else:
            records[1]["image"] = "img/nope.png"
        expected = "record 1 field '" + ("images[0]" if task == "nlvr2" else "image") + "': missing image file"
    elif case == "unreadable_image":
        (data / "img" / "broken.png").write_bytes(b"not a png at all")
        if task == "nlvr2":
            records[1]["images"][1] = "img/broken.png"
        else:
            records[1]["image"] = "img/broken.png"
        expected = "record 1 field '" + ("images[1]" if task == "nlvr2" else "image") + "': unreadable image file"
    elif case == "missing_field":
        del records[1][FIELD[task]]
        expected = f"record 1 is missing field '{FIELD[task]}'"
    else:
        records = []
        expected = "holds no records"
    assert image_key in _record(task, 0)
    path = data / f"bad_{case}.json"
    path.write_text(json.dumps(records))
    return path, expected


@pytest.fixture
def no_training(monkeypatch):
    """Any call of Trainer.train fails the test: the checks must come before it."""

    def train(self, *args, **kwargs):
        raise AssertionError("training started before the data were checked")

    monkeypatch.setattr(transformers.Trainer, "train", train)


@pytest.mark.parametrize("case", ["missing_image", "unreadable_image", "missing_field", "empty"])
@pytest.mark.parametrize("task", ["retrieval", "nlvr2", "vqa", "captioning"])
def test_bad_evaluation_file_fails_before_training(tmp_path, capsys, no_training, task, case):
    data = _write_data(tmp_path, task)
    bad, expected = _bad_file(data, task, case)
    out = tmp_path / "out"
    code = main(["teacher", "--task", task, "--preset", "tiny", "--image_size", "32", "--tokenizer",
                 str(data / "tokenizer"), "--dataset", str(data / "train.json"), "--eval_dataset", str(bad),
                 "--image_root", str(data), "--output_dir", str(out), *FAST])
    err = capsys.readouterr().err
    assert code == 2, err
    assert str(bad) in err and expected in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not out.exists()  # nothing was written: no run marked failed


def test_vqa_evaluation_file_without_answer_list_fails_before_training(tmp_path, capsys, no_training):
    data = _write_data(tmp_path, "vqa")
    (data / "elsewhere").mkdir()
    bad = data / "elsewhere" / "test.json"
    bad.write_text((data / "good.json").read_text())
    code = main(["teacher", "--task", "vqa", "--preset", "tiny", "--image_size", "32", "--tokenizer",
                 str(data / "tokenizer"), "--dataset", str(data / "train.json"), "--eval_dataset", str(bad),
                 "--image_root", str(data), "--output_dir", str(tmp_path / "out"), *FAST])
    err = capsys.readouterr().err
    assert code == 2 and "answer_list.json" in err and str(bad) in err, err


@pytest.mark.parametrize("task", ["retrieval", "vqa"])
def test_empty_training_file_and_nothing_left_after_holdout_are_named(tmp_path, capsys, no_training, task):
    data = _write_data(tmp_path, task)
    empty = data / "empty.json"
    empty.write_text("[]")
    common = ["teacher", "--task", task, "--preset", "tiny", "--image_size", "32", "--tokenizer",
              str(data / "tokenizer"), "--image_root", str(data), "--output_dir", str(tmp_path / "out"), *FAST]
    assert main([*common, "--dataset", str(empty), "--eval_dataset", str(data / "good.json")]) == 2
    err = capsys.readouterr().err
    assert f"{empty}" in err and "holds no records" in err, err
    one = data / "one.json"
    one.write_text(json.dumps([_record(task, 0)]))  # its only image / question is held out for evaluation
    assert main([*common, "--dataset", str(one)]) == 2
    err = capsys.readouterr().err
    assert "needs at least 2 records" in err and "--eval_dataset" in err, err


@pytest.fixture
def checkpoints(tmp_path):
    torch.manual_seed(0)
    teacher = EfficientVLMForPreTraining(tiny_bench_config())
    processor = load_processor(DataArguments(image_size=32))
    processor.tokenizer = build_tokenizer("a red square number one box 0 1 2 3 4 5".split())
    for name, model in (("teacher", teacher), ("student", init_student_from_teacher(teacher))):
        model.save_pretrained(tmp_path / name)
        processor.save_pretrained(tmp_path / name)
    return tmp_path


@pytest.mark.parametrize("stage", ["distill", "prune"])
def test_distill_and_prune_check_the_evaluation_file_first(checkpoints, capsys, no_training, stage):
    data = _write_data(checkpoints / "d", "retrieval")
    bad, expected = _bad_file(data, "retrieval", "unreadable_image")
    models = (["--teacher", str(checkpoints / "teacher")] if stage == "distill" else
              ["--student", str(checkpoints / "student"), "--teacher", str(checkpoints / "teacher")])
    code = main([stage, *models, "--dataset", str(data / "train.json"), "--eval_dataset", str(bad),
                 "--image_root", str(data), "--output_dir", str(checkpoints / "out"), *FAST])
    err = capsys.readouterr().err
    assert code == 2 and str(bad) in err and expected in err, err
