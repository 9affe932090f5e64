"""Weights that do not fit their config.json are refused by `from_pretrained` (issue #34 item 7); whole heads may be
missing (initialised) or extra (dropped); a new box head is not reported; weight files are 0644 (item 11)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat

import pytest

import modeling_efficientvlm as m
from modeling_efficientvlm.modeling_efficientvlm import CheckpointMismatchError, unfitting_weights
from tests.conftest import run_clean_python, tiny_config

ALL_CLASSES = (m.EfficientVLMModel, m.EfficientVLMForImageTextRetrieval, m.EfficientVLMForPreTraining,
               m.EfficientVLMForVisualReasoning, m.EfficientVLMForQuestionAnswering,
               m.EfficientVLMForConditionalGeneration)
DEMO_TEACHER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "training", "assets",
                            "demo_teacher")


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def load_reports():
    """Warnings of transformers' loader (its LOAD REPORT tables) while the test runs."""
    handler, log = _Records(), logging.getLogger("transformers.modeling_utils")
    log.addHandler(handler)
    yield handler.messages
    log.removeHandler(handler)


def _save(model_cls, folder, config=None):
    model_cls(config or tiny_config()).save_pretrained(folder)
    return str(folder)


def _edit_config(folder, encoder: str, layers: int) -> None:
    """Sets `encoder`'s layer count in config.json, cutting or extending its per-layer lists to match."""
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    sub = config[encoder]
    old = sub["num_hidden_layers"]
    sub["num_hidden_layers"] = layers
    for key, value in list(sub.items()):
        if isinstance(value, list) and len(value) == old:
            sub[key] = (value + value[-1:] * layers)[:layers]
    with open(path, "w") as f:
        json.dump(config, f)


@pytest.mark.parametrize("model_cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_every_class_loads_a_pretraining_checkpoint(tmp_path, model_cls, load_reports):
    folder = _save(m.EfficientVLMForPreTraining, tmp_path)
    model = model_cls.from_pretrained(folder)
    assert isinstance(model, model_cls)
    if model_cls is not m.EfficientVLMModel:  # dropping the heads it lacks: documented, not reported
        assert not any("LOAD REPORT" in message for message in load_reports), load_reports


@pytest.mark.parametrize("model_cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_every_class_loads_a_retrieval_checkpoint(tmp_path, model_cls):
    folder = _save(m.EfficientVLMForImageTextRetrieval, tmp_path)
    assert isinstance(model_cls.from_pretrained(folder), model_cls)  # new heads (MLM, box, NLVR, decoder) initialised


def test_new_box_head_is_quiet_other_new_heads_are_reported(tmp_path, load_reports):
    config = tiny_config()
    teacher = m.EfficientVLMForPreTraining(config)
    state = {k: v for k, v in teacher.state_dict().items() if not k.startswith("bbox_head.")}
    teacher.save_pretrained(tmp_path, state_dict=state)
    m.EfficientVLMForPreTraining.from_pretrained(tmp_path)
    assert not any("bbox_head" in message for message in load_reports), load_reports
    folder = _save(m.EfficientVLMForImageTextRetrieval, tmp_path / "retrieval")
    m.EfficientVLMForPreTraining.from_pretrained(folder)  # the MLM head is new: still reported as MISSING
    assert any("mlm_head" in message and "bbox_head" not in message for message in load_reports), load_reports


@pytest.mark.parametrize("layers", [1, 3], ids=["fewer", "more"])
def test_layer_count_that_disagrees_with_the_weights_is_refused(tmp_path, layers, load_reports):
    folder = _save(m.EfficientVLMForImageTextRetrieval, tmp_path)
    _edit_config(folder, "vision_config", layers)
    kind = "have no place in the model" if layers == 1 else "are not in the checkpoint"
    for model_cls in (m.EfficientVLMForImageTextRetrieval, m.EfficientVLMForPreTraining, m.EfficientVLMModel,
                      m.EfficientVLMForVisualReasoning):
        with pytest.raises(CheckpointMismatchError, match=kind) as error:
            model_cls.from_pretrained(folder)
        message = str(error.value)
        assert folder in message and "vision_model.layers." in message and "\n" not in message
    assert not any("LOAD REPORT" in message for message in load_reports)  # the error replaces the table


def test_partial_answer_decoder_is_refused(tmp_path):
    folder = _save(m.EfficientVLMForQuestionAnswering, tmp_path)
    assert isinstance(m.EfficientVLMForQuestionAnswering.from_pretrained(folder), m.EfficientVLMForQuestionAnswering)
    _edit_config(folder, "decoder_config", 3)  # a decoder layer the checkpoint does not have
    with pytest.raises(CheckpointMismatchError, match=r"decoder_model\.layers\.2\."):
        m.EfficientVLMForQuestionAnswering.from_pretrained(folder)
    _edit_config(folder, "decoder_config", 1)
    with pytest.raises(CheckpointMismatchError, match=r"decoder_model\.layers\.1\."):
        m.EfficientVLMForQuestionAnswering.from_pretrained(folder)
    # another class drops the whole decoder: a documented drop
    assert isinstance(m.EfficientVLMForImageTextRetrieval.from_pretrained(folder), m.EfficientVLMForImageTextRetrieval)


def test_partial_head_is_refused_whole_head_is_not():
    model = m.EfficientVLMForImageTextRetrieval(tiny_config())
    head = [k for k in model.state_dict() if k.startswith("itm_head.")]
    assert unfitting_weights(model, head, ["mlm_head.bias", "nlvr_head.0.weight"]) == ([], [])
    assert unfitting_weights(model, head[:1], []) == (head[:1], [])
    assert unfitting_weights(model, ["temp"], ["itm_head.9.weight"]) == (["temp"], ["itm_head.9.weight"])


def test_cli_refuses_with_one_line_and_exit_2(tmp_path, capsys):
    from efficientvlm.training.commands.cli import main

    folder = str(tmp_path / "pruned")
    shutil.copytree(DEMO_TEACHER, folder)
    with open(os.path.join(folder, "config.json")) as f:
        layers = json.load(f)["vision_config"]["num_hidden_layers"]
    _edit_config(folder, "vision_config", layers - 1)
    code = main(["evaluate", "--model", folder, "--eval_images", "4"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "Loading weights" not in line]
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"efficientvlm evaluate: error: {folder}: ")
    assert f"vision_model.layers.{layers - 1}." in err[0]


def test_weight_files_get_the_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        folder = _save(m.EfficientVLMForImageTextRetrieval, tmp_path / "a")
        os.umask(0o027)
        strict = _save(m.EfficientVLMForImageTextRetrieval, tmp_path / "b")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(os.path.join(folder, "model.safetensors")).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(os.path.join(folder, "config.json")).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(os.path.join(strict, "model.safetensors")).st_mode) == 0o640


@pytest.mark.slow
def test_auto_model_remote_code_refuses_unfitting_weights(tmp_path):
    folder = _save(m.EfficientVLMForPreTraining, tmp_path)
    _edit_config(folder, "fusion_encoder_config", 1)
    out = run_clean_python(
        f"""
        from transformers import AutoModel
        try:
            AutoModel.from_pretrained({folder!r}, trust_remote_code=True)
        except ValueError as error:
            print(type(error).__name__, "fusion_model.layers.1." in str(error))
        """
    )
    assert out.split()[-2:] == ["CheckpointMismatchError", "True"]
