"""Save → load as Hub remote code in a fresh interpreter that cannot import our packages."""

import json

import pytest
import torch

from modeling_efficientvlm import EfficientVLMForPreTraining, EfficientVLMForImageTextRetrieval
from modeling_efficientvlm.processing_efficientvlm import EfficientVLMProcessor
from tests.conftest import ragged_config, run_clean_python, tiny_inputs, tiny_processor


@pytest.mark.slow
def test_ragged_model_and_processor_load_as_remote_code(tmp_path):
    torch.manual_seed(0)
    model = EfficientVLMForPreTraining(ragged_config()).eval()
    model.save_pretrained(tmp_path)
    tiny_processor().save_pretrained(tmp_path)
    inputs = tiny_inputs()
    torch.save(inputs, tmp_path / "inputs.pt")
    expected = model(**inputs, compute_itm=True)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModel"].endswith("EfficientVLMForImageTextRetrieval")
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))

    out = run_clean_python(
        f"""
        import json, torch
        from PIL import Image
        from transformers import AutoConfig, AutoModel, AutoProcessor
        path = {str(tmp_path)!r}
        config = AutoConfig.from_pretrained(path, trust_remote_code=True)
        assert config.vision_config.num_attention_heads == [3, 0], config.vision_config.num_attention_heads
        model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        inputs = torch.load(path + "/inputs.pt", weights_only=True)
        with torch.no_grad():
            out = model(**inputs, compute_itm=True)
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
        batch = processor(images=[Image.new("RGB", (40, 30), "red")], text=["a red circle left of a square"])
        print(json.dumps({{
            "itc": out.logits_per_image.tolist(), "itm": out.itm_logits.tolist(),
            "pixel_shape": list(batch["pixel_values"].shape), "ids": batch["input_ids"].tolist(),
        }}))
        """
    )
    result = json.loads(out.strip().splitlines()[-1])
    torch.testing.assert_close(torch.tensor(result["itc"]), expected.logits_per_image, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(result["itm"]), expected.itm_logits, atol=1e-5, rtol=1e-5)
    assert result["pixel_shape"] == [1, 3, 32, 32]
    assert result["ids"] == [[2, 5, 6, 8, 10, 11, 5, 9, 3]]


def test_processor_round_trip_in_process(tmp_path):
    processor = tiny_processor()
    processor.save_pretrained(tmp_path)
    again = EfficientVLMProcessor.from_pretrained(tmp_path)
    assert again.tokenizer.convert_tokens_to_ids("circle") == 8
    assert again.image_processor.crop_size["height"] == 32
    assert again.max_length == 40


def test_pretraining_checkpoint_loads_into_retrieval_class(tmp_path):
    torch.manual_seed(0)
    EfficientVLMForPreTraining(ragged_config()).save_pretrained(tmp_path)
    model = EfficientVLMForImageTextRetrieval.from_pretrained(tmp_path)
    assert not hasattr(model, "mlm_head")
