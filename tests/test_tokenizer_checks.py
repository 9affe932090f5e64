"""Tokenizer mistakes fail at once or warn (issue #34 item 3): a mistyped local --tokenizer path is named, not taken
for a Hub repo; a --tokenizer other than the one saved with the model is refused unless --force_tokenizer; texts
that are mostly [UNK] make the processor (and so the pipelines) warn once."""

import logging
import time

import pytest
import torch

from modeling_efficientvlm import EfficientVLMForImageTextRetrieval
from modeling_efficientvlm.processing_efficientvlm import EfficientVLMProcessor, build_image_processor
from efficientvlm.training.commands.cli import main
from efficientvlm.training.data.tokenization import build_tokenizer, check_tokenizer_source, tokenizer_from_captions
from efficientvlm.training.infra.presets import tiny_bench_config
from tests.conftest import write_own_dataset

DEMO_TEACHER = "training/assets/demo_teacher"


@pytest.fixture
def own(tmp_path, monkeypatch):
    write_own_dataset(tmp_path)
    monkeypatch.chdir(tmp_path)
    tokenizer_from_captions("data/train.json", "data/tokenizer")
    return tmp_path


@pytest.mark.parametrize("value", ["data/tokenizr", "./tok", "data/a/b", "../nowhere-tok", "/no/such/tok"])
def test_a_mistyped_local_tokenizer_path_fails_at_once_naming_it(own, capsys, monkeypatch, value):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # were it taken for a Hub id, this would be slow
    start = time.monotonic()
    code = main(["teacher", "--preset", "tiny", "--image_size", "32", "--tokenizer", value, "--dataset",
                 "data/train.json", "--image_root", "data", "--output_dir", "out", "--max_steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and f"--tokenizer {value}: no such folder" in err, err
    assert time.monotonic() - start < 20


def test_hub_ids_stay_hub_ids_unless_offline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    check_tokenizer_source("bert-base-uncased")  # no local look-alike: left to from_pretrained
    check_tokenizer_source("google/bert_uncased_L-2_H-128_A-2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="bert-base-uncased: no such local folder, and HF_HUB_OFFLINE is set"):
        check_tokenizer_source("bert-base-uncased")
    (tmp_path / "tok").mkdir()
    check_tokenizer_source(str(tmp_path / "tok"))  # an existing folder is always fine
    (tmp_path / "vocab.txt").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        check_tokenizer_source(str(tmp_path / "vocab.txt"))


def test_evaluate_refuses_another_tokenizer_unless_forced(own, capsys):
    torch.manual_seed(0)
    EfficientVLMForImageTextRetrieval(tiny_bench_config()).save_pretrained("model")
    EfficientVLMProcessor(build_image_processor(32), tokenizer_from_captions("data/train.json")).save_pretrained(
        "model")
    build_tokenizer(["red", "circle"], "small_tok")  # a smaller, different vocabulary: ids mean other words
    capsys.readouterr()
    command = ["evaluate", "--model", "model", "--dataset", "data/test.json", "--image_root", "data", "--itm_k", "2"]
    assert main([*command, "--tokenizer", "small_tok"]) == 2
    err = capsys.readouterr().err
    assert "--tokenizer small_tok" in err and "not the tokenizer saved with model" in err
    assert "--force_tokenizer true" in err and len(err.strip().splitlines()) == 1, err
    assert main([*command, "--tokenizer", "small_tok", "--force_tokenizer", "true"]) == 0
    assert main([*command, "--tokenizer", "data/tokenizer"]) == 0  # the same vocabulary is fine


def test_mostly_unknown_text_warns_once(caplog):
    processor = EfficientVLMProcessor.from_pretrained(DEMO_TEACHER)
    with caplog.at_level(logging.WARNING, logger="modeling_efficientvlm.processing_efficientvlm"):
        processor(text="a red circle left of a blue square")  # the demo's own words: no warning
        assert not caplog.records
        processor(text=["a red circle", "an orange cat looking at the camera"])
        processor(text="an orange cat looking at the camera")
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings
    assert "6 of 7 tokens of 'an orange cat looking at the camera' are unknown" in warnings[0]
