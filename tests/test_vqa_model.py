"""VQA model (#16): answer decoder config, EfficientVLMForQuestionAnswering (loss, ranking, generation, loading) and
the decoder as the fourth prunable stack of the method layer (gates, size model, materialize, student init)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from efficientvlm.training.method.l0 import ModalL0Module
from efficientvlm.training.method.materialize import materialize
from efficientvlm.training.method.structure import VQA_HEADS, count_parameters, modalities, structure_table
from efficientvlm.training.method.student import init_student_from_teacher, resolve_layer_map
from modeling_efficientvlm import (
    EfficientVLMConfig,
    EfficientVLMForPreTraining,
    EfficientVLMForImageTextRetrieval,
    EfficientVLMForQuestionAnswering,
    EncoderPruningMasks,
    PruningMasks,
    decoder_config_from_fusion,
)
from tests.conftest import tiny_config, tiny_inputs

BOS, EOS, PAD = 1, 2, 0


def vqa_config(**overrides) -> EfficientVLMConfig:
    """Tiny config with a decoder built from its fusion encoder; a wide init so answers score differently."""
    config = tiny_config(text=dict(initializer_range=0.3), **overrides)
    config.decoder_config = decoder_config_from_fusion(config)
    return config


def answers(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded "[CLS] tokens... [SEP]" candidates with `lengths` answer tokens each."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths) + 2
    ids = torch.full((len(lengths), width), PAD)
    for row, n in enumerate(lengths):
        ids[row, : n + 2] = torch.cat([torch.tensor([BOS]), torch.randint(5, 99, (n,), generator=g),
                                       torch.tensor([EOS])])
    return ids, (ids != PAD).long()


def model_and_question(config: EfficientVLMConfig | None = None, batch: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    model = EfficientVLMForQuestionAnswering(config or vqa_config()).eval()
    return model, tiny_inputs(batch=batch, seed=seed)


def test_decoder_config_validation_and_round_trip(tmp_path):
    config = vqa_config()
    decoder = config.decoder_config
    assert decoder.encoder_hidden_size == config.fusion_encoder_config.hidden_size == 24  # reads the fusion output
    assert decoder.vocab_size == config.text_config.vocab_size
    assert tiny_config().decoder_config is None and tiny_config().to_dict()["decoder_config"] is None
    decoder.num_attention_heads, decoder.intermediate_size = [3, 0], [0, 5]
    config.save_pretrained(tmp_path)
    loaded = EfficientVLMConfig.from_pretrained(tmp_path)
    assert loaded.decoder_config.num_attention_heads == [3, 0] and loaded.decoder_config.intermediate_size == [0, 5]
    assert EfficientVLMConfig(**config.to_dict()).decoder_config.to_dict() == config.decoder_config.to_dict()
    bad = config.to_dict()
    bad["decoder_config"]["encoder_hidden_size"] = 32
    with pytest.raises(ValueError, match="decoder_config.encoder_hidden_size .* fusion_encoder_config.hidden_size"):
        EfficientVLMConfig(**bad)
    bad = config.to_dict()
    bad["decoder_config"]["vocab_size"] = 98
    with pytest.raises(ValueError, match="decoder_config.vocab_size"):
        EfficientVLMConfig(**bad)
    bad = config.to_dict()
    bad["decoder_config"]["num_hidden_layers"] = 10**7
    with pytest.raises(ValueError, match=r"decoder_config.num_hidden_layers must be .*\(MAX_LAYERS\)"):
        EfficientVLMConfig(**bad)


def test_shapes_and_lm_head_tied_to_decoder_embeddings():
    model, inputs = model_and_question()
    ids, mask = answers([1, 3, 2, 2, 1])
    out = model(**inputs, answer_input_ids=ids, answer_attention_mask=mask, answer_question_index=torch.tensor(
        [0, 0, 1, 2, 2]), answer_weights=torch.ones(5), output_attentions=True, output_hidden_states=True)
    assert out.logits.shape == (5, ids.shape[1], 99) and out.answer_loss.shape == (5,)
    assert out.question_states.shape == (3, inputs["input_ids"].shape[1], 24)
    decoded = out.decoder_model_output
    assert len(decoded.hidden_states) == 3 and decoded.attentions[0].shape == (5, 4, ids.shape[1], ids.shape[1])
    assert decoded.cross_attentions[1].shape == (5, 4, ids.shape[1], inputs["input_ids"].shape[1])
    head, embeddings = model.decoder_model.lm_head.decoder.weight, model.decoder_model.embeddings.word_embeddings.weight
    assert head is embeddings and head is not model.text_model.embeddings.word_embeddings.weight
    assert model.get_output_embeddings().weight is embeddings


def test_weighted_answer_loss_by_hand():
    model, inputs = model_and_question(batch=2)
    ids, mask = answers([2, 1, 3])
    index, weights = torch.tensor([0, 0, 1]), torch.tensor([0.7, 0.3, 1.0])
    out = model(**inputs, answer_input_ids=ids, answer_attention_mask=mask, answer_question_index=index,
                answer_weights=weights)
    log_probs = out.logits.log_softmax(-1)
    expected = 0.0
    for a in range(3):  # Σ_a w_a · Σ_t −log p(token t | < t), over the real tokens after [CLS], / 2 questions
        n = int(mask[a].sum())
        nll = -sum(log_probs[a, t - 1, ids[a, t]] for t in range(1, n))
        expected = expected + weights[a] * nll
    torch.testing.assert_close(out.loss, expected / 2)
    # answer a reads its own question: the same answer decoded for question 1 alone gives answer 2's loss
    alone = model(**{k: v[1:] for k, v in inputs.items()}, answer_input_ids=ids[2:], answer_attention_mask=mask[2:],
                  answer_weights=torch.ones(1))
    torch.testing.assert_close(alone.answer_loss, out.answer_loss[2:])


def brute_force_log_likelihood(model, states, question_mask, ids, mask) -> torch.Tensor:
    """(B, A): every (question, answer) pair teacher-forced on its own (unpadded), one decoder forward each."""
    batch = states.shape[0]
    out = torch.empty(batch, ids.shape[0])
    with torch.no_grad():
        for q in range(batch):
            for a in range(ids.shape[0]):
                n = int(mask[a].sum())
                result = model(question_states=states[q : q + 1], question_attention_mask=question_mask[q : q + 1],
                               answer_input_ids=ids[a : a + 1, :n], answer_attention_mask=mask[a : a + 1, :n],
                               answer_weights=torch.ones(1))
                out[q, a] = -result.answer_loss[0]
    return out


def test_rank_answers_equals_brute_force_scoring():
    model, inputs = model_and_question()
    ids, mask = answers([6, 2, 1, 3, 2, 1, 2, 1], seed=3)
    with torch.no_grad():  # candidate 0: the most probable first token, then a long (unlikely) tail
        states = model(**inputs).question_states
        start = torch.full((3, 1), BOS)
        vocab_first = model.decode(start, torch.ones_like(start), states, inputs["attention_mask"])[0][:, 0]
    ids[0, 1] = int(vocab_first[0].argmax())
    brute = brute_force_log_likelihood(model, states, inputs["attention_mask"], ids, mask)
    scores, indices = model.rank_answers(**inputs, answer_ids=ids, answer_attention_mask=mask, k=8, batch_size=5)
    expected_scores, expected_indices = brute.sort(dim=1, descending=True)
    assert torch.equal(indices, expected_indices)
    torch.testing.assert_close(scores, expected_scores, atol=1e-4, rtol=1e-4)
    # k < A: the first-token probabilities pick the candidates; the argmax is found when it is among them
    first = vocab_first.log_softmax(-1)[:, ids[:, 1]]  # (B, A) first-token log-probabilities of the candidates
    order = first.argsort(dim=1, descending=True)
    rank_of_best = (order == brute.argmax(1, keepdim=True)).float().argmax(1)  # (B,) position in first-token order
    assert bool(((rank_of_best > 0) & (rank_of_best < 7)).any()), "seed gives no case where top-k matters"
    for q in range(3):
        k = int(rank_of_best[q]) + 1
        _, picked = model.rank_answers(question_states=states[q : q + 1], question_attention_mask=inputs[
            "attention_mask"][q : q + 1], answer_ids=ids, answer_attention_mask=mask, k=k)
        assert picked.shape == (1, k) and int(picked[0, 0]) == int(brute[q].argmax())
        if k > 1:  # one candidate fewer: the argmax is out, the best of the remaining top-(k − 1) wins
            _, picked = model.rank_answers(question_states=states[q : q + 1], question_attention_mask=inputs[
                "attention_mask"][q : q + 1], answer_ids=ids, answer_attention_mask=mask, k=k - 1)
            kept = order[q, : k - 1]
            assert int(picked[0, 0]) == int(kept[brute[q, kept].argmax()])
    with pytest.raises(ValueError, match="same start token"):
        bad = ids.clone()
        bad[0, 0] = 7
        model.rank_answers(**inputs, answer_ids=bad, answer_attention_mask=mask)


def test_generate_with_cache_equals_without_and_greedy_by_hand():
    model, inputs = model_and_question()
    model.generation_config.bos_token_id, model.generation_config.eos_token_id = BOS, None
    cached = model.generate(**inputs, max_new_tokens=4)
    uncached = model.generate(**inputs, max_new_tokens=4, use_cache=False)
    assert cached.shape == (3, 4) and torch.equal(cached, uncached)
    ids = torch.full((3, 1), BOS)
    with torch.no_grad():
        states = model(**inputs).question_states
        for _ in range(4):  # greedy decoding by hand, full recomputation each step
            logits = model(question_states=states, question_attention_mask=inputs["attention_mask"],
                           answer_input_ids=ids, answer_attention_mask=torch.ones_like(ids)).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, ids[:, 1:])
    beams = model.generate(**inputs, max_new_tokens=3, num_beams=3)
    assert torch.equal(beams, model.generate(**inputs, max_new_tokens=3, num_beams=3, use_cache=False))


def test_save_load_round_trip_with_pruned_decoder_and_other_classes(tmp_path):
    config = vqa_config(vision=dict(hidden_size=24))
    config.decoder_config.num_attention_heads = [1, 0]
    config.decoder_config.num_cross_attention_heads = [2, 3]
    config.decoder_config.intermediate_size = [0, 5]
    model, inputs = model_and_question(EfficientVLMConfig(**config.to_dict()))
    ids, mask = answers([1, 2, 3])
    model.save_pretrained(tmp_path)
    loaded, info = EfficientVLMForQuestionAnswering.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert loaded.config.decoder_config.intermediate_size == [0, 5]
    assert not hasattr(loaded.decoder_model.layers[0], "mlp")
    with torch.no_grad():
        a = model(**inputs, answer_input_ids=ids, answer_attention_mask=mask).logits
        b = loaded.eval()(**inputs, answer_input_ids=ids, answer_attention_mask=mask).logits
    torch.testing.assert_close(a, b)
    from transformers import AutoModelForVisualQuestionAnswering

    auto = AutoModelForVisualQuestionAnswering.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(auto).__name__ == "EfficientVLMForQuestionAnswering"
    _, info = EfficientVLMForImageTextRetrieval.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["unexpected_keys"]  # decoder_model.* dropped silently by the other classes


def test_decoder_initialised_from_pretraining_checkpoint_by_value(tmp_path):
    torch.manual_seed(0)
    source = EfficientVLMForPreTraining(tiny_config(vision=dict(hidden_size=24), text=dict(initializer_range=0.3)))
    source.save_pretrained(tmp_path)
    assert source.config.decoder_config is None
    model, info = EfficientVLMForQuestionAnswering.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.decoder_config.num_hidden_layers == 2
    fusion = dict(source.fusion_model.layers.named_parameters())
    decoder_layers = dict(model.decoder_model.layers.named_parameters())
    assert decoder_layers.keys() == fusion.keys()  # incl. cross k/v: vision width = fusion width here
    for name, tensor in decoder_layers.items():
        assert torch.equal(tensor, fusion[name]), name
    for name, tensor in model.decoder_model.embeddings.named_parameters():
        assert torch.equal(tensor, dict(source.text_model.embeddings.named_parameters())[name]), name
    for name in ("dense.weight", "dense.bias", "LayerNorm.weight", "bias"):  # the MLM head becomes the answer head
        assert torch.equal(model.decoder_model.lm_head.get_parameter(name), source.mlm_head.get_parameter(name))
    assert model.decoder_model.lm_head.decoder.weight is model.decoder_model.embeddings.word_embeddings.weight
    # the encoders are not the decoder's: a later update of one leaves the other alone
    assert model.decoder_model.layers[0].mlp.fc1.weight.data_ptr() != model.fusion_model.layers[0].mlp.fc1.weight.data_ptr()


def test_eager_and_sdpa_agree():
    model, inputs = model_and_question()
    ids, mask = answers([2, 1, 3])
    eager = EfficientVLMForQuestionAnswering._from_config(copy.deepcopy(model.config), attn_implementation="eager")
    eager.eval()
    eager.load_state_dict(model.state_dict())
    assert eager.config.decoder_config._attn_implementation == "eager"
    assert model.config.decoder_config._attn_implementation == "sdpa"
    with torch.no_grad():
        a = model(**inputs, answer_input_ids=ids, answer_attention_mask=mask).logits
        b = eager(**inputs, answer_input_ids=ids, answer_attention_mask=mask).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def random_masks(config, seed: int = 0) -> PruningMasks:
    """Random 0/1 masks (with a fully removed decoder sub-layer) and random scales on kept units."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for modality in modalities(config):
        sub = getattr(config, {"vision": "vision_config", "text": "text_config", "fusion": "fusion_encoder_config",
                               "decoder": "decoder_config"}[modality])
        masks = {}
        for kind, field in (("head", "num_attention_heads"), ("cross_head", "num_cross_attention_heads"),
                            ("ffn", "intermediate_size")):
            if not hasattr(sub, field) or (kind == "cross_head" and modality not in ("fusion", "decoder")):
                continue
            masks[kind] = [(torch.rand(n, generator=g) > 0.4).float() * (0.5 + torch.rand(n, generator=g))
                           for n in getattr(sub, field)]
        out[modality] = EncoderPruningMasks(**masks)
    out["decoder"].head[1] = torch.zeros_like(out["decoder"].head[1])  # a removed decoder self-attention
    return PruningMasks(**out)


def test_decoder_gates_size_model_and_materialize():
    model, inputs = model_and_question()
    config = model.config
    assert modalities(config) == ("vision", "text", "fusion", "decoder") and modalities(tiny_config())[-1] == "fusion"
    l0 = ModalL0Module(config, target_sparsity=0.35)
    assert {"decoder_head_0", "decoder_cross_head_1", "decoder_ffn_1"} <= set(l0.gates)
    assert set(l0.expected_sparsity()) == {"total", "vision", "text", "fusion", "decoder"}
    sampled = l0.sample_masks()
    assert sampled.decoder.cross_head[0].shape == (4,) and sampled.decoder.ffn[1].shape == (37,)
    actual = sum(p.numel() for p in model.parameters())
    counted = count_parameters(config, VQA_HEADS)
    assert counted["total"] == actual and counted["decoder"] > 0
    assert structure_table(config)["decoder"]["cross_heads"] == [4, 4]

    masks = random_masks(config)
    pruned = materialize(model, masks, verify=True)
    assert pruned.config.decoder_config.num_attention_heads[1] == 0
    assert count_parameters(pruned.config, VQA_HEADS)["total"] == sum(p.numel() for p in pruned.parameters())
    assert pruned.decoder_model.lm_head.decoder.weight is pruned.decoder_model.embeddings.word_embeddings.weight
    ids, mask = answers([2, 1, 3])
    with torch.no_grad():
        masked = model(**inputs, answer_input_ids=ids, answer_attention_mask=mask, pruning_masks=masks).logits
        dense = pruned(**inputs, answer_input_ids=ids, answer_attention_mask=mask).logits
        unmasked = model(**inputs, answer_input_ids=ids, answer_attention_mask=mask).logits
    torch.testing.assert_close(dense, masked, atol=1e-4, rtol=1e-4)
    assert (unmasked - masked).abs().max() > 1e-2  # the masks change the decoder: the check above is not vacuous
    only_decoder = PruningMasks(decoder=masks.decoder)
    with torch.no_grad():
        changed = model(**inputs, answer_input_ids=ids, answer_attention_mask=mask, pruning_masks=only_decoder).logits
    assert (changed - unmasked).abs().max() > 1e-2  # the decoder masks reach the decoder


def test_student_of_vqa_teacher_takes_every_other_decoder_layer():
    teacher_config = vqa_config(fusion=dict(num_hidden_layers=4, intermediate_size=[5, 6, 7, 8]))
    teacher = EfficientVLMForQuestionAnswering(teacher_config)
    student = init_student_from_teacher(teacher)
    assert student.config.decoder_config.num_hidden_layers == 2
    assert student.config.decoder_config.intermediate_size == [6, 8]
    for i, t in enumerate((1, 3)):
        assert torch.equal(student.decoder_model.layers[i].mlp.fc1.weight,
                           teacher.decoder_model.layers[t].mlp.fc1.weight)
    assert torch.equal(student.decoder_model.embeddings.word_embeddings.weight,
                       teacher.decoder_model.embeddings.word_embeddings.weight)
    layer_map = resolve_layer_map(student.config, teacher.config)
    assert layer_map["decoder"] == layer_map["fusion"] == [1, 3]
    assert "decoder" not in resolve_layer_map(tiny_config(), tiny_config())


def test_answer_token_loss_matches_mean_form():
    """The per-answer token sum equals the mean-reduced library loss times the token count (one answer)."""
    from modeling_efficientvlm.modeling_efficientvlm import answer_token_loss, shifted_lm_loss

    logits = torch.randn(1, 5, 11)
    labels = torch.tensor([[-100, 3, 4, 2, -100]])
    torch.testing.assert_close(answer_token_loss(logits, labels)[0], 3 * shifted_lm_loss(logits, labels))
    torch.testing.assert_close(answer_token_loss(logits, labels)[0],
                               F.cross_entropy(logits[0, :3], torch.tensor([3, 4, 2]), reduction="sum"))
