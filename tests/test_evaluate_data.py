"""`efficientvlm evaluate` scores the data it is pointed at, with the checkpoint's tokenizer and image size, says which
data it scored, and its --help lists only what evaluation reads; a tokenizer larger than a model's embedding is a
clear error in every stage that meets one."""

import json

import pytest
import torch

from efficientvlm.training.commands.cli import main
from efficientvlm.training.commands.stages import check_vocab
from efficientvlm.training.data.tokenization import build_tokenizer, tokenizer_from_captions
from modeling_efficientvlm import EfficientVLMForImageTextRetrieval
from modeling_efficientvlm.processing_efficientvlm import EfficientVLMProcessor, build_image_processor
from tests.conftest import tiny_config
from tests.conftest import write_own_dataset


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """root/data (8 train + 4 test images), root/ckpt (tiny 32-px model + processor with a caption tokenizer),
    root/bare (the same model without a processor) and root/big_tok (a 150-token tokenizer; the model has 99 rows)."""
    root = tmp_path_factory.mktemp("evaluate")
    write_own_dataset(root)
    torch.manual_seed(0)
    model = EfficientVLMForImageTextRetrieval(tiny_config())
    for name in ("ckpt", "bare"):
        model.save_pretrained(root / name)
    tokenizer = tokenizer_from_captions(str(root / "data" / "train.json"))
    EfficientVLMProcessor(build_image_processor(32), tokenizer).save_pretrained(root / "ckpt")
    build_tokenizer([f"word{i}" for i in range(145)], str(root / "big_tok"))
    return root


def _printed(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("flag", ["--dataset", "--eval_dataset"])
def test_evaluate_scores_the_json_it_is_given_and_says_so(setup, capsys, flag):
    test_json = setup / "data" / "test.json"
    capsys.readouterr()
    assert main(["evaluate", "--model", str(setup / "ckpt"), flag, str(test_json), "--image_root",
                 str(setup / "data"), "--itm_k", "2"]) == 0
    data = _printed(capsys)["data"]
    assert data["source"] == str(test_json.resolve()) and (data["images"], data["captions"]) == (4, 8)
    assert data["description"] == f"{test_json}: 4 images, 8 captions"


def test_evaluate_refuses_two_different_files(setup, capsys):
    data = setup / "data"
    assert main(["evaluate", "--model", str(setup / "ckpt"), "--dataset", str(data / "test.json"),
                 "--eval_dataset", str(data / "train.json"), "--image_root", str(data)]) == 2
    error = capsys.readouterr().err
    assert "--dataset" in error and "--eval_dataset" in error and "differ" in error


def test_synthetic_scenes_take_the_checkpoint_image_size_without_a_saved_processor(setup, capsys):
    """The bare checkpoint is 32 px; --image_size used to default to 64 and the 64-px inputs failed."""
    capsys.readouterr()
    assert main(["evaluate", "--model", str(setup / "bare"), "--eval_images", "4", "--eval_seed", "7",
                 "--itm_k", "2"]) == 0
    printed = _printed(capsys)
    assert printed["data"]["description"] == ("built-in synthetic scenes (twins protocol), 4 images, 20 "
                                                     "captions, seed 7, 32 px")
    assert printed["data"]["source"] == "synthetic" and 0 <= printed["r_mean"] <= 100


def test_evaluate_help_lists_only_what_evaluation_reads(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = capsys.readouterr().out
    for flag in ("--model", "--dataset", "--eval_dataset", "--tokenizer", "--image_size", "--itm_k", "--eval_seed"):
        assert flag in text
    for flag in ("--mlm_probability", "--max_masks", "--holdout_fraction", "--learning_rate", "--max_steps"):
        assert flag not in text


def test_check_vocab_names_both_sizes():
    processor = EfficientVLMProcessor(build_image_processor(32), build_tokenizer([f"w{i}" for i in range(145)]))
    with pytest.raises(ValueError, match=r"distill --teacher t: the tokenizer has 150 tokens but .* only 99"):
        check_vocab(tiny_config(), processor, "distill --teacher t")
    check_vocab(tiny_config(text=dict(vocab_size=150)), processor, "fits")  # equal sizes are fine


@pytest.mark.parametrize("command", [
    ["evaluate", "--model", "{ckpt}"],
    ["teacher", "--init_from", "{ckpt}", "--output_dir", "{out}/t", "--max_steps", "1"],
    ["distill", "--teacher", "{ckpt}", "--output_dir", "{out}/s", "--max_steps", "1"],
    ["prune", "--student", "{ckpt}", "--teacher", "{ckpt}", "--output_dir", "{out}/p", "--max_steps", "1"],
])
def test_every_stage_refuses_a_tokenizer_larger_than_the_embedding(setup, tmp_path, capsys, command):
    argv = [part.format(ckpt=setup / "ckpt", out=tmp_path) for part in command]
    argv += ["--tokenizer", str(setup / "big_tok"), "--force_tokenizer", "true"]  # forced, but still too large
    assert main([*argv, "--use_cpu", "true"] if command[0] != "evaluate" else argv) == 2
    error = capsys.readouterr().err
    assert "the tokenizer has 150 tokens but the model's text embedding has only 99" in error
    assert f"{command[0]} --" in error  # names the stage and the checkpoint flag
