"""The FLOPs cost model (training.method.cost) against torch's own FLOP counter on the real forward passes."""

import torch
from tests.conftest import ragged_config
from torch.utils.flop_counter import FlopCounterMode

from efficientvlm.training.method.cost import Run, prunable_flops, retrieval_path, unit_costs
from efficientvlm.training.method.structure import unit_groups
from modeling_efficientvlm import EfficientVLMForImageTextRetrieval


def _counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_unit_costs_equal_counted_flops_of_every_encoder():
    """Σ size × cost(unit) over an encoder's groups == the matmul FLOPs torch counts when that encoder runs (patch
    conv, ITC projections excluded), for a ragged config (removed sub-layers, vision ≠ text width)."""
    config = ragged_config()
    model = EfficientVLMForImageTextRetrieval._from_config(config, attn_implementation="eager").eval()
    g = torch.Generator().manual_seed(0)
    n_img, n_txt, length, pairs = 3, 2, 7, 5
    pixels = torch.randn(n_img, 3, 32, 32, generator=g)
    ids = torch.randint(0, 99, (n_txt, length), generator=g)
    with torch.no_grad():
        image = model.encode_image(pixels).last_hidden_state
        text = model.encode_text(ids).last_hidden_state
        tokens = image.shape[1]
        vision_run = _counted(lambda: [layer(image) for layer in model.vision_model.layers])
        text_run = _counted(lambda: [layer(text) for layer in model.text_model.layers])
        fused_text = text[[0, 1, 0, 1, 0]]
        fused_image = image[[0, 0, 1, 2, 2]]
        fusion_run = _counted(lambda: model.fuse(fused_text, None, fused_image))
    path = {
        "vision": [Run(n_img, tokens, tokens)],
        "text": [Run(n_txt, length, length)],
        "fusion": [Run(pairs, length, length, tokens)],
    }
    predicted = prunable_flops(config, path)
    assert predicted["vision"] == vision_run
    assert predicted["text"] == text_run
    assert predicted["fusion"] == fusion_run
    assert predicted["total"] == vision_run + text_run + fusion_run


def test_cached_decoding_costs_new_tokens_against_all_keys():
    """With a KV cache a step projects only its new token but reads every cached key: cost(T=1, keys=S) differs from
    a full pass, and the sum over steps is below re-running the whole prefix every step."""
    config = ragged_config()
    group = next(g for g in unit_groups(config) if g.modality == "text" and g.kind == "head" and g.size)
    steps = [Run(1, 1, s) for s in range(1, 6)]
    full = [Run(1, s, s) for s in range(1, 6)]
    costs_cached = unit_costs(config, {"text": steps})[group.name]
    costs_full = unit_costs(config, {"text": full})[group.name]
    hd, d = group.head_dim, group.hidden_size
    assert costs_cached == 2 * sum(d * hd + 2 * d * hd + hd * d + 2 * s * hd for s in range(1, 6))
    assert costs_cached < costs_full


def test_retrieval_path_puts_the_pair_count_on_fusion():
    config = ragged_config()
    path = retrieval_path(config, num_images=10, num_texts=50, text_length=12, k=4)
    assert path["vision"] == [Run(10, 17, 17)]
    assert path["text"] == [Run(50, 12, 12)]
    assert path["fusion"] == [Run(240, 12, 12, 17)]
    costs = unit_costs(config, path)
    # a fusion FFN neuron runs on 240 pairs × 12 tokens; a text FFN neuron on 50 texts × 12 tokens
    assert costs["fusion.ffn.0"] / costs["text.ffn.0"] == 240 / 50
