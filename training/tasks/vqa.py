"""Visual question answering (X-VLM / EfficientVLM `EffXVLMForVQA`): loss step (weighted LM loss + task KD), data,
answer ranking evaluation, inference path.

The student and teacher are `EfficientVLMForQuestionAnswering` models: text and fusion encoders read (question, image)
as for retrieval; the answer decoder (causal self-attention, cross-attention to the fusion output, FFN, LM head tied
to its word embeddings) is trained teacher-forced on every annotator answer of a question, each answer's token-summed
cross-entropy weighted by its annotator share (`VQACollator`; the model computes Σ_a w_a·CE_a / B).

Task KD (λ = 0.6 task + 0.4 KD, the official EfficientVLM VQA config): decoder-logit KL on the predicted answer
positions (teacher-forced on
the same answers), attention KD of the vision / text / fusion self-attention, the fusion cross-attention and the
decoder's causal self- and cross-attention, hidden-state KD of all three encoders and the decoder. The decoder pairs
are the student's layer map for "decoder" when it has one, else the fusion map (each decoder layer is initialised
from the fusion layer of the same index, in teacher and student alike).

Evaluation: the paper's answer ranking over a fixed answer list (`rank_answers`: first-token probability of every
answer, top-k (128), full-sequence log-likelihood, argmax), scored by VQA accuracy
(`training.metrics.vqa_scores`, percent).

Vocabulary: the demo's synthetic caption vocabulary has no question words ("what", "how", "yes", "no", ...).
`prepare_model` adds the missing `QUESTION_WORDS` to the tokenizer (whole-word added tokens, the same ids in every
stage since they are appended in one fixed order) and grows the model's word embeddings (text encoder and decoder; new
rows = mean of the old ones, as transformers' `mean_resizing`). A real BERT vocabulary has them all: nothing changes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from modeling_efficientvlm import EfficientVLMForQuestionAnswering

from ..data.vqa_dataset import QUESTION_WORDS, VQA_ANSWERS, VQACollator, VQAItems, encode_answers, iter_questions
from ..method import losses as L
from ..method.cost import vqa_flops, vqa_path
from ..method.distillation import attention_kd, hidden_kd, stack_outputs
from .base import ModelCardSpec, Task, blind_training_sample

VQA_LAMBDA = 0.6
"""Official VQA weighting: 0.6·task + 0.4·KD (the `prune --task vqa` default of `lambda_vlp`)."""
RANK_K = 128
"""Answers re-scored by their full log-likelihood per question (X-VLM's k_test)."""
ANSWER_MAX_LENGTH = 10
"""Answer tokens incl. [CLS] and [SEP] (X-VLM truncates answers the same way)."""
_INPUT_KEYS = ("pixel_values", "input_ids", "attention_mask", "answer_input_ids", "answer_attention_mask",
               "answer_weights", "answer_question_index")


# --------------------------------------------------------------------------------------------------- vocabulary
def extend_vocabulary(model: nn.Module, tokenizer: Any, words: Sequence[str] = QUESTION_WORDS) -> list[str]:
    """Adds the `words` the tokenizer lacks (whole-word added tokens; "?" matches anywhere) and grows the model's word
    embeddings to the tokenizer's length. Returns the words added.

    Growing: every `*word_embeddings` table with `text_config.vocab_size` rows gets new rows drawn around the mean of
    its old rows (seeded noise of each dimension's spread: distinct rows, see `_grow_word_embeddings`), the LM-head
    biases of that size get zeros, `text_config.vocab_size` (and `decoder_config.vocab_size`)
    become the new size, and the output embeddings are re-tied.

    Raises:
        ValueError: the tokenizer already has more tokens than the model has rows for another reason (a tokenizer that
            does not belong to the model).
    """
    from tokenizers import AddedToken

    vocab = tokenizer.get_vocab()
    added = [word for word in words if word not in vocab]
    if added:
        tokenizer.add_tokens([AddedToken(w, single_word=w.isalnum(), normalized=True) for w in added])
    _grow_word_embeddings(model, len(tokenizer))
    return added


@torch.no_grad()
def _grow_word_embeddings(model: nn.Module, size: int) -> None:
    """Grows the word embeddings / LM-head biases of `model` from `text_config.vocab_size` rows to `size`.

    New rows = the old rows' mean + seeded Gaussian noise scaled by each dimension's standard deviation. They must
    differ: the output layer is tied to the embedding, so two answers that start with equal rows ("yes" and "no")
    get the same logit on every question and a gradient that does not depend on which of them is the label — a saddle
    that training does not leave (measured: the gradient of a batch of "exists" questions changed by 3e-6 of 31.5
    when every answer was flipped; all models answered every yes/no question alike). transformers' own mean resizing
    adds noise of ~1e-9 of the covariance, which is just as symmetric."""
    config = model.config
    old = config.text_config.vocab_size
    if size <= old:
        return
    generator = torch.Generator().manual_seed(0)  # the same rows in every run
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and name.endswith("word_embeddings") and module.num_embeddings == old:
            weight = module.weight
            noise = torch.randn(size - old, weight.shape[1], generator=generator).to(weight)
            rows = weight.mean(0, keepdim=True) + noise * weight.std(0, keepdim=True)
            module.weight = nn.Parameter(torch.cat([weight, rows]), requires_grad=weight.requires_grad)
            module.num_embeddings = size
        elif isinstance(module, nn.Linear) and module.out_features == old and name.endswith("head.decoder"):
            module.out_features = size  # tied: its weight is the grown word embedding after `tie_weights`
        bias = getattr(module, "bias", None)
        if name.endswith("head") and isinstance(bias, nn.Parameter) and bias.shape == (old,):
            module.bias = nn.Parameter(torch.cat([bias, bias.new_zeros(size - old)]))
    config.text_config.vocab_size = size
    if getattr(config, "decoder_config", None) is not None:
        config.decoder_config.vocab_size = size
    model.tie_weights()


def prepare_answerer(model: nn.Module, tokenizer: Any, answer_list: Sequence[str] | None = None) -> nn.Module:
    """Makes `model` a VQA model for `tokenizer`: the question words (`extend_vocabulary`), the generation config
    (bos = [CLS], eos = [SEP], pad = [PAD], for `generate`) and `config.answer_list` (what the pipeline ranks):
    `answer_list`, else the model's own, else the synthetic answers `VQA_ANSWERS`. Returns `model`."""
    extend_vocabulary(model, tokenizer)
    ids = {"bos_token_id": tokenizer.cls_token_id, "eos_token_id": tokenizer.sep_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    missing = [name for name, value in ids.items() if value is None]
    if missing:
        raise ValueError(f"VQA needs a BERT-style tokenizer with [CLS], [SEP] and [PAD]; missing {missing}")
    if getattr(model, "generation_config", None) is None:
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig()
    for name, value in ids.items():
        setattr(model.generation_config, name, value)
    if answer_list is not None or not getattr(model.config, "answer_list", None):
        model.config.answer_list = list(answer_list if answer_list is not None else VQA_ANSWERS)
    return model


def _prepare_model(model, processor, data=None) -> None:
    """`Task.prepare_model`: `prepare_answerer` with the processor's tokenizer and, for a model trained or evaluated on
    an X-VLM VQA JSON, that data's answer list (`answer_list.json` beside it), so the exported pipeline ranks the
    answers the model was trained for (synthetic data: `VQA_ANSWERS`)."""
    answer_list = None
    if data is not None:
        source = data.dataset if data.dataset != "synthetic" else getattr(data, "eval_dataset", None)
        if source:
            answer_list = _answer_list_for(source)
    prepare_answerer(model, processor.tokenizer, answer_list)


# --------------------------------------------------------------------------------------------------------- loss step
def vqa_losses(
    student, teacher, inputs: dict, args, maps: dict | None, *, masks=None, generator: torch.Generator | None = None,
    step: int = 0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted answer LM loss of the student + task KD from the teacher on the same teacher-forced answers.

    total = λ·L_vqa + (1 − λ)·(α·L_attn + β·L_hid + γ·L_logits), λ = `args.lambda_vlp` (official VQA: 0.6).
    L_vqa = Σ_a w_a · Σ_t CE_a,t / B (the model's loss). L_logits = T²·KL(teacher ‖ student) over the predicted answer
    positions (logits[:, t] with answer token t + 1 real). L_attn = mean of the attention terms: vision / text / fusion
    self-attention, fusion cross-attention (with `args.cross_attention_kd`), decoder causal self-attention and decoder
    cross-attention (with `args.cross_attention_kd`); the decoder's query rows are its real answer tokens. L_hid = Σ
    of the encoders' hidden KD (vision weighted by `args.image_hidden_weight`) + the decoder's over its answer tokens.

    Args:
        student: an `EfficientVLMForQuestionAnswering` (trained).
        teacher: an `EfficientVLMForQuestionAnswering` (frozen; no grad, no masks), or None for the task loss only.
        inputs: a `VQACollator` batch.
        args: the distillation weights (`DistillationArguments` or any object with the same fields).
        maps: `kd_pairs(layer map)`; "decoder" pairs when present, else the fusion pairs. Unused without a teacher.
        masks: the student's `PruningMasks` (pruning), or None.
        generator, step: unused (VQA samples nothing); the loss-step signature is shared by all tasks.

    Returns:
        (total scalar, parts): "vqa", the KD terms computed ("logits", "attn", "hidden") and "total".

    Raises:
        KeyError: the batch lacks one of the collator's keys.
    """
    missing = [key for key in _INPUT_KEYS if key not in inputs]
    if missing:
        raise KeyError(f"VQA batches need {missing} (got keys {sorted(inputs)}); use VQACollator")
    use_attn = teacher is not None and args.alpha_attn > 0
    use_hidden = teacher is not None and args.beta_hidden > 0
    model_inputs = {key: inputs[key] for key in _INPUT_KEYS}
    s_out = student(**model_inputs, pruning_masks=masks, output_attentions=use_attn, output_hidden_states=use_hidden)
    task = {"vqa": s_out.loss}
    if teacher is None:
        return L.combine_losses(task, {}, lambda_vlp=1.0, alpha_attn=0.0, beta_hidden=0.0, gamma_logits=0.0)
    with torch.no_grad():
        t_out = teacher(**model_inputs, output_attentions=use_attn, output_hidden_states=use_hidden)
    device = s_out.logits.device
    answer_mask = inputs["answer_attention_mask"].to(device)
    predicted = answer_mask[:, 1:].bool()  # logits[:, t] predicts answer token t + 1
    kd = {"logits": L.logit_kd_loss(s_out.logits[:, :-1][predicted], t_out.logits[:, :-1][predicted],
                                    args.kd_temperature)}
    cross = bool(args.cross_attention_kd)
    pairs = {**maps, "decoder": maps.get("decoder", maps["fusion"])}  # decoders mirror their fusion depth
    student_stacks, teacher_stacks = stack_outputs(s_out), stack_outputs(t_out)
    text_mask = inputs["attention_mask"]
    if use_attn:
        kd["attn"] = attention_kd(student_stacks, teacher_stacks, pairs, query_masks={
            "image": None, "text": text_mask, "fusion": text_mask, "decoder": answer_mask,
        }, cross=cross, key_length_scale=args.attention_key_length_scale)
    if use_hidden:
        kd["hidden"] = hidden_kd(student_stacks, teacher_stacks, pairs, image_weight=args.image_hidden_weight,
                                 token_masks={"decoder": answer_mask})
    return L.combine_losses(task, kd, lambda_vlp=args.lambda_vlp, alpha_attn=args.alpha_attn,
                            beta_hidden=args.beta_hidden, gamma_logits=args.gamma_logits)


# -------------------------------------------------------------------------------------------------------------- data
def _answer_list_for(path: str) -> list[str]:
    """The answer list of a VQA JSON: `answer_list.json` beside it (X-VLM's layout)."""
    import os

    from ..data.vqa_dataset import answer_list_beside, load_answer_list

    answer_file = answer_list_beside(path)
    if not os.path.isfile(answer_file):
        raise ValueError(f"VQA evaluation ranks a fixed answer list: put it as {answer_file} (a JSON list of answer "
                         f"strings, X-VLM's answer_list.json) beside {path}")
    return load_answer_list(answer_file)


def train_data(data, processor, seed: int, mlm: bool):
    """(train dataset, collator): synthetic VQA (`SyntheticVQADataset`) or an X-VLM VQA JSON (without
    `--eval_dataset`: less its held-out questions). `mlm` is unused."""
    collator = VQACollator(processor, max_length=data.max_length, answer_max_length=ANSWER_MAX_LENGTH)
    if data.dataset == "synthetic":
        from ..data.vqa_dataset import SyntheticVQADataset

        return SyntheticVQADataset(seed=seed, image_size=data.image_size), collator
    from ..data.holdout import held_out_rows
    from ..data.vqa_dataset import load_vqa_json

    items = load_vqa_json(data.dataset, data.image_root)
    if not data.eval_dataset:
        items = [items[row] for row in held_out_rows(data, range(len(items)), False)]
    return items, collator


def eval_data(data) -> VQAItems:
    """The held-out questions with their answer list: `--eval_dataset` (X-VLM VQA JSON with annotator answers), else
    the questions of a JSON `--dataset` held out from training, else `--eval_images` synthetic questions."""
    if data.eval_dataset or data.dataset != "synthetic":
        from ..data.holdout import held_out_rows
        from ..data.vqa_dataset import load_vqa_json

        path = data.eval_dataset or data.dataset
        items = load_vqa_json(path, data.image_root, check_images=bool(data.eval_dataset))
        if not data.eval_dataset:
            items = [items[row] for row in held_out_rows(data, range(len(items)), True)]
        return VQAItems(items, _answer_list_for(path))
    from ..data.vqa_dataset import make_vqa_eval_set

    return make_vqa_eval_set(data.eval_images, seed=data.eval_seed, image_size=data.image_size)


# -------------------------------------------------------------------------------------------------------- evaluation
def predict_answers(
    model: torch.nn.Module,
    items: Sequence[dict],
    processor: Any,
    answer_list: Sequence[str],
    *, batch_size: int = 32,
    k: int = RANK_K,
    max_length: int = 40,
    pruning_masks: Any = None,
    show_progress: bool = True,
) -> list[str]:
    """The ranked answer (`rank_answers`: top-k by first-token probability, then full log-likelihood) per item."""
    from ..data.files import load_image

    items = [item for _, item in iter_questions(items)]
    if not items or not answer_list:
        raise ValueError(f"need at least one question and one candidate answer, got {len(items)} and "
                         f"{len(answer_list)}")
    parameter = next(model.parameters())
    device, dtype = parameter.device, parameter.dtype
    answer_ids, answer_mask = (t.to(device) for t in encode_answers(processor.tokenizer, answer_list,
                                                                    ANSWER_MAX_LENGTH))
    predictions: list[str] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in tqdm(range(0, len(items), batch_size), desc="VQA", disable=not show_progress):
                batch = items[start : start + batch_size]
                encoded = processor(images=[load_image(item["image"]) for item in batch],
                                    text=[item["question"] for item in batch], padding="longest", truncation=True,
                                    max_length=max_length, return_tensors="pt")
                _, indices = model.rank_answers(
                    pixel_values=encoded["pixel_values"].to(device=device, dtype=dtype),
                    input_ids=encoded["input_ids"].to(device), attention_mask=encoded["attention_mask"].to(device),
                    answer_ids=answer_ids, answer_attention_mask=answer_mask, k=k, pruning_masks=pruning_masks)
                predictions.extend(answer_list[i] for i in indices[:, 0].tolist())
    finally:
        model.train(was_training)
    return predictions


def evaluate_vqa(model, items: Sequence[dict], processor: Any, answer_list: Sequence[str], *, batch_size: int = 32,
                 k: int = RANK_K, max_length: int = 40, pruning_masks: Any = None, show_progress: bool = True,
                 return_per_item: bool = False) -> dict[str, float] | tuple[dict[str, float], Any]:
    """VQA accuracy (percent) of the ranked answers against each item's annotator answers; with synthetic items also
    per template ("accuracy_<template>").

    With `return_per_item` also the (N,) float64 numpy array of each question's score in percent (100 × the official
    per-question score in [0, 1]); its mean is "accuracy" (for `training.metrics.confidence.mean_ci95`).

    Raises:
        ValueError: an item without annotator answers (a test split scored elsewhere cannot be evaluated here).
    """
    import numpy as np

    from ..metrics.vqa_scores import vqa_scores

    unanswered = [index for index, item in enumerate(items) if not item.get("answer")]
    if unanswered:
        raise ValueError(f"VQA item {unanswered[0]} has no annotator answers ({len(unanswered)} such items): "
                         "evaluation needs the 'answer' lists")
    predictions = predict_answers(model, items, processor, answer_list, batch_size=batch_size, k=k,
                                  max_length=max_length, pruning_masks=pruning_masks,
                                  show_progress=show_progress)
    scores = vqa_scores(predictions, [item["answer"] for item in items])
    metrics = {"accuracy": 100.0 * sum(scores) / len(scores), "questions": len(scores)}
    templates: dict[str, list[float]] = {}
    for item, score in zip(items, scores):
        if "template" in item:
            templates.setdefault(item["template"], []).append(score)
    for template, values in sorted(templates.items()):
        metrics[f"accuracy_{template}"] = 100.0 * sum(values) / len(values)
    return (metrics, 100.0 * np.asarray(scores, dtype=np.float64)) if return_per_item else metrics


def evaluate(model, processor, data, held_out, show_progress: bool = True, pruning_masks=None, *,
             return_per_item: bool = False) -> dict | tuple[dict, Any]:
    """The task's metrics on `held_out` (see `eval_data`), ranking `held_out.answer_list`; with `return_per_item`
    also each question's score in percent (see `evaluate_vqa`)."""
    answer_list = getattr(held_out, "answer_list", None) or getattr(model.config, "answer_list", None) or VQA_ANSWERS
    return evaluate_vqa(model, held_out, processor, answer_list, max_length=data.max_length,
                        pruning_masks=pruning_masks, show_progress=show_progress, return_per_item=return_per_item)


def blind_baseline(data, held_out) -> dict | None:
    """The question-only predictor (`question_only_baseline`: per question text its most common answer in a fresh
    training sample, else its template's, else the overall one) scored on `held_out` (synthetic data only)."""
    from ..data.vqa_dataset import make_vqa_item, question_only_baseline

    train = blind_training_sample(data, "vqa", lambda rng: make_vqa_item(rng, image_size=8))
    if train is None:
        return None
    return {"accuracy": question_only_baseline(train, held_out),
            "what": f"question only: the most common answer of each question in {len(train)} training items"}


# ---------------------------------------------------------------------------------------------------- inference path
def workload(model, processor, data, held_out, batch: int) -> Callable[[], Any]:
    """Answer `batch` held-out questions by ranking the answer list (encoders, first-token scores, top-k full
    log-likelihood)."""
    from ..data.files import load_image

    items = list(held_out)[:batch]
    answer_list = getattr(held_out, "answer_list", None) or VQA_ANSWERS
    encoded = processor(images=[load_image(item["image"]) for item in items], text=[i["question"] for i in items],
                        padding="longest", truncation=True, max_length=data.max_length, return_tensors="pt")
    answer_ids, answer_mask = encode_answers(processor.tokenizer, answer_list, ANSWER_MAX_LENGTH)
    inputs = {key: encoded[key] for key in ("pixel_values", "input_ids", "attention_mask")}
    return lambda: model.rank_answers(**inputs, answer_ids=answer_ids, answer_attention_mask=answer_mask, k=RANK_K)


def workload_text(data, batch: int) -> str:
    return (f"VQA answer ranking of {batch} held-out questions: encoders, first-token scores of every answer of the "
            f"answer list, top-{RANK_K} re-scored by full log-likelihood")


USAGE = """import torch
from PIL import Image
from transformers import AutoModelForVisualQuestionAnswering, AutoProcessor

model = AutoModelForVisualQuestionAnswering.from_pretrained("{repo}", trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained("{repo}", trust_remote_code=True)
answers = model.config.answer_list  # the answer list the model ranks
inputs = processor(images=[Image.new("RGB", (64, 64), "red")], text=["what color is the circle?"])
candidates = processor.tokenizer(answers, padding="longest", return_tensors="pt")
with torch.no_grad():
    scores, indices = model.rank_answers(pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"],
                                         attention_mask=inputs["attention_mask"], answer_ids=candidates["input_ids"],
                                         answer_attention_mask=candidates["attention_mask"], k=128)
print(answers[indices[0, 0]])"""

USAGE_PIPELINE = """Visual question answering pipeline:

```python
from PIL import Image
from transformers import pipeline

vqa = pipeline("visual-question-answering", model="{repo}", trust_remote_code=True)
print(vqa(Image.new("RGB", (64, 64), "red"), question="what color is the circle?", top_k=3))
```

The pipeline ranks the model's answer list (`config.answer_list`) as the paper does and returns
`[{{"answer": ..., "score": probability}}, ...]` (scores: softmax of the answers' log-likelihoods over the re-scored
top-k)."""

TASK = Task(
    name="vqa",
    model_class=EfficientVLMForQuestionAnswering,
    teacher_class=EfficientVLMForQuestionAnswering,
    metric="accuracy",
    loss_step=vqa_losses,
    # official VQA config: 0.6·task + 0.4·KD, reg lr 0.01, target 0.35 (official EfficientVLM VQA config), cross-attention maps
    prune_defaults={"lambda_vlp": VQA_LAMBDA, "reg_learning_rate": 0.01, "cross_attention_kd": True,
                    "target_sparsity": 0.35},
    train_data=train_data,
    eval_data=eval_data,
    eval_size=len,
    evaluate=evaluate,
    workload=workload,
    workload_text=workload_text,
    # no published per-modality finding for VQA: the retrieval split (vision pruned least) as the hand split
    manual_split="vision={half},text=auto,fusion=auto",
    card=ModelCardSpec(
        task_type="visual-question-answering", pipeline_tag="visual-question-answering", tag="vqa",
        heads="answer decoder (causal self-attention, cross-attention to the fusion output, LM head tied to its word "
              "embeddings); answers ranked over a fixed answer list",
        speed_name="VQA answer ranking", usage=USAGE, usage_pipeline=USAGE_PIPELINE,
        metric_keys=("accuracy",), report_keys=("accuracy",), title="VQA",
    ),
    description="image + question → answer ranked over a fixed answer list; VQA accuracy",
    prepare_model=_prepare_model,
    # rank_answers: the top k_test = 128 answers re-scored over <= 10 tokens
    path_sizes={"questions": 1000, "question_length": 40, "k": RANK_K, "answer_length": ANSWER_MAX_LENGTH},
    cost_path=vqa_path,
    flops=vqa_flops,
    blind_baseline=blind_baseline,
)
