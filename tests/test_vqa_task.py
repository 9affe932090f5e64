"""The VQA task: vocabulary growth, loss step (weighted LM + task KD incl. the decoder), answer-ranking evaluation,
the `visual-question-answering` pipeline in a clean interpreter, `evaluate --task vqa` and `convert-xvlm` of a VQA
checkpoint layout (`text_decoder.*`)."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from transformers import CLIPImageProcessor

from efficientvlm.training.data.tokenization import synthetic_tokenizer
from efficientvlm.training.data.vqa_dataset import QUESTION_WORDS, VQA_ANSWERS, VQACollator, make_vqa_eval_set, make_vqa_item
from efficientvlm.training.method.arguments import DistillationArguments
from efficientvlm.training.method.distillation import layer_maps
from efficientvlm.training.tasks import get_task
from efficientvlm.training.tasks import vqa as V
from modeling_efficientvlm import EfficientVLMForPreTraining, EfficientVLMForQuestionAnswering
from modeling_efficientvlm.processing_efficientvlm import EfficientVLMProcessor
from tests.conftest import run_clean_python, tiny_config


def _processor():
    return EfficientVLMProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                     crop_size={"height": 32, "width": 32}),
                                 tokenizer=synthetic_tokenizer())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny pre-training checkpoint with the synthetic vocabulary, loaded as a VQA model and prepared."""
    folder = tmp_path_factory.mktemp("vqa") / "pretrain"
    torch.manual_seed(0)
    EfficientVLMForPreTraining(tiny_config(text=dict(vocab_size=len(synthetic_tokenizer())))).save_pretrained(folder)
    processor = _processor()
    model = EfficientVLMForQuestionAnswering.from_pretrained(folder).eval()
    V.prepare_answerer(model, processor.tokenizer)
    return folder, processor, model


def _args(tmp_path, **kw):
    return DistillationArguments(output_dir=str(tmp_path), lambda_vlp=0.6, cross_attention_kd=True, report_to=[], **kw)


def _batch(processor, n=3, seed=0):
    import random

    rng = random.Random(seed)
    items = [make_vqa_item(rng, 32, i) for i in range(n)]
    items[0]["answer"] = ["red"] * 7 + ["blue"] * 3
    return VQACollator(processor)(items)


def test_prepare_grows_the_vocabulary_once_and_keeps_ids(setup):
    _, processor, model = setup
    tokenizer, base = processor.tokenizer, len(synthetic_tokenizer())
    assert len(tokenizer) == base + len(QUESTION_WORDS) == model.config.text_config.vocab_size
    assert model.config.decoder_config.vocab_size == len(tokenizer)
    decoder = model.decoder_model
    assert decoder.lm_head.bias.shape == (len(tokenizer),) and decoder.lm_head.decoder.weight.shape[0] == len(tokenizer)
    assert decoder.lm_head.decoder.weight is decoder.embeddings.word_embeddings.weight  # still tied
    assert model.text_model.embeddings.word_embeddings.num_embeddings == len(tokenizer)
    assert tokenizer.tokenize("what color is the circle?") == ["what", "color", "is", "the", "circle", "?"]
    assert tokenizer.tokenize("nowhere") == ["[UNK]"]  # whole words only
    ids = tokenizer.convert_tokens_to_ids(list(QUESTION_WORDS))
    V.prepare_answerer(model, tokenizer)  # idempotent
    assert len(tokenizer) == model.config.text_config.vocab_size and tokenizer.convert_tokens_to_ids(
        list(QUESTION_WORDS)) == ids
    fresh = _processor().tokenizer  # another stage's tokenizer gets the same ids
    V.extend_vocabulary(copy.deepcopy(model), fresh)
    assert fresh.convert_tokens_to_ids(list(QUESTION_WORDS)) == ids
    assert model.config.answer_list == list(VQA_ANSWERS) and model.generation_config.eos_token_id == \
        tokenizer.sep_token_id


def test_added_answer_rows_differ_so_a_yes_no_label_moves_the_gradient(setup, tmp_path):
    """The grown rows are distinct (seeded, the same in every run): with tied input / output rows, equal "yes" / "no"
    rows would give both answers the same logit on every question and a gradient blind to which one is the label."""
    folder, processor, model = setup
    table = model.decoder_model.embeddings.word_embeddings.weight
    added = torch.tensor(processor.tokenizer.convert_tokens_to_ids(["yes", "no", "left", "right"]))
    rows = table[added]
    assert torch.cdist(rows, rows)[~torch.eye(4, dtype=torch.bool)].min() > 1e-3
    again = EfficientVLMForQuestionAnswering.from_pretrained(folder)
    V.prepare_answerer(again, _processor().tokenizer)
    assert torch.equal(again.decoder_model.embeddings.word_embeddings.weight, table)  # deterministic
    import random

    rng = random.Random(0)
    items = [make_vqa_item(rng, 32, i, template="exists") for i in range(4)]

    def gradient(answers):
        for item, answer in zip(items, answers):
            item["answer"] = [answer] * 10
        batch = VQACollator(processor)(items)
        net = copy.deepcopy(model).train()
        total, _ = V.vqa_losses(net, None, batch, _args(tmp_path), None)
        total.backward()
        return torch.cat([p.grad.flatten() for p in net.text_model.parameters() if p.grad is not None])

    flipped = gradient(["yes", "no", "yes", "no"]) - gradient(["no", "yes", "no", "yes"])
    assert flipped.norm() > 1e-3  # was ~1e-7 with equal rows


def test_kd_is_exactly_zero_at_identity_and_task_only_without_teacher(setup, tmp_path):
    _, processor, model = setup
    batch, args = _batch(processor), _args(tmp_path)
    maps = layer_maps(model.config, model.config)
    total, parts = V.vqa_losses(model, copy.deepcopy(model), batch, args, maps)
    assert {k: float(parts[k]) for k in ("logits", "attn", "hidden")} == {"logits": 0.0, "attn": 0.0, "hidden": 0.0}
    assert float(total) == pytest.approx(0.6 * float(parts["vqa"]))
    # the weighted LM loss is the model's: Σ_a w_a · token-summed CE / B
    out = model(**{k: batch[k] for k in V._INPUT_KEYS})
    expected = (batch["answer_weights"] * out.answer_loss).sum() / 3
    assert float(parts["vqa"]) == pytest.approx(float(expected), rel=1e-5)
    total, parts = V.vqa_losses(model, None, batch, args, None)
    assert set(parts) == {"vqa", "total"} and float(total) == pytest.approx(float(parts["vqa"]))


def test_kd_covers_the_answer_decoder(setup, tmp_path):
    """A teacher that differs from the student ONLY in its decoder gives non-zero decoder-logit, attention and hidden
    KD; the weighting is 0.6·task + 0.4·(attn + hidden + logits)."""
    _, processor, model = setup
    teacher = copy.deepcopy(model)
    with torch.no_grad():
        for layer in teacher.decoder_model.layers:
            for p in list(layer.self_attn.parameters()) + list(layer.cross_attn.parameters()):
                p.add_(0.3 * torch.randn_like(p))
    batch, args = _batch(processor), _args(tmp_path)
    maps = layer_maps(model.config, teacher.config)
    total, parts = V.vqa_losses(model, teacher, batch, args, maps)
    assert all(float(parts[k]) > 1e-6 for k in ("logits", "attn", "hidden"))
    kd = sum(float(parts[k]) for k in ("logits", "attn", "hidden"))
    assert float(total) == pytest.approx(0.6 * float(parts["vqa"]) + 0.4 * kd, rel=1e-5)
    # the decoder's own terms (causal self- and cross-attention maps, hidden states over the answer tokens)
    from efficientvlm.training.method.distillation import attention_kd, hidden_kd, stack_outputs

    inputs = {k: batch[k] for k in V._INPUT_KEYS}
    s_out = model(**inputs, output_attentions=True, output_hidden_states=True)
    t_out = teacher(**inputs, output_attentions=True, output_hidden_states=True)
    s_dec, t_dec = ({"decoder": stack_outputs(out)["decoder"]} for out in (s_out, t_out))
    answer_mask = batch["answer_attention_mask"]
    pairs = {"decoder": maps["fusion"]}
    assert float(attention_kd(s_dec, t_dec, pairs, query_masks={"decoder": answer_mask}, cross=True)) > 0
    assert float(attention_kd(s_dec, s_dec, pairs, query_masks={"decoder": answer_mask}, cross=True)) == 0
    assert float(hidden_kd(s_dec, t_dec, pairs, image_weight=0.1, token_masks={"decoder": answer_mask})) > 0


def test_evaluation_ranks_the_answer_list_like_brute_force(setup):
    _, processor, model = setup
    held_out = make_vqa_eval_set(6, seed=1, image_size=32)
    data = type("Data", (), {"max_length": 40})()
    metrics = V.evaluate(model, processor, data, held_out, show_progress=False)
    assert metrics["questions"] == 6 and 0 <= metrics["accuracy"] <= 100
    predictions = V.predict_answers(model, held_out, processor, held_out.answer_list, show_progress=False)
    # brute force: full log-likelihood of every answer for every question
    ids, mask = (t for t in V.encode_answers(processor.tokenizer, VQA_ANSWERS))
    for item, predicted in zip(held_out, predictions):
        enc = processor(images=[item["image"]], text=[item["question"]], return_tensors="pt")
        out = model(pixel_values=enc["pixel_values"], input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        ll = model.answer_log_likelihood(out.question_states, enc["attention_mask"], ids, mask,
                                         answer_question_index=torch.zeros(len(VQA_ANSWERS), dtype=torch.long))
        assert predicted == VQA_ANSWERS[int(ll.argmax())]
    correct = sum(p == item["answer"][0] for p, item in zip(predictions, held_out))
    assert metrics["accuracy"] == pytest.approx(100 * correct / 6)


def test_task_record():
    task = get_task("vqa")
    assert task.model_class is EfficientVLMForQuestionAnswering and task.metric == "accuracy"
    assert task.prune_defaults["lambda_vlp"] == 0.6 and task.prune_defaults["target_sparsity"] == 0.35
    assert task.card.pipeline_tag == "visual-question-answering" and task.card.metric_keys == ("accuracy",)


@pytest.mark.slow
def test_pipeline_and_usage_snippet_in_a_clean_interpreter(setup, tmp_path):
    """The exported folder answers through `pipeline("visual-question-answering", trust_remote_code=True)` and the
    card's usage snippet, in an interpreter that cannot import this project."""
    from modeling_efficientvlm.pipeline_efficientvlm import save_pipeline_files

    _, processor, model = setup
    folder = tmp_path / "export"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    save_pipeline_files(folder)
    config = json.loads((folder / "config.json").read_text())
    assert "visual-question-answering" in config["custom_pipelines"] and config["answer_list"] == list(VQA_ANSWERS)
    usage = V.USAGE.format(repo=str(folder))
    pipe = V.USAGE_PIPELINE.split("```python")[1].split("```")[0].format(repo=str(folder))
    out = run_clean_python(f"""
        import json
        {pipe.strip().replace(chr(10), chr(10) + '        ')}
        result = vqa(Image.new("RGB", (64, 64), "red"), question="what color is the circle?", top_k=3)
        assert type(vqa).__name__ == "VisualQuestionAnsweringPipeline", type(vqa)
        assert len(result) == 3 and all(set(r) == {{"answer", "score"}} for r in result), result
        assert all(r["answer"] in vqa.model.config.answer_list for r in result)
        assert result[0]["score"] >= result[1]["score"] >= result[2]["score"]
        assert sum(r["score"] for r in result) <= 1.0001
        many = vqa([{{"image": Image.new("RGB", (32, 32)), "question": "is there a circle?"}}] * 2)
        assert len(many) == 2 and many[0] == many[1], many
        {usage.strip().replace(chr(10), chr(10) + '        ')}
        print("OK", json.dumps(result))
    """)
    assert "OK" in out


def test_evaluate_command_accepts_vqa(setup, tmp_path, capsys):
    from efficientvlm.training.commands.cli import main

    _, processor, model = setup
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    assert main(["evaluate", "--task", "vqa", "--model", str(folder), "--eval_images", "4"]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads(printed[printed.index("{"):])
    assert metrics["data"]["items"] == 4 and 0 <= metrics["accuracy"] <= 100 and metrics["questions"] == 4


# ------------------------------------------------------------------------------------------------------ conversion
def _xvlm_vqa_state(model: EfficientVLMForQuestionAnswering) -> dict[str, torch.Tensor]:
    """An X-VLM VQA state dict (`text_encoder.*` BERT names, `text_decoder.bert.*` / `text_decoder.cls.*`) with the
    values of `model`, written from an independent statement of the naming (BertLMHeadModel)."""
    bert = {"self_attn.q_proj": "attention.self.query", "self_attn.k_proj": "attention.self.key",
            "self_attn.v_proj": "attention.self.value", "self_attn.out_proj": "attention.output.dense",
            "layer_norm1": "attention.output.LayerNorm", "cross_attn.q_proj": "crossattention.self.query",
            "cross_attn.k_proj": "crossattention.self.key", "cross_attn.v_proj": "crossattention.self.value",
            "cross_attn.out_proj": "crossattention.output.dense", "layer_norm_cross": "crossattention.output.LayerNorm",
            "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense", "layer_norm2": "output.LayerNorm"}
    n_text = model.config.text_config.num_hidden_layers
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("vision_model."):
            rest = key[len("vision_model."):]
            fixed = {"embeddings.class_embedding": "class_embedding", "embeddings.patch_embedding.weight":
                     "patch_embed.weight", "embeddings.position_embedding.weight": "pos_embed.weight"}
            new = "vision_encoder." + (fixed.get(rest) or ("encoder." + rest if rest.startswith("layers.") else rest))
        elif m := re.match(r"(text|fusion|decoder)_model\.layers\.(\d+)\.(.+)\.(weight|bias)$", key):
            stack, index, module, param = m.groups()
            index = int(index) + (n_text if stack == "fusion" else 0)
            prefix = "text_decoder.bert." if stack == "decoder" else "text_encoder."
            new = f"{prefix}encoder.layer.{index}.{bert[module]}.{param}"
        elif key.startswith("text_model.embeddings."):
            new = "text_encoder." + key[len("text_model."):]
        elif key.startswith("decoder_model.embeddings."):
            new = "text_decoder.bert." + key[len("decoder_model."):]
        elif key.startswith("decoder_model.lm_head."):
            rest = key[len("decoder_model.lm_head."):]
            new = "text_decoder.cls.predictions." + (rest if rest.startswith(("bias", "decoder")) else "transform."
                                                     + rest)
        else:
            continue  # vision_proj / text_proj / temp: X-VLM's VQA model has none
        state[new] = value.clone()
    state["text_decoder.cls.predictions.decoder.bias"] = state["text_decoder.cls.predictions.bias"].clone()
    state["text_encoder.embeddings.position_ids"] = torch.arange(64)[None]
    return state


def test_convert_xvlm_vqa_layout():
    from efficientvlm.training.method.initializers import convert_xvlm_checkpoint

    torch.manual_seed(0)  # one head width for all stacks, as in X-VLM (64; here 8)
    config = tiny_config(text=dict(hidden_size=32, head_dim=8), fusion=dict(hidden_size=32, head_dim=8))
    model = EfficientVLMForQuestionAnswering(config).eval()
    with torch.no_grad():
        model.decoder_model.lm_head.bias.normal_()
    state = _xvlm_vqa_state(model)
    assert any(k.startswith("text_decoder.bert.encoder.layer.1.crossattention.") for k in state)
    converted, report = convert_xvlm_checkpoint(state, head_dim=8, return_report=True)
    assert isinstance(converted, EfficientVLMForQuestionAnswering) and report.layout == "vqa"
    # every key accounted for: converted or ignored with a reason
    assert report.num_converted + len(report.ignored) == len(state)
    assert set(report.ignored) == {"text_decoder.cls.predictions.decoder.bias", "text_encoder.embeddings.position_ids"}
    mine = converted.state_dict()
    for key, value in model.state_dict().items():
        if not key.startswith(("vision_proj", "text_proj", "temp")):
            assert torch.equal(mine[key], value), key
    assert converted.decoder_model.lm_head.decoder.weight is converted.decoder_model.embeddings.word_embeddings.weight
    bad = dict(state)
    bad["text_decoder.cls.predictions.decoder.bias"] = torch.ones_like(bad["text_decoder.cls.predictions.bias"])
    with pytest.raises(ValueError, match="text_decoder.cls.predictions.decoder.bias differs"):
        convert_xvlm_checkpoint(bad, head_dim=8)


def test_own_json_data_sets_the_answer_list_the_pipeline_ranks(setup, tmp_path):
    """A model prepared for an X-VLM VQA JSON carries that data's answer_list.json (what the exported pipeline ranks);
    without data it keeps its own list; a JSON without an answer list is refused naming the file to add."""
    import json
    from types import SimpleNamespace

    folder, processor, _ = setup
    model = EfficientVLMForQuestionAnswering.from_pretrained(folder).eval()
    (tmp_path / "vqa.json").write_text("[]")
    data = SimpleNamespace(dataset=str(tmp_path / "vqa.json"), eval_dataset=None)
    with pytest.raises(ValueError, match="answer_list.json"):
        V.TASK.prepare_model(model, processor, data)
    (tmp_path / "answer_list.json").write_text(json.dumps(["red", "two", "yes"]))
    V.TASK.prepare_model(model, processor, data)
    assert model.config.answer_list == ["red", "two", "yes"]
    V.TASK.prepare_model(model, processor)
    assert model.config.answer_list == ["red", "two", "yes"]
