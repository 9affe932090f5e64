import copy

import pytest
import torch

from modeling_efficientvlm import (
    EfficientVLMForImageTextRetrieval,
    EfficientVLMForPreTraining,
    EncoderPruningMasks,
    PruningMasks,
)
from tests.conftest import ragged_config, tiny_config, tiny_inputs


def _model(config=None, cls=EfficientVLMForPreTraining, attn="sdpa"):
    torch.manual_seed(0)
    return cls._from_config(config or tiny_config(), attn_implementation=attn).eval()


def _forward(model, inputs, masks=None, **kw):
    return model(**inputs, pruning_masks=masks, compute_itm=True, mlm_input_ids=inputs["input_ids"], **kw)


def test_shapes_and_named_outputs():
    model = _model()
    inputs = tiny_inputs()
    out = _forward(model, inputs, output_attentions=True, output_hidden_states=True)
    assert out.logits_per_image.shape == (3, 3)
    assert out.itm_logits.shape == (3, 2)
    assert out.mlm_logits.shape == (3, 7, 99)
    vision = out.vision_model_output
    assert vision.last_hidden_state.shape == (3, 17, 32)
    assert len(vision.hidden_states) == 3 and len(vision.attentions) == 2
    assert vision.attentions[0].shape == (3, 4, 17, 17)
    assert out.fusion_model_output.cross_attentions[1].shape == (3, 4, 7, 17)
    assert torch.allclose(out.image_embeds.norm(dim=-1), torch.ones(3), atol=1e-5)


@pytest.mark.parametrize("config_fn", [tiny_config, ragged_config])
def test_eager_equals_sdpa(config_fn):
    eager, sdpa = _model(config_fn(), attn="eager"), _model(config_fn(), attn="sdpa")
    sdpa.load_state_dict(eager.state_dict())
    inputs = tiny_inputs()
    a, b = _forward(eager, inputs), _forward(sdpa, inputs)
    for name in ("logits_per_image", "itm_logits", "mlm_logits"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-5, rtol=1e-5)


def _all_masks(config, value=1.0) -> PruningMasks:
    def enc(sub, cross=False):
        return EncoderPruningMasks(
            head=[torch.full((h,), value) for h in sub.num_attention_heads],
            cross_head=[torch.full((h,), value) for h in sub.num_cross_attention_heads] if cross else None,
            ffn=[torch.full((i,), value) for i in sub.intermediate_size],
        )

    return PruningMasks(enc(config.vision_config), enc(config.text_config),
                        enc(config.fusion_encoder_config, cross=True))


def test_all_ones_masks_equal_no_masks():
    model = _model()
    inputs = tiny_inputs()
    a, b = _forward(model, inputs), _forward(model, inputs, _all_masks(model.config))
    for name in ("logits_per_image", "itm_logits", "mlm_logits"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=0, rtol=0)


def test_zero_head_mask_removes_exactly_that_head():
    """Masking head h equals zeroing the out_proj input columns of head h (its contribution), nothing else."""
    model = _model()
    inputs = tiny_inputs()
    masks = _all_masks(model.config)
    masks.vision.head[1] = torch.tensor([1.0, 0.0, 1.0, 1.0])
    masks.fusion.cross_head[0] = torch.tensor([1.0, 1.0, 1.0, 0.0])
    masked = _forward(model, inputs, masks)
    surgical = copy.deepcopy(model)
    with torch.no_grad():
        surgical.vision_model.layers[1].self_attn.out_proj.weight[:, 8:16] = 0  # head 1, head_dim 8
        surgical.fusion_model.layers[0].cross_attn.out_proj.weight[:, 18:24] = 0  # head 3, head_dim 6
    reference = _forward(surgical, inputs)
    unmasked = _forward(model, inputs)
    torch.testing.assert_close(masked.itm_logits, reference.itm_logits, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(masked.itm_logits, unmasked.itm_logits, atol=1e-4)


def test_zero_ffn_mask_removes_neurons():
    model = _model()
    inputs = tiny_inputs()
    masks = _all_masks(model.config)
    masks.text.ffn[0] = torch.ones(37)
    masks.text.ffn[0][[0, 5, 36]] = 0
    surgical = copy.deepcopy(model)
    with torch.no_grad():
        surgical.text_model.layers[0].mlp.fc2.weight[:, [0, 5, 36]] = 0
    torch.testing.assert_close(
        _forward(model, inputs, masks).mlm_logits, _forward(surgical, inputs).mlm_logits, atol=1e-6, rtol=1e-5
    )


def test_removed_sublayers_are_identities():
    """0 heads / 0 FFN width (config or all-zero mask) → the sub-layer passes its input through unchanged."""
    config = tiny_config(text=dict(num_attention_heads=[0, 4], intermediate_size=[0, 37]))
    model = _model(config)
    layer = model.text_model.layers[0]
    x = torch.randn(2, 5, 24)
    out, probs, _ = layer(x)
    assert torch.equal(out, x) and probs is None
    assert not hasattr(layer, "self_attn") and not hasattr(layer, "mlp")
    dense = model.text_model.layers[1]
    out, _, _ = dense(x, masks=(torch.zeros(4), None, torch.zeros(37)))
    assert torch.equal(out, x)


def test_ragged_config_builds_and_runs():
    model = _model(ragged_config())
    out = _forward(model, tiny_inputs(), output_attentions=True)
    assert out.vision_model_output.attentions[1] is None  # 0 heads in vision layer 1
    assert out.vision_model_output.attentions[0].shape[1] == 3
    assert out.fusion_model_output.cross_attentions[0] is None


def test_position_embedding_interpolation():
    model = _model(cls=EfficientVLMForImageTextRetrieval)
    emb = model.vision_model.embeddings
    table = emb.interpolate_pos_encoding(48, 48)
    assert table.shape == (1, 1 + 36, 32)
    torch.testing.assert_close(table[0, 0], emb.position_embedding.weight[0])
    same = emb.interpolate_pos_encoding(32, 32)
    torch.testing.assert_close(same[0], emb.position_embedding.weight)
    # a constant grid stays constant under bicubic interpolation
    with torch.no_grad():
        emb.position_embedding.weight[1:] = 0.5
    torch.testing.assert_close(emb.interpolate_pos_encoding(48, 48)[0, 1:], torch.full((36, 32), 0.5))
    pixels = torch.randn(2, 3, 48, 48)
    assert model.get_image_features(pixels, interpolate_pos_encoding=True).shape == (2, 16)
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        model.get_image_features(pixels)


def test_weights_shared_across_head_classes(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path)
    retrieval = EfficientVLMForImageTextRetrieval.from_pretrained(tmp_path).eval()
    inputs = tiny_inputs()
    torch.testing.assert_close(
        retrieval(**inputs, compute_itm=True).itm_logits, _forward(model, inputs).itm_logits
    )
    assert model.mlm_head.decoder.weight.data_ptr() == model.text_model.embeddings.word_embeddings.weight.data_ptr()


def test_pretraining_checkpoint_loads_as_retrieval_without_an_mlm_head_report(tmp_path, capfd, caplog):
    """Retrieval (evaluate, bench, prune) drops a pre-training checkpoint's MLM head by design: no UNEXPECTED report."""
    from modeling_efficientvlm import EfficientVLMForPreTraining

    EfficientVLMForPreTraining(tiny_config()).save_pretrained(tmp_path)
    with caplog.at_level("WARNING"):
        EfficientVLMForImageTextRetrieval.from_pretrained(tmp_path)
    captured = capfd.readouterr()
    assert "mlm_head" not in captured.out + captured.err + caplog.text
