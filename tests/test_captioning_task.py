"""The captioning task: checked synthetic references, the collator's labels, the loss step (LM + task KD), evaluation
and the CLI chain teacher → prune → evaluate on tiny models (CPU)."""

import ast
import functools
import json

import pytest
import torch

from modeling_efficientvlm import EfficientVLMForConditionalGeneration, EfficientVLMForPreTraining
from modeling_efficientvlm.modeling_efficientvlm import shifted_lm_loss
from modeling_efficientvlm.processing_efficientvlm import EfficientVLMProcessor, build_image_processor
from tests.conftest import run_clean_python, tiny_config
from efficientvlm.training.commands.cli import main
from efficientvlm.training.infra.presets import preset_config
from efficientvlm.training.data.collators import CaptioningCollator, caption_prompt_ids
from efficientvlm.training.data.captioning_dataset import CAPTION_MAX_OBJECTS, SyntheticCaptioningDataset, make_captioning_eval_set
from efficientvlm.training.data.scene_language import parse_statement
from efficientvlm.training.data.scene_world import statement_is_true
from efficientvlm.training.data.tokenization import synthetic_tokenizer
from efficientvlm.training.method.arguments import DistillationArguments
from efficientvlm.training.method.distillation import layer_maps
from efficientvlm.training.tasks import TASKS
from efficientvlm.training.commands.stages import DataArguments
from efficientvlm.training.tasks.captioning import (
    CAPTIONING_LAMBDA,
    GENERATION,
    captioning_losses,
    evaluate_captioning,
    generate_captions,
    generation_settings,
    prepare_captioner,
    references_of,
)


def _processor() -> EfficientVLMProcessor:
    return EfficientVLMProcessor(build_image_processor(32), synthetic_tokenizer(), max_length=40)


def _model(seed: int = 0) -> EfficientVLMForConditionalGeneration:
    torch.manual_seed(seed)
    return EfficientVLMForConditionalGeneration(tiny_config()).eval()


def _batch(n: int = 3, seed: int = 0) -> dict:
    items = iter(SyntheticCaptioningDataset(image_size=32, seed=seed))
    return CaptioningCollator(_processor())([next(items) for _ in range(n)])


def _args(tmp_path, **kw) -> DistillationArguments:
    defaults = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, lambda_vlp=CAPTIONING_LAMBDA,
                    cross_attention_kd=True)
    defaults.update(kw)
    return DistillationArguments(**defaults)


# ---------------------------------------------------------------------------------------------------------- data
def test_references_are_several_distinct_and_true_of_their_scene():
    held_out = make_captioning_eval_set(16, seed=3, image_size=32, return_scenes=True)
    references = references_of(held_out)
    assert len(references) == len(held_out["images"]) == len(held_out["scenes"]) == 16
    assert held_out["txt2img"] == [i for i, refs in enumerate(references) for _ in refs]
    for scene, refs in zip(held_out["scenes"], references):
        assert 2 <= len(scene.objects) <= CAPTION_MAX_OBJECTS
        assert 1 <= len(refs) == len(set(refs)) <= 5
        for ref in refs:
            assert statement_is_true(scene, parse_statement(ref)), ref  # re-derived from the text alone
            assert len(ref.split()) <= 15  # + [SEP] fits the 20 new tokens of the reference decoding
    assert max(len(refs) for refs in references) == 5
    items = SyntheticCaptioningDataset(image_size=32, seed=1, return_scene=True)
    for item, _ in zip(items, range(10)):
        assert statement_is_true(item["scene"], parse_statement(item["caption"]))


def test_coco_karpathy_json_trains_on_the_rest_and_evaluates_the_held_out_images(tmp_path):
    """An ALBEF / COCO Karpathy caption JSON without a test set: the held-out images (with all their references)
    are evaluated and never trained on, by the same rule as retrieval."""
    from efficientvlm.training.commands.stages import DataArguments

    records = []
    for index in range(5):
        _image().save(tmp_path / f"{index}.png")
        records.append({"image": f"{index}.png", "caption": [f"a red circle {index}", f"a big red circle {index}"]})
    (tmp_path / "train.json").write_text(json.dumps(records))
    data = DataArguments(task="captioning", dataset=str(tmp_path / "train.json"), image_root=str(tmp_path),
                         holdout_fraction=0.4)
    task = TASKS["captioning"]
    held_out = task.eval_data(data)
    rows, collator = task.train_data(data, _processor(), 0, False)
    assert task.eval_size(held_out) == 2 and len(rows) == 2 * 3 and isinstance(collator, CaptioningCollator)
    held_images = {str(path) for path in held_out["images"].paths}
    assert held_images.isdisjoint(rows["image"])
    for path, refs in zip(held_out["images"].paths, references_of(held_out)):
        index = path.rsplit("/", 1)[-1].split(".")[0]
        assert refs == [f"a red circle {index}", f"a big red circle {index}"]


def test_collator_labels_skip_the_prompt_and_the_padding():
    processor = _processor()
    prompt = caption_prompt_ids(processor.tokenizer)
    tokenizer = processor.tokenizer
    assert prompt[0] == tokenizer.cls_token_id and tokenizer.sep_token_id not in prompt and len(prompt) == 4
    captions = ["a big red circle", "a small blue square left of a big green triangle"]
    batch = CaptioningCollator(processor)([{"image": _image(), "caption": c} for c in captions])
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == labels.shape == mask.shape and batch["pixel_values"].shape == (2, 3, 32, 32)
    assert ids[:, : len(prompt)].tolist() == [prompt, prompt]
    assert (labels[:, : len(prompt)] == -100).all() and (labels[mask == 0] == -100).all()
    assert (mask[0] == 0).any()  # the short caption is padded
    for row, caption in enumerate(captions):
        kept = labels[row][labels[row] != -100].tolist()
        assert kept == tokenizer(caption, add_special_tokens=False)["input_ids"] + [tokenizer.sep_token_id]


def _image():
    from PIL import Image

    return Image.new("RGB", (32, 32), "red")


# ------------------------------------------------------------------------------------------------------ loss step
def test_kd_is_exactly_zero_when_the_student_is_the_teacher(tmp_path):
    model, batch = _model(), _batch()
    total, parts = captioning_losses(model, model, batch, _args(tmp_path), layer_maps(model.config, model.config))
    assert set(parts) == {"lm", "logits", "attn", "hidden", "total"}
    for name in ("logits", "attn", "hidden"):
        assert parts[name].item() == 0.0, name
    torch.testing.assert_close(total, CAPTIONING_LAMBDA * parts["lm"])


def test_lm_loss_is_the_label_smoothed_loss_and_terms_are_lambda_weighted(tmp_path):
    teacher, student, batch = _model(0), _model(1), _batch()
    args = _args(tmp_path, alpha_attn=0.5, beta_hidden=2.0, gamma_logits=3.0)
    total, parts = captioning_losses(student, teacher, batch, args, layer_maps(student.config, teacher.config))
    assert all(torch.isfinite(value) for value in parts.values())
    for name in ("logits", "attn", "hidden"):
        assert parts[name].item() > 0, name
    kd = 0.5 * parts["attn"] + 2.0 * parts["hidden"] + 3.0 * parts["logits"]
    torch.testing.assert_close(total, 0.7 * parts["lm"] + 0.3 * kd)
    logits = student(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                     attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(parts["lm"], shifted_lm_loss(logits, batch["labels"], 0.1))
    total.backward()
    assert student.mlm_head.decoder.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())
    alone, alone_parts = captioning_losses(student, None, batch, args, None)
    assert set(alone_parts) == {"lm", "total"}
    torch.testing.assert_close(alone, alone_parts["lm"])


class _EditedTeacher(torch.nn.Module):
    """The student's own outputs with the next-token logits changed at chosen positions (a logit-KD probe)."""

    def __init__(self, model, positions: torch.Tensor):
        super().__init__()
        self.model, self.positions = model, positions

    def forward(self, **inputs):
        out = self.model(**inputs)
        out.logits = out.logits + 5.0 * torch.randn_like(out.logits) * self.positions[..., None]
        return out


def test_logit_kd_covers_only_the_predicted_positions(tmp_path):
    model, batch = _model(), _batch()
    args, maps = _args(tmp_path), layer_maps(model.config, model.config)
    predicted = torch.zeros(batch["labels"].shape)
    predicted[:, :-1] = (batch["labels"][:, 1:] != -100).float()  # logits[:, t] predicts labels[:, t + 1]
    _, parts = captioning_losses(model, _EditedTeacher(model, 1.0 - predicted), batch, args, maps)
    assert parts["logits"].item() == 0.0  # prompt, padding and the last position changed: no KD there
    _, parts = captioning_losses(model, _EditedTeacher(model, predicted), batch, args, maps)
    assert parts["logits"].item() > 0


# ------------------------------------------------------------------------------------------------------ evaluation
def test_prepare_captioner_sets_the_prompt_and_the_reference_decoding():
    model, tokenizer = prepare_captioner(_model(), synthetic_tokenizer()), synthetic_tokenizer()
    assert model.config.caption_prompt_ids == caption_prompt_ids(tokenizer)
    generation = model.generation_config
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (
        tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id)
    # X-VLM's lengths, totals with the prompt (1-16 new tokens); `--caption_lengths new_tokens`: 5-20 new tokens
    assert (generation.num_beams, generation.min_length, generation.max_length) == (3, 5, 20)
    assert generation.min_new_tokens is None and generation.max_new_tokens is None
    data = DataArguments(task="captioning", caption_lengths="new_tokens")
    generation = prepare_captioner(_model(), tokenizer, settings=generation_settings(data)).generation_config
    assert (generation.min_new_tokens, generation.max_new_tokens) == (5, 20)
    assert generation_settings(DataArguments(task="captioning")) == GENERATION
    with pytest.raises(ValueError, match="--caption_lengths must be one of"):
        DataArguments(task="captioning", caption_lengths="paper")


def test_generation_prepares_a_model_without_prompt_or_end_token():
    """A pre-training checkpoint (no prompt ids) and a materialized model (default generation config: no end token)
    are made captioners before generating, so decoding stops at [SEP]."""
    processor, model = _processor(), _model()
    model.config.caption_prompt_ids = caption_prompt_ids(processor.tokenizer)  # what a materialized config keeps
    assert model.generation_config.eos_token_id is None
    assert len(generate_captions(model, [_image()], processor, show_progress=False)) == 1
    assert model.generation_config.eos_token_id == processor.tokenizer.sep_token_id


def test_evaluate_returns_bleu4_and_cider_in_percent():
    held_out = make_captioning_eval_set(3, seed=0, image_size=32)
    processor, model = _processor(), _model()
    metrics = evaluate_captioning(model, held_out["images"], references_of(held_out), processor,
                                  show_progress=False)
    assert set(metrics) == {"bleu4", "cider", "captions"} and metrics["captions"] == 3
    assert 0 <= metrics["bleu4"] <= 100 and metrics["cider"] >= 0
    assert TASKS["captioning"].metric in metrics
    with pytest.raises(ValueError, match="one reference list per image"):
        evaluate_captioning(model, held_out["images"], references_of(held_out)[:2], processor, show_progress=False)


def test_generation_passes_the_pruning_masks_to_every_decoding_step(monkeypatch):
    """A gated student is evaluated at its masks: every forward of `generate` (beam search, cached) receives them."""
    from modeling_efficientvlm import PruningMasks

    model, masks, seen = _model(), PruningMasks(), []
    forward = model.forward

    @functools.wraps(forward)  # generate validates its kwargs against forward's signature
    def spy(*args, **kwargs):
        seen.append(kwargs.get("pruning_masks"))
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", spy)
    captions = generate_captions(model, [_image(), _image()], _processor(), pruning_masks=masks, show_progress=False,
                                 min_new_tokens=5)
    assert len(captions) == 2 and len(seen) >= 5  # at least min_new_tokens decoding steps
    assert all(value is masks for value in seen)


@pytest.mark.slow
def test_card_usage_snippet_captions_in_a_clean_interpreter(tmp_path):
    """The card's AutoModelForImageTextToText snippet runs with only torch + transformers (remote code)."""
    processor = _processor()
    prepare_captioner(_model(), processor.tokenizer).save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    card = TASKS["captioning"].card
    assert (card.pipeline_tag, card.metric_keys) == ("image-to-text", ("bleu4", "cider"))
    output = run_clean_python(card.usage.format(repo=tmp_path)).strip().splitlines()[-1]
    captions = ast.literal_eval(output)
    assert isinstance(captions, list) and len(captions) == 1 and isinstance(captions[0], str)


# -------------------------------------------------------------------------------------------------------- the CLI
COMMON = ["--image_size", "32", "--eval_images", "3", "--per_device_train_batch_size", "4", "--report_to", "none",
          "--save_strategy", "no", "--use_cpu", "true", "--disable_tqdm", "true"]


def test_cli_teacher_prune_evaluate_for_captioning(tmp_path, capsys):
    """A pre-training checkpoint (tiny preset + its processor) → `teacher --task captioning --init_from` →
    `prune --task captioning` (the pre-training checkpoint as the student) → `evaluate --task captioning`."""
    root = tmp_path
    processor = _processor()
    torch.manual_seed(0)
    EfficientVLMForPreTraining(preset_config("tiny", 32, len(processor.tokenizer))).save_pretrained(root / "pretrained")
    processor.save_pretrained(root / "pretrained")
    assert main(["teacher", "--task", "captioning", "--init_from", str(root / "pretrained"),
                 "--output_dir", str(root / "teacher"), "--max_steps", "2", *COMMON]) == 0
    config = json.loads((root / "teacher" / "config.json").read_text())
    assert config["architectures"] == ["EfficientVLMForConditionalGeneration"]
    assert json.loads((root / "teacher" / "generation_config.json").read_text())["num_beams"] == 3
    assert main(["prune", "--task", "captioning", "--student", str(root / "pretrained"), "--teacher",
                 str(root / "teacher"), "--output_dir", str(root / "pruned"), "--max_steps", "2",
                 "--target_sparsity", "0.3", *COMMON]) == 0
    for name in ("teacher", "pruned"):  # both were built from a checkpoint without prompt: the stages prepared them
        config = json.loads((root / name / "config.json").read_text())
        assert config["caption_prompt_ids"] == caption_prompt_ids(synthetic_tokenizer()), name
        metrics = json.loads((root / name / "eval_results.json").read_text())
        assert {"bleu4", "cider", "captions"} <= set(metrics) and metrics["captions"] == 3
    assert (root / "pruned" / "l0_gates.safetensors").exists()
    capsys.readouterr()
    assert main(["evaluate", "--task", "captioning", "--model", str(root / "pretrained"), "--eval_images", "3"]) == 0
    metrics = json.loads(capsys.readouterr().out)  # a pre-training checkpoint captions once prepared by the stage
    assert metrics["captions"] == 3 and 0 <= metrics["bleu4"] <= 100
