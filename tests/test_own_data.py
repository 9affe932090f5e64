"""Your own data (README "Train on your own data"): the README's commands run as written on generated images; presets
fit the tokenizer and image size; tokenizer / embedding mismatches are clear errors; a JSON without a test set holds
out part of its images."""

import json
import re
import shlex
from pathlib import Path

import pytest

from efficientvlm.training.commands.cli import main
from efficientvlm.training.infra.presets import preset_config
from efficientvlm.training.commands.stages import (
    DataArguments,
    TeacherArguments,
    describe_eval_data,
    eval_set,
    teacher_config,
)
from efficientvlm.training.data.holdout import holdout_indices, holdout_size
from efficientvlm.training.data.tokenization import build_tokenizer, tokenizer_from_captions
from efficientvlm.training.tasks import get_task
from tests.conftest import write_own_dataset

README = Path(__file__).resolve().parents[1] / "README.md"
FAST = ["--per_device_train_batch_size", "4", "--use_cpu", "true", "--report_to", "none", "--save_strategy", "no",
        "--disable_tqdm", "true", "--itm_k", "2"]


def readme_commands() -> list[str]:
    """The shell commands between the README's own-data markers (continuation lines joined)."""
    text = README.read_text()
    block = re.search(r"<!-- own-data-commands -->\s*```bash\n(.*?)```\s*<!-- /own-data-commands -->", text, re.S)
    assert block, "README.md lost its <!-- own-data-commands --> block"
    return [line for line in block.group(1).replace("\\\n", " ").splitlines() if line.strip()]


def run_command(line: str, steps: int) -> None:
    """Runs one README line: `python -c CODE` in this process, `efficientvlm ...` through the CLI's main()."""
    words = shlex.split(line)
    if words[:2] == ["python", "-c"]:
        exec(words[2], {})  # noqa: S102 - the README's own snippet
        return
    assert words[0] == "efficientvlm", line
    if "--max_steps" in words:  # a few steps instead of the README's 300, on one thread
        words[words.index("--max_steps") + 1] = str(steps)
        words += FAST
    elif words[1] == "evaluate":
        words += ["--itm_k", "2"]
    assert main(words[1:]) == 0, line


def test_readme_commands_train_export_and_evaluate_on_your_own_json(tmp_path, monkeypatch, capsys):
    write_own_dataset(tmp_path)
    monkeypatch.chdir(tmp_path)
    commands = readme_commands()
    assert [shlex.split(c)[1] if c.startswith("efficientvlm") else "python" for c in commands] == [
        "python", "teacher", "distill", "prune", "export", "evaluate"]
    for line in commands:
        capsys.readouterr()
        run_command(line, steps=2)
    scored = json.loads(capsys.readouterr().out)  # what `evaluate` printed
    assert scored["data"]["source"] == str((tmp_path / "data" / "test.json").resolve())
    assert (scored["data"]["images"], scored["data"]["captions"]) == (4, 8)
    assert 0 <= scored["r_mean"] <= 100
    for stage in ("teacher", "student", "pruned"):  # every stage evaluated on the test file, not synthetic scenes
        saved = json.loads((tmp_path / "out" / stage / "eval_results.json").read_text())
        assert saved["data"]["description"] == "data/test.json: 4 images, 8 captions"
    teacher = json.loads((tmp_path / "out" / "teacher" / "config.json").read_text())
    assert teacher["text_config"]["vocab_size"] == len(tokenizer_from_captions("data/train.json"))


# ------------------------------------------------------------------------------- presets fit tokenizer and image size
@pytest.mark.parametrize("preset", ["tiny", "xvlm-clip", "demo"])
def test_every_preset_takes_the_tokenizer_vocabulary_and_image_size(preset):
    config = teacher_config(TeacherArguments(preset=preset), DataArguments(image_size=64), vocab_size=30_522)
    assert config.text_config.vocab_size == 30_522 and config.vision_config.image_size == 64


def test_an_image_size_the_patch_does_not_divide_names_the_flags(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"--image_size 36 does not fit --preset tiny: .* 8-pixel patch size"):
        preset_config("tiny", 36, 99)
    assert main(["teacher", "--preset", "tiny", "--image_size", "36", "--output_dir", str(tmp_path / "t"),
                 "--max_steps", "1", *FAST]) == 2
    error = capsys.readouterr().err
    assert "--image_size 36" in error and "interpolate_pos_encoding" not in error


def test_tiny_preset_trains_with_a_tokenizer_larger_than_its_default_vocabulary(tmp_path):
    """The tiny preset's own vocabulary is 99 tokens: a 150-token tokenizer used to end in an IndexError."""
    write_own_dataset(tmp_path, n_train=4, n_test=2)
    build_tokenizer([f"word{i}" for i in range(145)], str(tmp_path / "tok"))
    data = tmp_path / "data"
    assert main(["teacher", "--preset", "tiny", "--tokenizer", str(tmp_path / "tok"), "--dataset",
                 str(data / "train.json"), "--eval_dataset", str(data / "test.json"), "--image_root", str(data),
                 "--output_dir", str(tmp_path / "t"), "--max_steps", "1", *FAST]) == 0
    config = json.loads((tmp_path / "t" / "config.json").read_text())
    assert config["text_config"]["vocab_size"] == 150 and config["vision_config"]["image_size"] == 64


def test_json_dataset_without_a_tokenizer_is_refused(tmp_path, capsys):
    write_own_dataset(tmp_path, n_train=2, n_test=1)
    assert main(["teacher", "--preset", "tiny", "--dataset", str(tmp_path / "data" / "train.json"),
                 "--output_dir", str(tmp_path / "t"), "--max_steps", "1", *FAST]) == 2
    assert "--tokenizer is required with JSON data" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ held out from the JSON
def test_holdout_is_deterministic_bounded_and_needs_two_records():
    assert holdout_indices(50, 0.1, 1000, seed=3) == holdout_indices(50, 0.1, 1000, seed=3)
    assert holdout_indices(50, 0.1, 1000, seed=3) != holdout_indices(50, 0.1, 1000, seed=4)
    assert (holdout_size(50, 0.1, 1000), holdout_size(3, 0.1, 1000), holdout_size(10_000, 0.1, 500)) == (5, 1, 500)
    with pytest.raises(ValueError, match="at least 2 records, the dataset has 1"):
        holdout_size(1, 0.1, 1000)


def test_retrieval_trains_on_the_rest_and_evaluates_on_the_held_out_images(tmp_path):
    write_own_dataset(tmp_path, n_train=20, n_test=1)
    root = tmp_path / "data"
    data = DataArguments(dataset=str(root / "train.json"), image_root=str(root), tokenizer="unused")
    held = holdout_indices(20, data.holdout_fraction, data.holdout_max, data.eval_seed)
    train, _ = get_task("retrieval").train_data(data, None, 0, False)
    trained = {Path(p).name for p in train["image"]}
    assert len(held) == 2 and trained == {f"{i}.png" for i in range(20) if i not in held}
    held_out = eval_set(data)
    assert len(held_out["images"]) == 2 and len(held_out["captions"]) == 4
    described = describe_eval_data(data, held_out)
    assert "held out from training (--holdout_fraction 0.1" in described["description"]
    assert described["images"] == 2


def test_nlvr2_holds_out_items_of_its_json(tmp_path):
    write_own_dataset(tmp_path, n_train=2, n_test=1)
    root = tmp_path / "data"
    items = [{"images": ["img/0.png", "img/1.png"], "sentence": f"statement {i}", "label": i % 2} for i in range(10)]
    (root / "nlvr2.json").write_text(json.dumps(items))
    data = DataArguments(task="nlvr2", dataset=str(root / "nlvr2.json"), image_root=str(root))
    train, _ = get_task("nlvr2").train_data(data, None, 0, False)
    held_out = eval_set(data)
    assert len(held_out) == 1 and len(train) == 9
    assert held_out[0]["sentence"] not in set(train["sentence"])
    assert describe_eval_data(data, held_out)["items"] == 1


def test_teacher_without_eval_dataset_reports_the_held_out_images(tmp_path, capsys):
    write_own_dataset(tmp_path, n_train=8, n_test=1)
    root = tmp_path / "data"
    tokenizer_from_captions(str(root / "train.json"), str(tmp_path / "tok"))
    capsys.readouterr()
    assert main(["teacher", "--preset", "tiny", "--image_size", "32", "--tokenizer", str(tmp_path / "tok"),
                 "--dataset", str(root / "train.json"), "--image_root", str(root), "--output_dir",
                 str(tmp_path / "t"), "--max_steps", "1", *FAST]) == 0
    lines = capsys.readouterr().out.splitlines()  # the Trainer's summary line, then the stage's metrics
    printed = json.loads("\n".join(lines[max(i for i, line in enumerate(lines) if line == "{"):]))
    assert printed["data"]["images"] == 1 and "held out from training" in printed["data"]["description"]
