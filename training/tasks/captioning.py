"""Image captioning (X-VLM `EffXVLMForCaptioning`): loss step (LM loss + task KD), data, evaluation, inference path.

The student and teacher are `EfficientVLMForConditionalGeneration` models: the text and fusion stacks form one causal
decoder (text layers self-attend causally, fusion layers also cross-attend to the image tokens) with the MLM head as
LM head. Training text is "[CLS] a picture of <caption> [SEP]" with [CLS] and the prompt out of the loss
(`CaptioningCollator`); the model shifts the labels itself and smooths them by 0.1 (X-VLM captioning).

Task KD: decoder-logit KL on the predicted positions (teacher-forced on the same batch), attention KD over the vision
self-attention, the causal text and fusion self-attention and (with `cross_attention_kd`) the fusion cross-attention,
and hidden-state KD of all three stacks, with the shared helpers of `training.method.distillation`.

Evaluation: beam search 3, X-VLM's lengths (`max_length` 20 / `min_length` 5 including the 4-token prompt "[CLS] a
picture of", i.e. 1-16 new tokens; `GENERATION`; `--caption_lengths new_tokens`: 5-20 new tokens), BLEU-4 and CIDEr-D
with the COCO caption
toolkit's tokenisation (`training.metrics.caption_scores`), in percent. METEOR and SPICE need the toolkit's Java tools
and are not computed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from modeling_efficientvlm import EfficientVLMForConditionalGeneration

from ..data.collators import CAPTION_PROMPT, caption_prompt_ids
from ..method import losses as L
from ..method.cost import captioning_flops, captioning_path
from ..method.distillation import attention_kd, forward_with_teacher, hidden_kd
from .base import ModelCardSpec, Task, blind_training_sample

CAPTIONING_LAMBDA = 0.7
"""Official captioning weighting: 0.7·task + 0.3·KD (the `prune --task captioning` default of `lambda_vlp`)."""
CAPTION_LENGTHS = {
    # X-VLM Captioning.yaml (max_length 20, min_length 5) as HF `generate` lengths: totals that include the prompt
    "official": {"min_length": 5, "max_length": 20, "min_new_tokens": None, "max_new_tokens": None},
    # this package's earlier decoding: 5-20 tokens after the prompt
    "new_tokens": {"min_new_tokens": 5, "max_new_tokens": 20},
}
"""Decode lengths by `--caption_lengths`; the None entries clear a generation config's new-token counts."""
GENERATION = {"num_beams": 3, **CAPTION_LENGTHS["official"]}
"""The reference decoding (X-VLM captioning): beam search 3, max_length 20 / min_length 5 counted with the prompt
("[CLS] a picture of" = 4 tokens: at least 1, at most 16 new tokens)."""


def generation_settings(data=None) -> dict:
    """`GENERATION` with the lengths `data.caption_lengths` picks (default: the official ones)."""
    return {"num_beams": 3, **CAPTION_LENGTHS[getattr(data, "caption_lengths", None) or "official"]}


def prepare_captioner(model, tokenizer, prompt: str = CAPTION_PROMPT, settings: dict | None = None):
    """Makes `model` a captioner for `tokenizer`: sets `config.caption_prompt_ids` ([CLS] + prompt tokens, no [SEP])
    and the generation config (bos = [CLS], eos = [SEP], pad = [PAD], `GENERATION`), so `model.generate(pixel_values)`
    and a saved checkpoint (generation_config.json) caption with the reference decoding (`GENERATION`, or
    `settings`). Returns `model`.

    Raises:
        ValueError: the tokenizer lacks [CLS], [SEP] or [PAD].
    """
    ids = {"cls": tokenizer.cls_token_id, "sep": tokenizer.sep_token_id, "pad": tokenizer.pad_token_id}
    missing = [name for name, value in ids.items() if value is None]
    if missing:
        raise ValueError(f"captioning needs a BERT-style tokenizer with [CLS], [SEP] and [PAD]; missing {missing}")
    model.config.caption_prompt_ids = caption_prompt_ids(tokenizer, prompt)
    if getattr(model, "generation_config", None) is None:
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig()
    settings = {"bos_token_id": ids["cls"], "eos_token_id": ids["sep"], "pad_token_id": ids["pad"],
                **(settings or GENERATION)}
    for name, value in settings.items():
        setattr(model.generation_config, name, value)
    return model


def _prepare_model(model, processor, data=None) -> None:
    """`Task.prepare_model`: `prepare_captioner` with the processor's tokenizer and `--caption_lengths`."""
    prepare_captioner(model, processor.tokenizer, settings=generation_settings(data))


def _ensure_captioner(model, processor) -> None:
    """Prepares a model that was never made a captioner (e.g. a pre-training checkpoint loaded directly) or whose
    generation config lost its end token (a freshly materialized model starts from a default generation config)."""
    generation = getattr(model, "generation_config", None)
    if not getattr(model.config, "caption_prompt_ids", None) or getattr(generation, "eos_token_id", None) is None:
        prepare_captioner(model, processor.tokenizer)


# --------------------------------------------------------------------------------------------------------- loss step
def _encoder_outputs(output) -> dict:
    """Per-stack outputs under the keys the KD helpers expect ("image", "text", "fusion")."""
    return {"image": output.vision, "text": output.text, "fusion": output.fusion}


def captioning_losses(
    student, teacher, inputs: dict, args, maps: dict | None, *, masks=None, generator: torch.Generator | None = None,
    step: int = 0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Label-smoothed LM loss of the student + task KD from the teacher on the same teacher-forced batch.

    total = λ·L_lm + (1 − λ)·(α·L_attn + β·L_hid + γ·L_logits), λ = `args.lambda_vlp` (official captioning: 0.7).
    L_logits = T²·KL(teacher ‖ student) over the predicted positions only (logits[:, t] with labels[:, t + 1] kept:
    the caption tokens and [SEP], not the prompt or padding), T = `args.kd_temperature`. Attention KD covers the
    vision self-attention, the causal self-attention of the text and fusion stacks and, with
    `args.cross_attention_kd`, the fusion cross-attention to the image tokens (query padding masked); hidden KD covers
    all three stacks (vision down-weighted by `args.image_hidden_weight`).

    Args:
        student: an `EfficientVLMForConditionalGeneration` (trained).
        teacher: an `EfficientVLMForConditionalGeneration` (frozen; run under no_grad, without masks), or None for the
            LM loss only (teacher fine-tuning).
        inputs: a `CaptioningCollator` batch: pixel_values (B, C, H, W), input_ids / attention_mask / labels (B, T).
        args: the distillation weights (`DistillationArguments` or any object with the same fields).
        maps: `kd_pairs(layer map)`; unused when `teacher` is None.
        masks: the student's `PruningMasks` (pruning), or None.
        generator, step: unused (captioning samples nothing); the loss-step signature is shared by all tasks.

    Returns:
        (total scalar, parts): parts holds "lm", the KD terms computed ("logits", "attn", "hidden") and "total".

    Raises:
        KeyError: the batch lacks one of the collator's keys.
    """
    missing = [key for key in ("pixel_values", "input_ids", "attention_mask", "labels") if key not in inputs]
    if missing:
        raise KeyError(f"captioning batches need {missing} (got keys {sorted(inputs)}); use CaptioningCollator")
    s_out, t_out, use_attn, use_hidden = forward_with_teacher(student, teacher, inputs, args, masks)
    task = {"lm": s_out.loss}
    if teacher is None:
        return L.combine_losses(task, {}, lambda_vlp=1.0, alpha_attn=0.0, beta_hidden=0.0, gamma_logits=0.0)
    predicted = (inputs["labels"][:, 1:] != -100).to(s_out.logits.device)  # (B, T - 1): logits[:, t] → labels[:, t+1]
    kd = {"logits": L.logit_kd_loss(s_out.logits[:, :-1][predicted], t_out.logits[:, :-1][predicted],
                                    args.kd_temperature)}
    student_stacks, teacher_stacks = _encoder_outputs(s_out), _encoder_outputs(t_out)
    device = s_out.logits.device
    if use_attn:
        text_mask = inputs["attention_mask"]  # the fusion queries are the same B text rows
        kd["attn"] = attention_kd(
            student_stacks, teacher_stacks, maps, query_masks={"image": None, "text": text_mask, "fusion": text_mask},
            cross=bool(args.cross_attention_kd), key_length_scale=args.attention_key_length_scale,
        ).to(device)
    if use_hidden:
        kd["hidden"] = hidden_kd(student_stacks, teacher_stacks, maps, image_weight=args.image_hidden_weight).to(device)
    return L.combine_losses(task, kd, lambda_vlp=args.lambda_vlp, alpha_attn=args.alpha_attn,
                            beta_hidden=args.beta_hidden, gamma_logits=args.gamma_logits)


# -------------------------------------------------------------------------------------------------------------- data
def train_data(data, processor, seed: int, mlm: bool):
    """(train dataset, collator): synthetic scenes with true descriptions, or an ALBEF / COCO Karpathy caption JSON
    (one row per caption; without `--eval_dataset` less its held-out images, as for retrieval). `mlm` is unused."""
    from ..data.collators import CaptioningCollator

    collator = CaptioningCollator(processor, max_length=data.max_length)
    from ..data.captioning_dataset import SyntheticCaptioningDataset
    from .retrieval import caption_pairs

    return caption_pairs(data, seed, SyntheticCaptioningDataset), collator


def eval_data(data) -> dict:
    """The held-out set {images, captions (all references), img2txt (image → its references), txt2img}: an ALBEF /
    COCO Karpathy test JSON (`--eval_dataset`), else the images of a JSON `--dataset` held out from training, else
    `--eval_images` synthetic scenes (`--eval_seed`) with up to five checked references each."""
    if data.eval_dataset or data.dataset != "synthetic":
        from .retrieval import eval_data as caption_json_eval_data

        return caption_json_eval_data(data)  # the same file formats and hold-out rules as retrieval
    from ..data.captioning_dataset import make_captioning_eval_set

    return make_captioning_eval_set(data.eval_images, seed=data.eval_seed, image_size=data.image_size)


def references_of(held_out: dict) -> list[list[str]]:
    """The reference captions of each held-out image."""
    return [[held_out["captions"][j] for j in indices] for indices in held_out["img2txt"]]


# -------------------------------------------------------------------------------------------------------- evaluation
def generate_captions(
    model: torch.nn.Module,
    images: Sequence,
    processor: Any,
    *, batch_size: int = 32,
    pruning_masks: Any = None,
    device: torch.device | str | None = None,
    show_progress: bool = True,
    **generation: Any,
) -> list[str]:
    """One caption per image: `model.generate` from the prompt (`GENERATION`, overridden by `generation`), decoded
    without special tokens. `images` may be lazy (sliced one batch at a time); `pruning_masks` go to every forward."""
    parameter = next(model.parameters())
    device, dtype = torch.device(device) if device is not None else parameter.device, parameter.dtype
    _ensure_captioner(model, processor)
    settings = {**GENERATION, **generation}
    if pruning_masks is not None:
        settings["pruning_masks"] = pruning_masks
    captions: list[str] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in tqdm(range(0, len(images), batch_size), desc="Captioning", disable=not show_progress):
                pixel_values = processor(images=list(images[start : start + batch_size]))["pixel_values"]
                new_tokens = model.generate(pixel_values=pixel_values.to(device=device, dtype=dtype), **settings)
                captions.extend(processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return [caption.strip() for caption in captions]


def evaluate_captioning(
    model: torch.nn.Module,
    images: Sequence,
    references: Sequence[Sequence[str]],
    processor: Any,
    *, batch_size: int = 32,
    pruning_masks: Any = None,
    show_progress: bool = True,
    generation: dict | None = None,
    return_per_item: bool = False,
) -> dict[str, float] | tuple[dict[str, float], np.ndarray]:
    """BLEU-4 and CIDEr-D (percent, COCO caption toolkit definitions) of the generated captions against `references`;
    `generation` overrides `GENERATION` (e.g. `generation_settings(data)`).

    Returns:
        {"bleu4": BLEU-4 × 100, "cider": CIDEr-D × 100, "captions": number of images captioned}; with
        `return_per_item` a tuple (metrics, (N,) float64 array of each image's CIDEr-D × 100, document frequencies
        from all references, whose mean is "cider", for `training.metrics.confidence.mean_ci95`).
    """
    from ..metrics.caption_scores import bleu, cider_d_per_image

    if len(images) != len(references) or not len(images):
        raise ValueError(f"need one reference list per image and at least one image, got {len(images)} images and "
                         f"{len(references)} reference lists")
    predictions = generate_captions(model, images, processor, batch_size=batch_size, pruning_masks=pruning_masks,
                                    show_progress=show_progress, **(generation or {}))
    references = [list(refs) for refs in references]
    image_cider = cider_d_per_image(predictions, references)
    metrics = {"bleu4": 100.0 * bleu(predictions, references, n=4)[3],
               "cider": 100.0 * float(sum(image_cider) / len(image_cider)),  # = 100 × cider_d(predictions, references)
               "captions": len(predictions)}
    return (metrics, 100.0 * np.asarray(image_cider, dtype=np.float64)) if return_per_item else metrics


def evaluate(model, processor, data, held_out, show_progress: bool = True, pruning_masks=None, *,
             return_per_item: bool = False) -> dict | tuple[dict, np.ndarray]:
    """The task's metrics on `held_out` (see `eval_data`); with `return_per_item` also each image's CIDEr-D × 100
    (see `evaluate_captioning`)."""
    return evaluate_captioning(model, held_out["images"], references_of(held_out), processor,
                               pruning_masks=pruning_masks, show_progress=show_progress,
                               generation=generation_settings(data), return_per_item=return_per_item)


def blind_baseline(data, held_out) -> dict | None:
    """One constant caption for every image — the most common caption of a fresh training sample — scored like a
    model (BLEU-4, CIDEr-D against each image's references; synthetic data only)."""
    from collections import Counter

    from ..data.captioning_dataset import make_captioning_item
    from ..metrics.caption_scores import bleu, cider_d

    train = blind_training_sample(data, "captioning", lambda rng: make_captioning_item(rng, image_size=8))
    if train is None:
        return None
    caption = Counter(item["caption"] for item in train).most_common(1)[0][0]
    predictions, references = [caption] * len(held_out["images"]), references_of(held_out)
    return {"bleu4": 100.0 * bleu(predictions, references, n=4)[3], "cider": 100.0 * cider_d(predictions, references),
            "what": f"one constant caption for every image: {caption!r}, the most common of {len(train)} training "
                    "captions"}


# ---------------------------------------------------------------------------------------------------- inference path
def workload(model, processor, data, held_out, batch: int) -> Callable[[], Any]:
    """Caption `batch` held-out images with the reference decoding (`generation_settings(data)`)."""
    _ensure_captioner(model, processor)
    n = min(batch, len(held_out["images"]))
    pixel_values = processor(images=list(held_out["images"][:n]))["pixel_values"]
    settings = generation_settings(data)
    return lambda: model.generate(pixel_values=pixel_values, **settings)


def workload_text(data, batch: int) -> str:
    settings = generation_settings(data)
    lengths = (f"{settings['min_new_tokens']}-{settings['max_new_tokens']} new tokens" if settings.get("max_new_tokens")
               else f"min_length {settings['min_length']} / max_length {settings['max_length']} with the prompt")
    return f"captioning of {batch} held-out images: beam search {settings['num_beams']}, {lengths}, KV cache"


USAGE = """import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained("{repo}", trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained("{repo}", trust_remote_code=True)
inputs = processor(images=[Image.new("RGB", (64, 64), "red")])
with torch.no_grad():
    new_tokens = model.generate(pixel_values=inputs["pixel_values"])  # beam 3, X-VLM lengths: 1-16 new tokens
print(processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True))"""

USAGE_PIPELINE = """Captioning pipeline:

```python
from PIL import Image
from transformers import pipeline

captioner = pipeline("image-to-text", model="{repo}", trust_remote_code=True)  # transformers 5: image-text-to-text
print(captioner(Image.new("RGB", (64, 64), "red"), text="a picture of", return_full_text=False))
```

transformers 5 serves "image-to-text" with its image-text-to-text pipeline, which needs a text: give the prompt the
model was trained with ("a picture of"); `return_full_text=False` returns the caption alone.

BLEU-4 and CIDEr-D follow the COCO caption toolkit; METEOR and SPICE (Java tools) are not computed."""

TASK = Task(
    name="captioning",
    model_class=EfficientVLMForConditionalGeneration,
    teacher_class=EfficientVLMForConditionalGeneration,
    metric="cider",
    loss_step=captioning_losses,
    # official captioning config: 0.7·task + 0.3·KD, reg lr 0.01 (official EfficientVLM config), cross-attention maps in task KD
    prune_defaults={"lambda_vlp": CAPTIONING_LAMBDA, "reg_learning_rate": 0.01, "cross_attention_kd": True,
                    "target_sparsity": 0.25},
    train_data=train_data,
    eval_data=eval_data,
    eval_size=lambda held_out: len(held_out["images"]),
    evaluate=evaluate,
    workload=workload,
    workload_text=workload_text,
    # no published per-modality finding for captioning: the retrieval split (vision pruned least) as the hand split
    manual_split="vision={half},text=auto,fusion=auto",
    card=ModelCardSpec(
        task_type="image-to-text", pipeline_tag="image-to-text", tag="image-captioning",
        heads="causal text+fusion decoder with the LM head tied to the word embeddings (prompt \"a picture of\")",
        speed_name="captioning", usage=USAGE, usage_pipeline=USAGE_PIPELINE,
        metric_keys=("bleu4", "cider"), report_keys=("bleu4", "cider"), title="Captioning",
    ),
    description="image → caption (prompt 'a picture of', beam 3); BLEU-4, CIDEr-D (no METEOR / SPICE: Java tools)",
    prepare_model=_prepare_model,
    # COCO Karpathy test: beam 3, up to 16 new tokens (X-VLM max_length 20 counts the 4-token prompt)
    path_sizes={"images": 5000, "prompt_length": 5, "new_tokens": 16, "beams": 3},
    cost_path=captioning_path,
    flops=captioning_flops,
    blind_baseline=blind_baseline,
)
