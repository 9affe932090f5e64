"""Untrusted inputs are validated before use: config sizes / numbers (issue #20.4) and L0 gate files (#20.5)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import modeling_efficientvlm.modeling_efficientvlm as modeling
from modeling_efficientvlm import EfficientVLMConfig, EfficientVLMForImageTextRetrieval
from tests.conftest import tiny_config
from efficientvlm.training import ModalL0Module

DEMO_TEACHER = str(Path(__file__).resolve().parents[1] / "training" / "assets" / "demo_teacher")


# ------------------------------------------------------------------------------------------------ config (#20.4)
def _refuse_layers(monkeypatch) -> None:
    """Any attempt to build a layer fails the test: validation must come before allocation."""

    def built(self, *args, **kwargs):
        raise AssertionError("a layer was built from an invalid config")

    monkeypatch.setattr(modeling.EfficientVLMLayer, "__init__", built)


def test_huge_depth_in_config_json_is_refused_before_any_layer_is_built(tmp_path, monkeypatch):
    config = tiny_config().to_dict()
    # uniform ints: without the bound, normalisation would expand them to 10**7 entries and build 10**7 layers
    config["text_config"].update(num_hidden_layers=10**7, num_attention_heads=4, intermediate_size=37)
    (tmp_path / "config.json").write_text(json.dumps(config))
    _refuse_layers(monkeypatch)
    message = r"text_config\.num_hidden_layers must be >= 0 and <= 256 \(MAX_LAYERS\), an int; got 10000000"
    with pytest.raises(ValueError, match=message):
        EfficientVLMForImageTextRetrieval.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        EfficientVLMConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "sub, field, value, message",
    [
        ("vision_config", "num_hidden_layers", True, r"vision_config\.num_hidden_layers .* an int; got True"),
        ("text_config", "vocab_size", 99.0, r"text_config\.vocab_size .* an int; got 99\.0"),
        ("text_config", "vocab_size", 10**9, r"text_config\.vocab_size .* <= 2097152 \(MAX_VOCAB_SIZE\)"),
        ("text_config", "max_position_embeddings", 10**8, r"max_position_embeddings .* \(MAX_POSITIONS\)"),
        ("vision_config", "hidden_size", 10**6, r"vision_config\.hidden_size .* <= 32768 \(MAX_WIDTH\)"),
        ("vision_config", "image_size", 2**20, r"vision_config\.image_size .* \(MAX_IMAGE_SIZE\)"),
        ("vision_config", "patch_size", 1024, r"vision_config\.patch_size .* \(MAX_PATCH_SIZE\)"),
        ("vision_config", "num_channels", 0, r"vision_config\.num_channels must be > 0"),
        ("text_config", "layer_norm_eps", math.nan, r"text_config\.layer_norm_eps must be a finite number in \(0"),
        ("vision_config", "layer_norm_eps", math.inf, r"vision_config\.layer_norm_eps must be a finite number"),
        ("text_config", "layer_norm_eps", 0.0, r"text_config\.layer_norm_eps .* \(0\.0, 1\.0\], got 0\.0"),
        ("vision_config", "attention_dropout", 1.0, r"vision_config\.attention_dropout .* \[0\.0, 1\.0\)"),
        ("text_config", "hidden_dropout_prob", math.nan, r"text_config\.hidden_dropout_prob .* got nan"),
        ("fusion_encoder_config", "attention_probs_dropout_prob", -0.1, r"fusion_encoder_config\.attention_probs"),
        ("text_config", "initializer_range", math.inf, r"text_config\.initializer_range .* got inf"),
        ("fusion_encoder_config", "num_attention_heads", [4, 10**5], r"num_attention_heads\[1\] .* heads x head_dim"),
        ("fusion_encoder_config", "num_cross_attention_heads", [4, True], r"num_cross_attention_heads\[1\]"),
        ("vision_config", "intermediate_size", [37, 10**7], r"intermediate_size\[1\] .* \(MAX_INTERMEDIATE_SIZE\)"),
        ("fusion_encoder_config", "encoder_hidden_size", 32.0, r"fusion_encoder_config\.encoder_hidden_size"),
        ("text_config", "hidden_act", "nope", r"text_config\.hidden_act must name an activation"),
        ("text_config", "pad_token_id", 99, r"text_config\.pad_token_id .* \[0, vocab_size = 99\)"),
        (None, "embed_dim", 16.0, r"^embed_dim must be > 0 .* an int; got 16\.0"),
        (None, "embed_dim", 10**6, r"^embed_dim .* \(MAX_WIDTH\)"),
        (None, "temperature_init", math.nan, r"temperature_init must be a finite number"),
        (None, "temperature_max", math.inf, r"temperature_max must be a finite number"),
    ],
)
def test_bad_sizes_and_numbers_are_refused_naming_the_field(sub, field, value, message, tmp_path, monkeypatch):
    config = tiny_config().to_dict()
    (config[sub] if sub else config)[field] = value
    _refuse_layers(monkeypatch)
    with pytest.raises(ValueError, match=message):
        EfficientVLMConfig.from_dict(config)
    # the same through a config.json (Python's json writes and reads NaN / Infinity)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        EfficientVLMForImageTextRetrieval.from_pretrained(tmp_path)


def test_too_many_patches_are_refused():
    with pytest.raises(ValueError, match=r"1048577 position embeddings, more than 131072 \(MAX_POSITIONS\)"):
        tiny_config(vision=dict(image_size=16384, patch_size=16))


def test_real_model_sizes_and_removed_sublayers_are_accepted():
    """X-VLM-large / BERT-large sizes, and a very large (128 layers, width 8192, 1M vocab, 100k positions) one."""
    large = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, head_dim=64, intermediate_size=4096)
    config = EfficientVLMConfig(
        vision_config=dict(image_size=384, patch_size=16, **large),
        text_config=dict(vocab_size=30522, max_position_embeddings=512, **large),
        fusion_encoder_config=dict(large, num_hidden_layers=6, num_attention_heads=[16, 0, 16, 16, 16, 16],
                                   intermediate_size=[4096, 4096, 0, 4096, 4096, 4096]),
    )
    assert config.fusion_encoder_config.num_attention_heads[1] == 0
    huge = dict(hidden_size=8192, num_hidden_layers=128, num_attention_heads=64, head_dim=128, intermediate_size=32768)
    config = EfficientVLMConfig(
        vision_config=dict(image_size=896, patch_size=14, num_channels=4, **huge),
        text_config=dict(vocab_size=10**6, max_position_embeddings=10**5, layer_norm_eps=1, **huge),
        fusion_encoder_config=huge, embed_dim=8192, temperature_init=1, temperature_min=1, temperature_max=1,
    )
    assert len(config.text_config.num_attention_heads) == 128
    assert EfficientVLMConfig.from_pretrained(DEMO_TEACHER).text_config.vocab_size == 47


# ------------------------------------------------------------------------------------------- gate files (#20.5)
def _gate_file(tmp_path, edit=None, metadata: str | None = None) -> tuple[str, object]:
    """Saves a tiny module's gates, applies `edit` to the tensors / replaces the settings metadata."""
    config = tiny_config()
    path = str(tmp_path / "l0_gates.safetensors")
    ModalL0Module(config, target_sparsity=0.3).save(path)
    if edit is not None or metadata is not None:
        with safe_open(path, framework="pt") as f:
            saved = f.metadata()
        state = load_file(path)
        if edit is not None:
            edit(state)
        if metadata is not None:
            saved["efficientvlm_l0"] = metadata
        save_file(state, path, metadata=saved)
    return path, config


def test_saved_gates_load_back(tmp_path):
    path, config = _gate_file(tmp_path)
    assert ModalL0Module.from_file(path, config).target_sparsity == 0.3


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_log_alpha_is_refused_naming_file_and_gate(tmp_path, bad):
    def poison(state):
        state["gates.vision_head_0.log_alpha"][1] = bad

    path, config = _gate_file(tmp_path, poison)
    with pytest.raises(ValueError, match=re.escape(path) + r": gate vision\.head\.0 .* 1 non-finite values"):
        ModalL0Module.from_file(path, config)


def test_non_finite_lagrange_multipliers_are_refused(tmp_path):
    def poison(state):
        state["lambdas.global"][0] = math.inf

    path, config = _gate_file(tmp_path, poison)
    message = re.escape(path) + r": lambdas\.global holds 1 non-finite Lagrange multipliers"
    with pytest.raises(ValueError, match=message):
        ModalL0Module.from_file(path, config)


def test_gate_shape_mismatch_names_the_gate_and_both_shapes(tmp_path):
    def grow(state):
        state["gates.text_ffn_1.log_alpha"] = torch.zeros(40)

    path, config = _gate_file(tmp_path, grow)
    message = r"gate text\.ffn\.1 .* has shape \(40,\) in the file but the config gives \(37,\)"
    with pytest.raises(ValueError, match=message):
        ModalL0Module.from_file(path, config)


def test_integer_gates_are_refused(tmp_path):
    def to_int(state):
        state["gates.fusion_cross_head_0.log_alpha"] = torch.ones(4, dtype=torch.int64)

    path, config = _gate_file(tmp_path, to_int)
    with pytest.raises(ValueError, match=r"gate fusion\.cross_head\.0 .* must be a floating-point tensor"):
        ModalL0Module.from_file(path, config)


@pytest.mark.parametrize(
    "metadata, message",
    [
        ('{"target_sparsity": 0.3,', "are not valid JSON"),
        ("[0.3]", "must be a JSON object"),
        ('{"target_sparsity": 0.3, "foo": 1}', "unknown gate setting 'foo'"),
        ('{"warmup_steps": "7"}', "gate setting 'warmup_steps' has the wrong type"),
        ('{"one_sided": 1}', "gate setting 'one_sided' has the wrong type"),
        ('{"target_sparsity": true}', "gate setting 'target_sparsity' has the wrong type"),
        ('{"modality_targets": {"vision": "0.2"}}', r"modality_targets\['vision'\] must be a number"),
        ('{"target_sparsity": NaN}', r"invalid gate settings .* target_sparsity must lie in \[0, 1\)"),
        ('{"modality_targets": {"audio": 0.2}}', "invalid gate settings .* unknown encoder 'audio'"),
        ('{"warmup_steps": -3}', "invalid gate settings .* warmup_steps must be >= 0"),
    ],
)
def test_bad_gate_settings_are_reported_with_the_file(tmp_path, metadata, message):
    path, config = _gate_file(tmp_path, metadata=metadata)
    with pytest.raises(ValueError, match=re.escape(path) + ".*" + message):
        ModalL0Module.from_file(path, config)


def test_a_file_that_is_not_safetensors_is_reported_with_its_path(tmp_path):
    path = tmp_path / "l0_gates.safetensors"
    path.write_bytes(b"\x00garbage" * 8)
    with pytest.raises(ValueError, match=re.escape(str(path)) + " is not a readable safetensors gate file"):
        ModalL0Module.from_file(str(path), tiny_config())


def test_loading_the_processor_logs_no_model_type_notice():
    """Loading a saved processor must not print "You are using a model of type `efficientvlm` to instantiate a model
    of type ``" (AutoTokenizer reading config.json without remote code)."""
    import logging

    from transformers.utils import logging as hf_logging

    from modeling_efficientvlm.processing_efficientvlm import EfficientVLMProcessor

    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = hf_logging.get_logger("transformers.configuration_utils")
    logger.addHandler(handler)
    try:
        processor = EfficientVLMProcessor.from_pretrained(str(DEMO_TEACHER))
    finally:
        logger.removeHandler(handler)
    assert not [m for m in messages if "instantiate a model of type" in m], messages
    assert processor(text=["a red circle"])["input_ids"].shape[0] == 1
