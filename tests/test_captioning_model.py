"""The captioning model (#17): causal text + fusion decoder, tied LM head, shifted label-smoothed loss, KV cache,
transformers' `generate` (greedy / beam search) and the built-in image-text-to-text pipeline as Hub remote code."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import BertTokenizer, DynamicCache

from modeling_efficientvlm import (
    EfficientVLMCaptioningOutput,
    EfficientVLMForConditionalGeneration,
    EfficientVLMForPreTraining,
    EncoderPruningMasks,
    PruningMasks,
)
from modeling_efficientvlm.modeling_efficientvlm import CAPTION_GENERATION_DEFAULTS, shifted_lm_loss
from modeling_efficientvlm.pipeline_efficientvlm import save_pipeline_files
from modeling_efficientvlm.processing_efficientvlm import EfficientVLMProcessor, build_image_processor
from tests.conftest import ragged_config, run_clean_python, tiny_config, tiny_inputs

PROMPT = [2, 10, 11, 12]  # "[CLS] a picture of" in a 99-token toy vocabulary
EOS = 3


def captioner(config=None, seed: int = 0, attn: str = "eager") -> EfficientVLMForConditionalGeneration:
    torch.manual_seed(seed)
    config = config or tiny_config(text=dict(initializer_range=0.3))
    model = EfficientVLMForConditionalGeneration._from_config(config, attn_implementation=attn).eval()
    model.config.caption_prompt_ids = PROMPT
    model.generation_config.eos_token_id = EOS
    return model


@torch.no_grad()
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_no_token_sees_the_future(attn):
    """Changing token k changes no logit before k (text and fusion stacks); eager and sdpa agree."""
    model = captioner(attn=attn)
    x = tiny_inputs(batch=3, length=9)
    base = model(**x).logits
    for k in (3, 6, 8):
        changed = {**x, "input_ids": x["input_ids"].clone()}
        changed["input_ids"][:, k] = (changed["input_ids"][:, k] + 7) % 99
        logits = model(**changed).logits
        torch.testing.assert_close(logits[:, :k], base[:, :k], atol=0, rtol=0)
        assert (logits[:, k] - base[:, k]).abs().max() > 1e-4  # the changed token itself does matter
    other = captioner(attn="sdpa" if attn == "eager" else "eager")
    torch.testing.assert_close(other(**x).logits, base, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_attention_probabilities_are_causal_and_skip_padding():
    model = captioner()
    x = tiny_inputs(batch=3, length=7)  # row 0: the last 2 tokens are padding
    out = model(**x, output_attentions=True, output_hidden_states=True)
    assert isinstance(out, EfficientVLMCaptioningOutput)
    future = torch.ones(7, 7, dtype=torch.bool).triu(1)
    for probs in (*out.text.attentions, *out.fusion.attentions):
        assert probs[..., future].abs().max() == 0
        assert probs[0, :, :, 5:].abs().max() == 0  # padded keys
    assert out.fusion.cross_attentions[0].shape == (3, 4, 7, 17)
    assert len(out.vision.hidden_states) == 3 and out.image_tokens.shape == (3, 17, 32)


def hand_loss(logits: torch.Tensor, labels: torch.Tensor, eps: float) -> torch.Tensor:
    """Mean over kept (b, t) of (1 − ε)·(−log p[label]) + ε·mean_v(−log p[v]), logits[t − 1] predicting labels[t]."""
    logp = logits.double().log_softmax(-1)
    terms = []
    for b, t in itertools.product(range(labels.shape[0]), range(1, labels.shape[1])):
        if labels[b, t] != -100:
            terms.append((1 - eps) * -logp[b, t - 1, labels[b, t]] + eps * -logp[b, t - 1].mean())
    return torch.stack(terms).mean()


@torch.no_grad()
def test_loss_is_shifted_label_smoothed_cross_entropy_without_the_prompt():
    model = captioner()
    x = tiny_inputs(batch=3, length=9)
    labels = x["input_ids"].masked_fill(x["attention_mask"] == 0, -100)
    labels[:, : len(PROMPT)] = -100  # "[CLS] a picture of": out of the loss
    out = model(**x, labels=labels)
    torch.testing.assert_close(out.loss.double(), hand_loss(out.logits, labels, 0.1), atol=1e-5, rtol=1e-5)
    plain = model(**x, labels=labels, label_smoothing=0.0).loss
    torch.testing.assert_close(plain, F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()))
    model.config.caption_label_smoothing = 0.3  # the config default is read at call time
    torch.testing.assert_close(model(**x, labels=labels).loss.double(), hand_loss(out.logits, labels, 0.3),
                               atol=1e-5, rtol=1e-5)
    # the logits that predict prompt tokens (positions 0..P-2) do not enter the loss at all
    noisy = out.logits.clone()
    noisy[:, : len(PROMPT) - 1] += 5 * torch.randn_like(noisy[:, : len(PROMPT) - 1])
    torch.testing.assert_close(shifted_lm_loss(noisy, labels, 0.1), shifted_lm_loss(out.logits, labels, 0.1))


def test_lm_head_is_tied_and_a_pretraining_checkpoint_loads_completely(tmp_path):
    torch.manual_seed(0)
    pretraining = EfficientVLMForPreTraining(tiny_config()).eval()
    pretraining.save_pretrained(tmp_path)
    model, info = EfficientVLMForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    assert set(info["unexpected_keys"]) <= {k for k in pretraining.state_dict() if k.startswith("itm_head.")}
    assert model.mlm_head.decoder.weight is model.text_model.embeddings.word_embeddings.weight
    source = pretraining.state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, source[name], atol=0, rtol=0, msg=name)
    for key, value in CAPTION_GENERATION_DEFAULTS.items():  # no generation_config.json: the paper's decoding
        assert getattr(model.generation_config, key) == value


@torch.no_grad()
@pytest.mark.parametrize("make_config", [tiny_config, ragged_config], ids=["dense", "ragged"])
def test_cached_step_logits_equal_the_full_forward(make_config):
    """Decoding token by token with a DynamicCache (incl. removed self-attention layers) = one full forward."""
    model = captioner(make_config())
    x = tiny_inputs(batch=2, length=8)
    x["attention_mask"][0, 2] = 0  # a padded key inside the cached part
    full = model(**x).logits
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))  # as generate builds it: 2 layers
    image_tokens = model.encode_image(x["pixel_values"]).last_hidden_state
    steps = []
    for t in range(8):
        out = model(input_ids=x["input_ids"][:, t : t + 1], attention_mask=x["attention_mask"][:, : t + 1],
                    image_tokens=image_tokens, past_key_values=cache, use_cache=True)
        steps.append(out.logits)
        cache = out.cache
    assert len(cache.layers) == model.num_decoder_layers and cache.get_seq_length() == 8
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("num_beams", [1, 3])
def test_cached_generation_equals_uncached(num_beams):
    model = captioner()
    pixels = tiny_inputs(batch=3)["pixel_values"]
    kwargs = dict(num_beams=num_beams, max_new_tokens=8, min_new_tokens=2, return_dict_in_generate=True,
                  output_scores=True)
    cached = model.generate(pixel_values=pixels, use_cache=True, **kwargs)
    uncached = model.generate(pixel_values=pixels, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert cached.sequences.shape[0] == 3 and cached.sequences.shape[1] >= 2  # only the new tokens
    assert (cached.sequences[:, :2] != EOS).all()  # min_new_tokens holds
    if num_beams > 1:
        torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_generate_defaults_and_prompt():
    """Without input_ids every caption starts from config.caption_prompt_ids; the prompt is not returned; the
    defaults are beam 3 and X-VLM's lengths (max 20 / min 5 with the 4-token prompt: 1-16 new tokens); a tokenized
    prompt ending in [SEP] equals the stored prompt."""
    model = captioner()
    assert {k: getattr(model.generation_config, k) for k in CAPTION_GENERATION_DEFAULTS} == CAPTION_GENERATION_DEFAULTS
    pixels = tiny_inputs(batch=2)["pixel_values"]
    new = model.generate(pixel_values=pixels)
    assert new.shape[0] == 2 and 1 <= new.shape[1] <= 20 - len(PROMPT)
    prompt = torch.tensor([PROMPT + [EOS]] * 2)  # "[CLS] a picture of [SEP]" as a tokenizer returns it
    full = model.generate(pixel_values=pixels, input_ids=prompt, attention_mask=torch.ones_like(prompt))
    assert torch.equal(full[:, : len(PROMPT)], prompt[:, :-1]) and torch.equal(full[:, len(PROMPT) :], new)
    model.config.caption_prompt_ids = None
    with pytest.raises(ValueError, match="caption_prompt_ids"):
        model.generate(pixel_values=pixels)


@torch.no_grad()
def test_default_lengths_are_xvlm_totals_with_the_prompt():
    """X-VLM Captioning.yaml: max_length 20 / min_length 5 count the prompt "[CLS] a picture of" (4 tokens): a
    captioner that never stops early writes exactly 16 new tokens by default; explicit new-token counts still win."""
    model = captioner()
    model.generation_config.eos_token_id = None  # decode to the length limit
    pixels = tiny_inputs(batch=2)["pixel_values"]
    assert model.generate(pixel_values=pixels).shape[1] == 20 - len(PROMPT) == 16
    assert model.generate(pixel_values=pixels, max_new_tokens=20, min_new_tokens=5).shape[1] == 20
    assert model.generate(pixel_values=pixels, max_length=10).shape[1] == 10 - len(PROMPT)
    model.generation_config.max_new_tokens = 7  # a generation config with new-token counts (earlier checkpoints)
    assert model.generate(pixel_values=pixels).shape[1] == 7
    # the least: min_length 5 = one new token after the prompt, so [SEP] cannot come first
    model.generation_config.max_new_tokens, model.generation_config.eos_token_id = None, EOS
    scores = model.generate(pixel_values=pixels, output_scores=True, return_dict_in_generate=True).scores
    assert torch.isinf(scores[0][:, EOS]).all() and not torch.isinf(scores[1][:, EOS]).all()


def sequence_log_probs(model, prompt: list[int], image_tokens: torch.Tensor, new_tokens: torch.Tensor) -> torch.Tensor:
    """Σ_t log p(new_t | image, prompt, new_<t) for each row of new_tokens (N, L), one image (1, 1 + N_img, D)."""
    ids = torch.cat([torch.tensor(prompt).expand(len(new_tokens), -1), new_tokens], 1)
    logp = model(input_ids=ids, image_tokens=image_tokens.expand(len(ids), -1, -1)).logits.log_softmax(-1)
    return logp[:, len(prompt) - 1 : -1].gather(-1, new_tokens[..., None])[..., 0].sum(-1)


BEAM_SEED = 18  # a model where greedy decoding misses the best sequence


@torch.no_grad()
def test_beam_search_returns_the_highest_scoring_sequence():
    """Exhaustive search over a 6-token vocabulary and 3 new tokens (216 sequences, no eos): beam search with 3
    beams returns the best one (greedy does not, on this seed); its score is transformers'
    Σ log p / L^length_penalty."""
    model = captioner(tiny_config(text=dict(vocab_size=6, initializer_range=1.0)), seed=BEAM_SEED)
    prompt, length = [2, 4, 5], 3
    model.config.caption_prompt_ids = prompt
    pixels = tiny_inputs(batch=1)["pixel_values"]
    candidates = torch.tensor(list(itertools.product(range(6), repeat=length)))  # (216, 3)
    logp = sequence_log_probs(model, prompt, model.encode_image(pixels).last_hidden_state, candidates)
    best = candidates[logp.argmax()]
    common = dict(pixel_values=pixels, max_new_tokens=length, min_new_tokens=length, eos_token_id=None,
                  length_penalty=1.0)
    beam = model.generate(num_beams=3, return_dict_in_generate=True, output_scores=True, **common)
    greedy = model.generate(num_beams=1, **common)
    assert torch.equal(beam.sequences[0], best)
    assert not torch.equal(greedy[0], best)
    torch.testing.assert_close(beam.sequences_scores[0], logp.max() / length, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_masked_forward_equals_materialized():
    from efficientvlm.training.method.materialize import materialize

    model = captioner()
    masks = PruningMasks(
        vision=EncoderPruningMasks(head=[torch.tensor([1.0, 0, 1, 1]), None],
                                   ffn=[None, (torch.arange(37) % 3 > 0).float()]),
        text=EncoderPruningMasks(head=[torch.zeros(4), torch.tensor([0.0, 1, 0, 1])], ffn=[torch.ones(37), None]),
        fusion=EncoderPruningMasks(head=[torch.tensor([1.0, 1, 0, 0]), None],
                                   cross_head=[None, torch.tensor([0.0, 0, 1, 0])], ffn=[None, torch.zeros(37)]),
    )
    model.config.caption_prompt_ids = PROMPT
    model.generation_config.eos_token_id = EOS
    pruned = materialize(model, masks)
    assert type(pruned) is EfficientVLMForConditionalGeneration
    # the prompt (config) and the decoding settings (generation config) travel with the materialized model
    assert pruned.config.caption_prompt_ids == PROMPT and pruned.generation_config.eos_token_id == EOS
    assert pruned.config.text_config.num_attention_heads == [0, 2]
    x = tiny_inputs(batch=2, length=8)
    torch.testing.assert_close(pruned(**x).logits, model(**x, pruning_masks=masks).logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(pruned.generate(pixel_values=x["pixel_values"]),
                       model.generate(pixel_values=x["pixel_values"], pruning_masks=masks))


WORDS = ["a", "picture", "of", "red", "blue", "circle", "square", "left"]


@pytest.mark.slow
def test_image_to_text_pipeline_in_clean_interpreter(tmp_path):
    """The built-in pipeline("image-to-text") (transformers 5: image-text-to-text) on a saved folder, without our
    package: same captions as generate in process."""
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    processor = EfficientVLMProcessor(build_image_processor(32), BertTokenizer(vocab=vocab))
    model = captioner(tiny_config(text=dict(vocab_size=len(vocab), initializer_range=0.3)))
    prompt = processor.tokenizer("a picture of")["input_ids"][:-1]  # [CLS] a picture of
    model.config.caption_prompt_ids = prompt
    model.generation_config.update(bos_token_id=2, eos_token_id=3, pad_token_id=0)
    with torch.no_grad():  # words rather than [PAD] / [UNK] / [CLS] / [MASK], so the decoded caption is not empty
        model.mlm_head.bias[[0, 1, 2, 4]] = -20.0
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    save_pipeline_files(tmp_path)
    rng = np.random.default_rng(0)
    path = str(tmp_path / "image.png")
    Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForImageTextToText"] == "modeling_efficientvlm.EfficientVLMForConditionalGeneration"
    assert auto_map["AutoModel"] == "modeling_efficientvlm.EfficientVLMForImageTextRetrieval"
    out = run_clean_python(
        f"""
        import json
        from transformers import pipeline
        pipe = pipeline("image-to-text", model={str(tmp_path)!r}, trust_remote_code=True)
        assert type(pipe.model).__name__ == "EfficientVLMForConditionalGeneration", type(pipe.model)
        full = pipe({path!r}, text="a picture of")
        new = pipe({path!r}, text="a picture of", return_full_text=False)
        print(json.dumps([full[0]["generated_text"], new[0]["generated_text"]]))
        """
    )
    full, new = json.loads(out.strip().splitlines()[-1])
    with torch.no_grad():
        pixels = processor(images=Image.open(path))["pixel_values"]
        ids = model.generate(pixel_values=pixels)
    caption = processor.tokenizer.decode(ids[0], skip_special_tokens=True)
    assert new.strip() == caption and full == "a picture of " + caption, (full, new, caption)
