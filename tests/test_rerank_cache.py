"""Cached re-ranking (each image's cross-attention K/V projected once for all its texts) == the per-pair engine."""

import pytest
import torch

from efficientvlm.training.method.materialize import materialize
from modeling_efficientvlm.modeling_efficientvlm import (
    ITM_SCORES,
    EfficientVLMForImageTextRetrieval,
    EfficientVLMForPreTraining,
)
from tests.conftest import ragged_config, random_pruning_masks, tiny_config

ATOL = 1e-5


def _tokens(model, n_img: int, n_txt: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n_img, 3, 32, 32, generator=g)
    ids = torch.randint(5, 99, (n_txt, 9), generator=g)
    mask = torch.ones(n_txt, 9, dtype=torch.long)
    for j in range(n_txt):  # ragged lengths: each batch is trimmed to its longest text
        mask[j, int(torch.randint(2, 10, (1,), generator=g)) :] = 0
    with torch.no_grad():
        images = model.encode_image(pixels).last_hidden_state
        texts = model.encode_text(ids, mask).last_hidden_state
    return images, texts, mask


def _models(seed: int):
    """Dense, heterogeneous (removed sub-layers), head-pruned (materialized) and hidden-pruned models."""
    torch.manual_seed(seed)
    dense = EfficientVLMForImageTextRetrieval(tiny_config()).eval()
    pretraining = EfficientVLMForPreTraining(tiny_config()).eval()
    ragged = EfficientVLMForImageTextRetrieval(ragged_config()).eval()
    pruned = materialize(dense, random_pruning_masks(dense.config, seed))
    hidden = materialize(dense, random_pruning_masks(dense.config, seed + 5, hidden=True), atol=ATOL)
    assert hidden.config.text_config.hidden_size < dense.config.text_config.hidden_size
    return {"dense": dense, "pretraining": pretraining, "ragged": ragged, "pruned": pruned, "hidden_pruned": hidden}


@pytest.mark.parametrize("seed, attn", [(0, "sdpa"), (1, "eager")])
def test_cached_pair_scores_equal_per_pair(seed, attn):
    for name, model in _models(seed).items():
        model.set_attn_implementation(attn)
        images, texts, mask = _tokens(model, 5, 7, seed)
        g = torch.Generator().manual_seed(seed + 10)
        # uneven groups: image 0 has many texts (more than a batch), others few, one none
        image_idx = torch.cat([torch.zeros(9, dtype=torch.long), torch.randint(1, 4, (8,), generator=g)])
        image_idx = image_idx[torch.randperm(image_idx.numel(), generator=g)]
        text_idx = torch.randint(0, 7, (image_idx.numel(),), generator=g)
        itc = torch.rand(image_idx.numel(), generator=g)
        for itm_score, batch_size in zip(ITM_SCORES, (None, 1, 4, 5)):
            if True:
                args = (images, texts, mask, image_idx, text_idx)
                kwargs = dict(itm_score=itm_score, itc=itc, batch_size=batch_size)
                cached = model.itm_pair_scores(*args, **kwargs)
                reference = model.itm_pair_scores(*args, **kwargs, reuse_image_kv=False)
                torch.testing.assert_close(cached, reference, atol=ATOL, rtol=0, msg=f"{name} {itm_score}")


def test_cached_rerank_equals_per_pair_with_gate_masks_both_directions():
    torch.manual_seed(3)
    model = EfficientVLMForPreTraining(tiny_config()).eval()
    masks = random_pruning_masks(model.config, 3, scaled=True)
    images, texts, mask = _tokens(model, 6, 10, 3)
    sim = torch.rand(6, 10)
    cached = model.rerank(sim, 4, images, texts, mask, pruning_masks=masks, batch_size=3)
    reference = model.rerank(sim, 4, images, texts, mask, pruning_masks=masks, batch_size=3, reuse_image_kv=False)
    for a, b in zip(cached, reference):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_image_key_value_cache_is_projected_once_per_image():
    torch.manual_seed(0)
    model = EfficientVLMForImageTextRetrieval(tiny_config()).eval()
    images, texts, mask = _tokens(model, 3, 8, 0)
    rows = []
    hook = model.fusion_model.layers[0].cross_attn.k_proj.register_forward_hook(
        lambda module, inputs, output: rows.append(inputs[0].shape[0]))
    image_idx = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 0, 0])
    text_idx = torch.arange(12) % 8
    model.itm_pair_scores(images, texts, mask, image_idx, text_idx, batch_size=4)
    hook.remove()
    assert sum(rows) == 3  # three images, each projected once (the per-pair engine would project 12 rows)
