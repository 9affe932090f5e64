"""The FLOPs cost model (training.method.cost) against torch's own FLOP counter on the real forward passes."""

import pytest
import torch
from tests.conftest import lagrangian_game, ragged_config
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
    path = retrieval_path(config, images=10, texts=50, text_length=12, k=4)
    assert path["vision"] == [Run(10, 17, 17)]
    assert path["text"] == [Run(50, 12, 12)]
    assert path["fusion"] == [Run(240, 12, 12, 17)]
    costs = unit_costs(config, path)
    # a fusion FFN neuron runs on 240 pairs × 12 tokens; a text FFN neuron on 50 texts × 12 tokens
    assert costs["fusion.ffn.0"] / costs["text.ffn.0"] == 240 / 50


def _lagrangian_game(l0, steps: int = 400) -> dict:
    torch.manual_seed(0)
    return lagrangian_game(l0, steps, lr=0.1)


def test_flops_budget_reaches_its_target_and_differs_from_params():
    """The Lagrangian game with a FLOPs budget lands within 0.03 of the target in FLOPs of the path; the kept
    parameters are a different number (the budget weighs fusion units by their pair count), and the exact FLOPs of
    the deterministic structure (materialized config) agree with the expectation."""
    from efficientvlm.training.method.cost import path_to_json, prunable_flops
    from efficientvlm.training.method.l0 import ModalL0Module
    from efficientvlm.training.method.materialize import pruned_config
    from tests.conftest import tiny_config

    config = tiny_config()
    path = retrieval_path(config, images=10, texts=50, text_length=12, k=8)
    l0 = ModalL0Module(config, target_sparsity=0.5, budget="flops", cost_path=path_to_json(path))
    logs = _lagrangian_game(l0)
    flops_sparsity = float(l0.expected_budget_sparsity()["total"].detach())
    assert flops_sparsity == pytest.approx(0.5, abs=0.03)
    assert logs["expected_flops_sparsity_total"] == pytest.approx(flops_sparsity, abs=0.01)
    assert abs(float(l0.expected_sparsity()["total"].detach()) - flops_sparsity) > 0.03
    # push the gates to 0/1 so that the expectation is the count of the deterministic structure
    with torch.no_grad():
        for gate in l0.gates.values():
            gate.log_alpha.copy_(torch.where(gate.log_alpha > 0, 50.0, -50.0))
    kept = prunable_flops(pruned_config(config, l0.deterministic_masks()), path)["total"]
    full = prunable_flops(config, path)["total"]
    assert 1 - kept / full == pytest.approx(float(l0.expected_budget_sparsity()["total"].detach()), abs=1e-3)


def test_flops_budget_settings_round_trip_and_errors(tmp_path):
    from efficientvlm.training.method.cost import path_to_json
    from efficientvlm.training.tasks import task_path
    from efficientvlm.training.method.l0 import ModalL0Module
    from tests.conftest import tiny_config

    config = tiny_config()
    path = path_to_json(task_path("retrieval", config, "images=4,texts=20,k=2,text_length=9"))
    assert path["fusion"] == [[48, 9, 9, 17]]
    l0 = ModalL0Module(config, target_sparsity=0.3, budget="flops", cost_path=path)
    file = str(tmp_path / "gates.safetensors")
    l0.save(file)
    loaded = ModalL0Module.from_file(file, config)
    assert loaded.budget == "flops" and loaded.cost_path == path and loaded.unit_costs == l0.unit_costs
    with pytest.raises(ValueError, match="required by budget='flops'"):
        ModalL0Module(config, budget="flops")
    with pytest.raises(ValueError, match="budget must be one of"):
        ModalL0Module(config, budget="seconds")
    with pytest.raises(ValueError, match=r"unknown size 'pairs' for retrieval"):
        task_path("retrieval", config, "pairs=3")
    with pytest.raises(ValueError, match="k must be an integer >= 0"):
        task_path("retrieval", config, "k=-1")
    # image_tokens prices the units at another resolution (every task takes it; 0 = the config's own)
    assert task_path("retrieval", config, "k=2,image_tokens=197")["vision"][0].tokens == 197
    assert task_path("nlvr2", config, "image_tokens=0")["fusion"][0].cross_keys == 17
    with pytest.raises(ValueError, match="image_tokens must be an integer >= 0"):
        task_path("retrieval", config, "image_tokens=x")
    with pytest.raises(ValueError, match="no inference-path model for task 'nlvr2_domain'"):
        task_path("nlvr2_domain", config)
    with pytest.raises(ValueError, match=r"must be \[count, tokens, self_keys, cross_keys\]"):
        ModalL0Module(config, budget="flops", cost_path={"fusion": [[1, 2, 3]]})


def test_layer_gates_remove_whole_sublayers_and_materialize_equals_masked():
    """A closed sub-layer gate zeroes every unit mask of its sub-layer (an exact identity, no parameters after
    materialize); random open gates scale the unit masks; materialize == masked on random sub-layer + unit values,
    and the expected size is P(sub-layer)·Σ P(unit)·params."""
    from efficientvlm.training.method.l0 import ModalL0Module
    from efficientvlm.training.method.materialize import materialization_error, materialize
    from efficientvlm.training.method.structure import count_parameters
    from tests.conftest import tiny_config

    torch.manual_seed(0)
    config = tiny_config()
    l0 = ModalL0Module(config, layer_gates=True)
    assert l0.layer_gate(l0.groups[0]) is not None
    assert len(l0.gates) == 2 * len(l0.groups)
    model = EfficientVLMForImageTextRetrieval._from_config(config, attn_implementation="eager").eval()
    closed = {"vision.head.0", "text.ffn.1", "fusion.cross_head.0"}
    with torch.no_grad():
        for group in l0.groups:
            l0.gate(group).log_alpha.copy_(torch.randn(group.size) * 3)
            l0.layer_gate(group).log_alpha.fill_(-50.0 if group.name in closed else 50.0)
    masks = l0.deterministic_masks()
    assert not masks.vision.head[0].any() and not masks.text.ffn[1].any() and not masks.fusion.cross_head[0].any()
    pruned = materialize(model, masks)
    assert pruned.config.vision_config.num_attention_heads[0] == 0
    assert pruned.config.text_config.intermediate_size[1] == 0
    assert pruned.config.fusion_encoder_config.num_cross_attention_heads[0] == 0
    assert sum(p.numel() for p in pruned.parameters()) == count_parameters(pruned.config)["total"]
    # soft values: a sampled mask = unit sample × sub-layer sample; masked forward with them == materialized
    sampled = l0.sample_masks(torch.Generator().manual_seed(1))
    assert materialization_error(model, materialize(model, sampled, verify=False), sampled) < 1e-4
    expected = l0.expected_parameters()["total"]
    manual = sum(
        (l0.gate(g).keep_probability() * l0.layer_gate(g).keep_probability()).sum() * g.unit_params for g in l0.groups
    )
    assert float(expected.detach()) == pytest.approx(float(manual.detach()))


def test_layer_gates_reach_the_flops_target():
    from efficientvlm.training.method.cost import path_to_json
    from efficientvlm.training.method.l0 import ModalL0Module
    from tests.conftest import tiny_config

    config = tiny_config()
    path = retrieval_path(config, images=10, texts=50, text_length=12, k=8)
    l0 = ModalL0Module(config, target_sparsity=0.6, budget="flops", cost_path=path_to_json(path), layer_gates=True)
    _lagrangian_game(l0)
    assert float(l0.expected_budget_sparsity()["total"].detach()) == pytest.approx(0.6, abs=0.03)


def test_decoder_gates_reach_their_own_target():
    """The VQA answer decoder is a fourth stack: with its own target its gates are driven there (the encoders follow
    the global target)."""
    from efficientvlm.training.method.l0 import ModalL0Module
    from modeling_efficientvlm.configuration_efficientvlm import decoder_config_from_fusion
    from tests.conftest import tiny_config

    config = tiny_config()
    config.decoder_config = decoder_config_from_fusion(config)
    l0 = ModalL0Module(config, target_sparsity=0.3, modality_targets={"decoder": 0.6})
    assert l0.constraints == ["global", "decoder"] and any(g.modality == "decoder" for g in l0.groups)
    _lagrangian_game(l0)
    sparsity = l0.expected_sparsity()
    assert float(sparsity["decoder"].detach()) == pytest.approx(0.6, abs=0.03)
    kept = {m: float(l0.expected_parameters()[m].detach()) for m in ("vision", "text", "fusion")}
    total = sum(l0.prunable_by_modality[m] for m in kept)
    assert 1 - sum(kept.values()) / total == pytest.approx(0.3, abs=0.03)


def test_vqa_and_captioning_paths_match_the_encoder_flops():
    """VQA: the answer decoder's path FLOPs = the first-token step + k re-scored answers (= `vqa_flops` without its
    LM head); captioning: one step = one full pass over the prompt, and every later step costs one token against all
    cached keys (less than re-running the prefix)."""
    from efficientvlm.training.method.cost import captioning_path, vqa_path
    from efficientvlm.training.tasks import task_path
    from efficientvlm.training.method.cost import encoder_flops, vqa_flops
    from modeling_efficientvlm.configuration_efficientvlm import decoder_config_from_fusion
    from tests.conftest import tiny_config

    config = ragged_config()
    config.decoder_config = decoder_config_from_fusion(config)
    q, k, a, n = 7, 5, 4, 3
    path = vqa_path(config, questions=n, question_length=q, k=k, answer_length=a)
    reference = vqa_flops(config, questions=n, question_length=q, k=k, answer_length=a)
    dec = config.decoder_config
    lm_head = (n + n * k * a) * 2 * (dec.hidden_size * dec.hidden_size + dec.hidden_size * dec.vocab_size)
    flops = prunable_flops(config, path)
    assert flops["decoder"] == reference["decoder"] - lm_head
    assert flops["fusion"] == reference["fusion"]
    assert task_path("vqa", config, "questions=3,question_length=7,k=5,answer_length=4") == path

    config = tiny_config()
    tokens = 1 + (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    one = prunable_flops(config, captioning_path(config, images=2, prompt_length=5, new_tokens=1, beams=3))
    assert one["text"] == encoder_flops(config, "text", [Run(6, 5, 5)])
    assert one["fusion"] == encoder_flops(config, "fusion", [Run(6, 5, 5, tokens)])
    cached = prunable_flops(config, captioning_path(config, images=2, prompt_length=5, new_tokens=8, beams=3))
    rerun = sum(encoder_flops(config, "text", [Run(6, 5 + s, 5 + s)]) for s in range(8))
    assert one["text"] < cached["text"] < rerun
