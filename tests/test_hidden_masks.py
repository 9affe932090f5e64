"""Hidden-dimension (residual-channel) pruning masks: masked semantics, materialize, size model, round trip."""

from __future__ import annotations

import pytest
import torch

from efficientvlm.training.method.materialize import materialize, pruned_config
from efficientvlm.training.method.structure import count_parameters, structure_table
from modeling_efficientvlm import (
    EfficientVLMConfig,
    EfficientVLMForImageTextRetrieval,
    EfficientVLMForPreTraining,
    EfficientVLMForVisualReasoning,
    EfficientVLMModel,
    PruningMasks,
)
from tests.conftest import tiny_config, tiny_inputs

ATOL = 1e-5


def _binary(g: torch.Generator, size: int, p_keep: float = 0.6) -> torch.Tensor:
    """A random 0/1 mask of `size` entries with at least one 1."""
    mask = (torch.rand(size, generator=g) < p_keep).float()
    mask[torch.randint(0, size, (1,), generator=g)] = 1.0
    return mask


def _scaled(g: torch.Generator, size: int) -> torch.Tensor:
    """A random unit mask: about a third of the units 0, the kept ones scaled in [0.5, 1.5] (folded by materialize)."""
    return _binary(g, size, 0.7) * (0.5 + torch.rand(size, generator=g))


def _random_masks(config: EfficientVLMConfig, seed: int) -> PruningMasks:
    """Random binary hidden masks on both streams, random head / cross-head / FFN masks, and a removed sub-layer
    (the text encoder's layer-1 FFN); NLVR2 pairs keep the same cross heads (they share K/V)."""
    g = torch.Generator().manual_seed(seed)
    masks = PruningMasks()
    for name, key in (("vision", "vision_config"), ("text", "text_config"), ("fusion", "fusion_encoder_config")):
        sub, encoder = getattr(config, key), getattr(masks, name)
        encoder.head = [_scaled(g, n) if n else None for n in sub.num_attention_heads]
        encoder.ffn = [_scaled(g, n) if n else None for n in sub.intermediate_size]
        if name == "fusion":
            encoder.cross_head = [_scaled(g, n) if n else None for n in sub.num_cross_attention_heads]
            if sub.shared_cross_kv:  # same kept heads within a pair; scales may differ
                for odd in range(1, sub.num_hidden_layers, 2):
                    encoder.cross_head[odd] = (encoder.cross_head[odd - 1] != 0) * (0.5 + torch.rand(4, generator=g))
    masks.text.ffn[1] = torch.zeros(config.text_config.intermediate_size[1])  # a removed sub-layer
    masks.vision.hidden = _binary(g, config.vision_config.hidden_size)
    masks.text.hidden = _binary(g, config.text_config.hidden_size)
    return masks


def _kept(mask: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(mask).flatten()


@pytest.mark.parametrize("seed, pre_layernorm", [(0, True), (1, False)])
def test_retrieval_masked_equals_materialized(seed, pre_layernorm):
    """Without a vision pre-LayerNorm the embeddings are scaled by the mask (and materialize slices them)."""
    torch.manual_seed(seed)
    model = EfficientVLMForImageTextRetrieval(tiny_config(vision=dict(use_pre_layernorm=pre_layernorm))).eval()
    masks = _random_masks(model.config, seed)
    pruned = materialize(model, masks, atol=ATOL)
    inputs = tiny_inputs(seed=seed)
    with torch.no_grad():
        masked = model(**inputs, pruning_masks=masks, compute_itm=True)
        small = pruned(**inputs, compute_itm=True)
    kv, kt = _kept(masks.vision.hidden), _kept(masks.text.hidden)
    assert pruned.config.vision_config.hidden_size == len(kv) < 32
    assert pruned.config.text_config.hidden_size == pruned.config.fusion_encoder_config.hidden_size == len(kt) < 24
    assert pruned.config.fusion_encoder_config.encoder_hidden_size == len(kv)
    assert pruned.config.head_hidden_size == 48  # the ITM head keeps its original inner width 2 x 24
    torch.testing.assert_close(small.image_embeds, masked.image_embeds, atol=ATOL, rtol=0)
    torch.testing.assert_close(small.text_embeds, masked.text_embeds, atol=ATOL, rtol=0)
    torch.testing.assert_close(small.logits_per_image, masked.logits_per_image, atol=1e-4, rtol=0)
    torch.testing.assert_close(small.itm_logits, masked.itm_logits, atol=ATOL, rtol=0)
    for part, kept in (("vision_model_output", kv), ("text_model_output", kt), ("fusion_model_output", kt)):
        tokens = getattr(masked, part).last_hidden_state
        torch.testing.assert_close(getattr(small, part).last_hidden_state, tokens[..., kept], atol=ATOL, rtol=0)


def test_pruned_channels_are_zero_in_both_streams():
    """Every write into a stream is multiplied by its mask: pruned channels are exactly 0 in every hidden state."""
    model = EfficientVLMForImageTextRetrieval(tiny_config()).eval()
    masks = _random_masks(model.config, 3)
    with torch.no_grad():
        out = model(**tiny_inputs(), pruning_masks=masks, compute_itm=True, output_hidden_states=True)
    for part, mask in (("vision", masks.vision.hidden), ("text", masks.text.hidden), ("fusion", masks.text.hidden)):
        encoder = getattr(out, f"{part}_model_output")
        for state in (*encoder.hidden_states, encoder.last_hidden_state):
            assert torch.count_nonzero(state[..., mask == 0]) == 0, part
            assert torch.count_nonzero(state[..., mask != 0]) > 0, part


def test_nlvr2_masked_equals_materialized():
    torch.manual_seed(0)
    model = EfficientVLMForVisualReasoning(tiny_config()).eval()
    masks = _random_masks(model.config, 5)
    pruned = materialize(model, masks, atol=ATOL)
    fusion = pruned.config.fusion_encoder_config
    assert fusion.shared_cross_kv and fusion.encoder_hidden_size == int(masks.vision.hidden.sum())
    # the pair's shared K/V module reads only the kept vision channels
    assert pruned.fusion_model.layers[1].cross_attn.k_proj is pruned.fusion_model.layers[0].cross_attn.k_proj
    assert pruned.fusion_model.layers[0].cross_attn.k_proj.in_features == fusion.encoder_hidden_size
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(3, 2, 3, 32, 32, generator=g)
    inputs = tiny_inputs(batch=3)
    with torch.no_grad():
        masked = model(pixels, inputs["input_ids"], inputs["attention_mask"], pruning_masks=masks).logits
        small = pruned(pixels, inputs["input_ids"], inputs["attention_mask"]).logits
    torch.testing.assert_close(small, masked, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "model_class, heads",
    [(EfficientVLMModel, ()), (EfficientVLMForImageTextRetrieval, ("itm",)),
     (EfficientVLMForVisualReasoning, ("nlvr",))],
)
def test_count_parameters_of_hidden_pruned_config(model_class, heads):
    model = model_class(tiny_config()).eval()
    masks = _random_masks(model.config, 7)
    config = pruned_config(model.config, masks)
    pruned = materialize(model, masks, atol=ATOL)
    assert count_parameters(config, heads)["total"] == sum(p.numel() for p in pruned.parameters())
    table = structure_table(config)
    assert table["vision"]["hidden"] == int(masks.vision.hidden.sum())
    assert table["text"]["hidden"] == table["fusion"]["hidden"] == int(masks.text.hidden.sum())


def test_all_ones_hidden_masks_give_exactly_the_unmasked_outputs():
    model = EfficientVLMForImageTextRetrieval(tiny_config(vision=dict(use_pre_layernorm=False))).eval()
    masks = PruningMasks()
    masks.vision.hidden, masks.text.hidden = torch.ones(32), torch.ones(24)
    inputs = tiny_inputs()
    with torch.no_grad():
        plain = model(**inputs, compute_itm=True)
        masked = model(**inputs, pruning_masks=masks, compute_itm=True)
    for name in ("image_embeds", "text_embeds", "logits_per_image", "itm_logits"):
        assert torch.equal(getattr(plain, name), getattr(masked, name)), name
    assert torch.equal(plain.fusion_model_output.last_hidden_state, masked.fusion_model_output.last_hidden_state)


def test_hidden_pruned_model_round_trips_through_save_and_from_pretrained(tmp_path):
    model = EfficientVLMForImageTextRetrieval(tiny_config()).eval()
    pruned = materialize(model, _random_masks(model.config, 11), atol=ATOL)
    pruned.save_pretrained(tmp_path)
    loaded = EfficientVLMForImageTextRetrieval.from_pretrained(tmp_path).eval()
    assert loaded.config.head_hidden_size == pruned.config.head_hidden_size == 48
    assert loaded.config.text_config.hidden_size == pruned.config.text_config.hidden_size
    inputs = tiny_inputs()
    with torch.no_grad():
        a, b = pruned(**inputs, compute_itm=True), loaded(**inputs, compute_itm=True)
    assert torch.equal(a.itm_logits, b.itm_logits)
    assert torch.equal(a.logits_per_image, b.logits_per_image)


def test_gradient_flows_to_soft_hidden_masks():
    model = EfficientVLMForImageTextRetrieval(tiny_config()).train()
    g = torch.Generator().manual_seed(0)
    vision = (torch.rand(32, generator=g) * (torch.rand(32, generator=g) > 0.3)).requires_grad_()
    text = (torch.rand(24, generator=g) * (torch.rand(24, generator=g) > 0.3)).requires_grad_()
    masks = PruningMasks()
    masks.vision.hidden, masks.text.hidden = vision, text
    out = model(**tiny_inputs(), pruning_masks=masks, compute_itm=True, return_loss=True)
    (out.loss + out.itm_logits.pow(2).sum()).backward()
    for grad, mask in ((vision.grad, vision), (text.grad, text)):
        assert grad is not None and torch.isfinite(grad).all()
        assert torch.count_nonzero(grad[mask != 0]) > 0


def test_non_binary_hidden_mask_cannot_be_materialized():
    model = EfficientVLMForImageTextRetrieval(tiny_config()).eval()
    masks = PruningMasks()
    masks.text.hidden = torch.ones(24)
    masks.text.hidden[3] = 0.5
    with pytest.raises(ValueError, match=r"pruning_masks\.text\.hidden must be binary.*0\.5"):
        materialize(model, masks)


@pytest.mark.parametrize("encoder", ["fusion", "decoder"])
def test_fusion_or_decoder_hidden_mask_raises_naming_the_field(encoder):
    """Only the vision and text streams have hidden masks (fusion continues the text stream; decoder: not gated)."""
    model = EfficientVLMForImageTextRetrieval(tiny_config()).eval()
    masks = PruningMasks()
    getattr(masks, encoder).hidden = torch.ones(24)
    with pytest.raises(ValueError, match=rf"pruning_masks\.{encoder}\.hidden must be None"):
        model(**tiny_inputs(), pruning_masks=masks)
    with pytest.raises(ValueError, match=rf"pruning_masks\.{encoder}\.hidden must be None"):
        materialize(model, masks)


def test_wrong_shape_and_unsupported_class_raise():
    model = EfficientVLMForImageTextRetrieval(tiny_config()).eval()
    masks = PruningMasks()
    masks.vision.hidden = torch.ones(24)
    with pytest.raises(ValueError, match=r"pruning_masks\.vision\.hidden has shape \(24,\).*\(32,\)"):
        model(**tiny_inputs(), pruning_masks=masks)
    masks.vision.hidden = torch.ones(32)
    with pytest.raises(ValueError, match="EfficientVLMForPreTraining"):
        materialize(EfficientVLMForPreTraining(tiny_config()).eval(), masks)


def test_head_hidden_size_sets_head_width_and_is_validated():
    config = tiny_config(head_hidden_size=10)
    model = EfficientVLMForImageTextRetrieval(config)
    assert model.itm_head[0].out_features == 10 and model.itm_head[3].in_features == 10
    assert count_parameters(config)["total"] == sum(p.numel() for p in model.parameters())
    assert EfficientVLMForImageTextRetrieval(tiny_config()).itm_head[0].out_features == 48  # None = 2 x text width
    with pytest.raises(ValueError, match="head_hidden_size must be > 0"):
        tiny_config(head_hidden_size=0)


def test_a_sample_that_closes_every_channel_gives_zeros_not_an_error():
    from modeling_efficientvlm.modeling_efficientvlm import _masked_layer_norm

    norm = torch.nn.LayerNorm(6)
    x = torch.randn(2, 3, 6)
    out = _masked_layer_norm(x, norm, torch.zeros(6, requires_grad=True))
    assert torch.equal(out, torch.zeros_like(x))
