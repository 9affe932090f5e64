import pytest

from modeling_efficientvlm import EfficientVLMConfig, EfficientVLMFusionConfig, EfficientVLMVisionConfig
from tests.conftest import ragged_config, tiny_config


def test_int_fields_are_normalised_to_per_layer_lists():
    config = tiny_config()
    assert config.vision_config.num_attention_heads == [4, 4]
    assert config.fusion_encoder_config.num_cross_attention_heads == [4, 4]
    assert config.text_config.intermediate_size == [37, 37]


def test_fusion_reads_vision_width():
    assert tiny_config().fusion_encoder_config.encoder_hidden_size == 32


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_hidden_layers=2, num_attention_heads=[1, 2, 3]), "num_attention_heads has 3 entries"),
        (dict(num_hidden_layers=2, intermediate_size=[5, -1]), r"intermediate_size\[1\] must be an int >= 0"),
        (dict(num_hidden_layers=2, num_attention_heads="4"), "num_attention_heads must be an int or a list"),
        (dict(image_size=30, patch_size=8), "image_size \\(30\\) must be a multiple of patch_size"),
        (dict(head_dim=0), "head_dim must be > 0"),
    ],
)
def test_vision_validation_names_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EfficientVLMVisionConfig(**kwargs)


def test_fusion_cross_heads_length_checked():
    with pytest.raises(ValueError, match="num_cross_attention_heads has 1 entries"):
        EfficientVLMFusionConfig(num_hidden_layers=2, num_cross_attention_heads=[3])


def test_cross_encoder_width_contracts():
    with pytest.raises(ValueError, match="fusion_encoder_config.hidden_size"):
        tiny_config(fusion=dict(hidden_size=16))
    with pytest.raises(ValueError, match="temperature_init"):
        tiny_config(temperature_init=0.9)


def test_round_trip_dict_and_disk(tmp_path):
    config = ragged_config()
    again = EfficientVLMConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()
    config.save_pretrained(tmp_path)
    loaded = EfficientVLMConfig.from_pretrained(tmp_path)
    assert loaded.fusion_encoder_config.num_cross_attention_heads == [0, 3]
    assert loaded.vision_config.intermediate_size == [0, 21]
    assert loaded.to_dict() == config.to_dict()
