"""NLVR domain pre-training (X-VLM, before NLVR2 fine-tuning): text-agnostic 3-way classification of image pairs.

`efficientvlm teacher --task nlvr2_domain --init_from <pre-trained checkpoint>` trains the NLVR2-structure model
(`EfficientVLMForVisualReasoning`, duplicated fusion) with a 3-way head on the pre-training image-caption pairs, the
task loss only (no KD), as X-VLM's `XVLMForNLVRPretraining`: per caption of image x, a second image is drawn from the
batch by image-image ITC similarity (softmax of cosine / 0.07 over the other images, so the most similar images are
the likely picks), and the (left, right) pair is labelled

- 0 (`LEFT`): (x, neg) — the caption describes the left image,
- 1 (`RIGHT`): (neg, x) — it describes the right image,
- 2 (`NEITHER`): (neg, neg′) — two distinct other images,

each with probability 1/3. The saved checkpoint is an NLVR2 model whose head has 3 outputs;
`teacher --task nlvr2 --init_from <it>` keeps its encoders and replaces that head by a fresh 2-way one
(`set_num_labels`, run by the nlvr2 task's `prepare_model`), the official order pre-train → domain → NLVR2.

Evaluation: 3-way accuracy on fixed held-out pairs built from the held-out image-caption set (`domain_eval_items`:
labels balanced, negatives drawn uniformly with `--eval_seed`, so every model is scored on the same items).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from modeling_efficientvlm import EfficientVLMForVisualReasoning

from ..method import losses as L
from . import nlvr2
from .nlvr2 import DOMAIN_LABELS, num_labels, set_num_labels  # noqa: F401 (re-exported)
from .base import ModelCardSpec, Task


LEFT, RIGHT, NEITHER = 0, 1, 2
"""The 3 domain labels: the caption describes the left image, the right image, or neither."""
PAIR_TEMPERATURE = 0.07
"""Temperature of the image-image ITC similarity softmax that draws the paired images (X-VLM: fixed 0.07)."""


def prepare_model(model: nn.Module, processor, data=None) -> None:
    """The domain model has a 3-way head (a pre-training / NLVR2 checkpoint's head is replaced: `set_num_labels`)."""
    set_num_labels(model, DOMAIN_LABELS)


# --------------------------------------------------------------------------------------------------- pair sampling
def sample_domain_pairs(
    similarity: torch.Tensor,
    generator: torch.Generator | None = None,
    temperature: float = PAIR_TEMPERATURE,
    same_image: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draws the image pair of every caption of a batch by ITC similarity (X-VLM NLVR domain pre-training).

    Row b is image x_b with its caption. Its candidates are the other images (not b, nor any image `same_image`
    marks as the same picture), weighted by softmax(similarity[b] / temperature). With probability 1/3 two distinct
    candidates form (neg, neg′) → `NEITHER` (needs two candidates; else a one-negative pair is drawn); otherwise one
    candidate neg and a fair coin give (x, neg) → `LEFT` or (neg, x) → `RIGHT`.

    Args:
        similarity: (B, B) image-image ITC similarity (cosine of the normalised embeddings).
        generator: random source of all draws (CPU); None: torch's global RNG.
        temperature: softmax temperature (X-VLM 0.07: the most similar images dominate).
        same_image: optional (B, B) bool, True where rows hold the same image (several captions per image).

    Returns:
        (left (B,), right (B,), labels (B,)) long tensors on CPU: row indices of the left and right image, label.

    Raises:
        ValueError: a non-square similarity, or a row without any other image to pair with.
    """
    if similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"similarity must be a square (B, B) matrix, got {tuple(similarity.shape)}")
    batch = similarity.shape[0]
    excluded = torch.eye(batch, dtype=torch.bool)
    if same_image is not None:
        excluded |= same_image.detach().cpu().bool()
    candidates = (~excluded).sum(1)
    if bool((candidates < 1).any()):
        raise ValueError(f"NLVR domain pre-training pairs each caption's image with another image of the batch, but "
                         f"row {int((candidates < 1).nonzero()[0])} has none (batch of {batch} rows); use a batch "
                         "with at least 2 distinct images (3 for the 'neither' pairs)")
    logits = (similarity.detach().float().cpu() / temperature).masked_fill(excluded, float("-inf"))
    weights = logits.softmax(dim=1)  # (B, B), 0 on excluded
    choice, side = torch.rand(batch, generator=generator), torch.rand(batch, generator=generator)
    left, right, labels = [], [], []
    for row in range(batch):
        if choice[row] < 1 / 3 and candidates[row] >= 2:
            first, second = torch.multinomial(weights[row], 2, replacement=False, generator=generator).tolist()
            pair, label = (first, second), NEITHER
        else:
            negative = int(torch.multinomial(weights[row], 1, generator=generator))
            pair, label = ((row, negative), LEFT) if side[row] < 0.5 else ((negative, row), RIGHT)
        left.append(pair[0])
        right.append(pair[1])
        labels.append(label)
    return torch.tensor(left), torch.tensor(right), torch.tensor(labels)


# -------------------------------------------------------------------------------------------------------- the loss
def domain_losses(
    student, teacher, inputs: dict, args, maps: dict | None, *, masks=None, generator: torch.Generator | None = None,
    step: int = 0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy of the 3-way text-agnostic classification on pairs drawn by ITC similarity (no KD).

    As X-VLM: the vision encoder runs once over the batch images; their ITC embeddings (no grad, the model being
    trained) rank the candidates; the fusion + head (`pair_logits`) read the gathered pairs.

    Args:
        student: the `EfficientVLMForVisualReasoning` with a 3-way head.
        teacher: must be None (domain pre-training has no KD).
        inputs: a `RetrievalCollator` batch: pixel_values (B, C, H, W), input_ids / attention_mask (B, T), and
            image_ids (B,) when an image has several captions.
        args, maps, step: unused (the shared loss-step signature).
        masks: the model's `PruningMasks`, or None.
        generator: the random source of the pair draws.

    Returns:
        (total, {"task": cross-entropy, "total": total}).
    """
    if teacher is not None:
        raise ValueError("nlvr2_domain is NLVR domain pre-training without KD: run it with `efficientvlm teacher "
                         "--task nlvr2_domain` (prune / compare-splits take --task nlvr2)")
    # one vision pass over the B batch images (X-VLM): the pairs are gathered from its output
    image_tokens = student.encode_image(inputs["pixel_values"], masks).last_hidden_state  # (B, 1 + N, D_vision)
    with torch.no_grad():
        features = student.image_itc_embeds(image_tokens.detach())  # (B, E), L2-normalised
    same_image = None
    if "image_ids" in inputs:
        ids = inputs["image_ids"].cpu()
        same_image = ids[:, None] == ids[None, :]
    left, right, labels = sample_domain_pairs(features @ features.T, generator, same_image=same_image)
    device = image_tokens.device
    text = student.encode_text(inputs["input_ids"], inputs["attention_mask"], masks).last_hidden_state
    logits, _ = student.pair_logits(text, inputs["attention_mask"], image_tokens[left.to(device)],
                                    image_tokens[right.to(device)], masks)  # (B, 3)
    task = F.cross_entropy(logits.float(), labels.to(device))
    return L.combine_losses({"task": task}, {}, lambda_vlp=1.0, alpha_attn=0.0, beta_hidden=0.0, gamma_logits=0.0)


# ------------------------------------------------------------------------------------------------------------ data
def train_data(data, processor, seed: int, mlm: bool):
    """(train dataset, collator): the pre-training image-caption pairs (synthetic scenes or an ALBEF / X-VLM JSON, less
    its held-out images) collated without MLM; the pairs are drawn per batch by `domain_losses`."""
    from ..data.collators import RetrievalCollator
    from ..data.retrieval_dataset import SyntheticRetrievalDataset
    from .retrieval import caption_pairs

    collator = RetrievalCollator(processor, max_length=data.max_length)
    return caption_pairs(data, seed, SyntheticRetrievalDataset), collator


def domain_eval_items(held_out: dict, seed: int) -> list[dict]:
    """Fixed 3-way items from a held-out image-caption set: one per image (its first caption), labels balanced
    (a seeded shuffle of 0, 1, 2, 0, 1, 2, …), negatives drawn uniformly among the other images with `seed`.

    Args:
        held_out: {"images": sequence (PIL images, or a `LazyImageList` whose paths are kept), "captions",
            "img2txt"} as the retrieval held-out set.
        seed: the draw's seed.

    Returns:
        NLVR2-style items {"images": [left, right], "sentence": caption of x, "label": 0 | 1 | 2}.

    Raises:
        ValueError: fewer than 3 images (a 'neither' pair needs two images besides x).
    """
    images: Sequence = getattr(held_out["images"], "paths", held_out["images"])  # files stay on disk
    count = len(images)
    if count < 3:
        raise ValueError(f"the NLVR domain held-out set needs at least 3 images, got {count} (raise --eval_images)")
    rng = random.Random(f"efficientvlm-nlvr2-domain-eval-{seed}")
    labels = [index % DOMAIN_LABELS for index in range(count)]
    rng.shuffle(labels)
    items = []
    for x, label in enumerate(labels):
        first, second = rng.sample([i for i in range(count) if i != x], 2)
        pair = {LEFT: (x, first), RIGHT: (first, x), NEITHER: (first, second)}[label]
        items.append({"images": [images[pair[0]], images[pair[1]]],
                      "sentence": held_out["captions"][held_out["img2txt"][x][0]], "label": label})
    return items


def eval_data(data) -> list[dict]:
    """The held-out 3-way items, built from the retrieval held-out set of the same data (`domain_eval_items`)."""
    from .retrieval import eval_data as image_caption_eval_data

    return domain_eval_items(image_caption_eval_data(data), data.eval_seed)


def workload_text(data, batch: int) -> str:
    return f"NLVR domain classification of {batch} held-out pairs (2 images + caption each, 3 classes)"


TASK = Task(
    name="nlvr2_domain",
    model_class=EfficientVLMForVisualReasoning,
    teacher_class=EfficientVLMForVisualReasoning,
    metric="accuracy",
    loss_step=domain_losses,
    prune_defaults={},
    train_data=train_data,
    eval_data=eval_data,
    eval_size=len,
    evaluate=nlvr2.evaluate,  # accuracy = argmax == label works for any number of classes
    workload=nlvr2.workload,
    workload_text=workload_text,
    manual_split=nlvr2.TASK.manual_split,
    card=ModelCardSpec(
        task_type="visual-reasoning", pipeline_tag=None, tag="nlvr2-domain-pretraining",
        heads="NLVR domain head: two images + a caption → left / right / neither describes it",
        speed_name="NLVR domain", usage=nlvr2.USAGE, metric_keys=("accuracy",), report_keys=("accuracy",),
        title="NLVR domain pre-training",
    ),
    description="NLVR domain pre-training (before nlvr2): image pairs drawn by ITC similarity, 3-way text-agnostic "
                "classification (caption describes the left / right / neither image), no KD; accuracy",
    prepare_model=prepare_model,
)
