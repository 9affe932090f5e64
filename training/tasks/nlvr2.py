"""NLVR2 (two images + a statement → true / false): loss step (task loss + task KD), data, evaluation, inference path.

The student and teacher are `EfficientVLMForVisualReasoning` models (X-VLM's NLVR2 structure): one vision pass over
the 2B images (pair-adjacent: row 2b = left, 2b + 1 = right image of item b), one text pass over the B statements and
one fusion pass over the B statements through the duplicated fusion (copy 2l cross-attends to the left image, 2l + 1
to the right one; the pair shares its cross-attention keys / values). KD reuses the shared encoder KD of
`training.method.distillation` unchanged: fusion queries are the statement tokens, so the text padding mask applies,
and the layer map pairs copy c of a student pair with copy c of its teacher pair (`distillation.layer_maps`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from modeling_efficientvlm import EfficientVLMForVisualReasoning

from ..method import losses as L
from ..method.cost import nlvr2_flops, nlvr2_path
from ..method.distillation import attention_kd, forward_with_teacher, hidden_kd, stack_outputs
from .base import ModelCardSpec, Task, blind_training_sample

logger = logging.getLogger(__name__)

NLVR2_LAMBDA = 0.8
"""Official NLVR2 weighting: 0.8·task + 0.2·KD (the `prune --task nlvr2` default of `lambda_vlp`)."""


def nlvr2_losses(
    student, teacher, inputs: dict, args, maps: dict | None, *, masks=None, generator: torch.Generator | None = None,
    step: int = 0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """NLVR2 cross-entropy of the student + task KD from the teacher on the same batch.

    total = λ·L_task + (1 − λ)·(α·L_attn + β·L_hid + γ·L_logits) with λ = `args.lambda_vlp` (official NLVR2: 0.8).
    Attention KD covers the self-attention of all three encoders, plus the fusion cross-attention when
    `args.cross_attention_kd`; hidden KD covers all three encoders (vision down-weighted by `args.image_hidden_weight`);
    logit KD is KL·T² on the (B, num_labels) classifier logits.

    Args:
        student: an `EfficientVLMForVisualReasoning` (trained).
        teacher: an `EfficientVLMForVisualReasoning` (frozen; run under no_grad, without masks), or None for the task
            loss only (teacher fine-tuning).
        inputs: an `NLVR2Collator` batch: pixel_values (B, 2, C, H, W), input_ids / attention_mask (B, T), labels (B,).
        args: the distillation weights (`DistillationArguments` or any object with the same fields).
        maps: `kd_pairs(layer map)`; unused when `teacher` is None.
        masks: the student's `PruningMasks` (pruning), or None.
        generator, step: unused (NLVR2 samples nothing); the loss-step signature is shared by all tasks.

    Returns:
        (total scalar, parts): parts holds "task", the KD terms computed ("logits", "attn", "hidden") and "total".

    Raises:
        KeyError: the batch has no "labels".
    """
    if "labels" not in inputs:
        raise KeyError(f"NLVR2 batches need 'labels' (got keys {sorted(inputs)})")
    s_out, t_out, use_attn, use_hidden = forward_with_teacher(student, teacher, inputs, args, masks)
    task = {"task": s_out.loss}
    if teacher is None:
        return L.combine_losses(task, {}, lambda_vlp=1.0, alpha_attn=0.0, beta_hidden=0.0, gamma_logits=0.0)
    device = s_out.logits.device
    kd = {"logits": L.logit_kd_loss(s_out.logits, t_out.logits, args.kd_temperature)}
    student_encoders, teacher_encoders = stack_outputs(s_out), stack_outputs(t_out)
    if use_attn:
        query_masks = {"image": None, "text": inputs["attention_mask"], "fusion": inputs["attention_mask"]}
        kd["attn"] = attention_kd(
            student_encoders, teacher_encoders, maps, query_masks=query_masks, cross=bool(args.cross_attention_kd),
            key_length_scale=args.attention_key_length_scale,
        ).to(device)
    if use_hidden:
        kd["hidden"] = hidden_kd(
            student_encoders, teacher_encoders, maps, image_weight=args.image_hidden_weight, pruning_masks=masks
        ).to(device)
    return L.combine_losses(task, kd, lambda_vlp=args.lambda_vlp, alpha_attn=args.alpha_attn,
                            beta_hidden=args.beta_hidden, gamma_logits=args.gamma_logits)


# -------------------------------------------------------------------------------------------------------------- data
def train_data(data, processor, seed: int, mlm: bool):
    """(train dataset, collator): synthetic NLVR2 pairs (`--nlvr2_level`) or an X-VLM NLVR2 JSON (without
    `--eval_dataset`: less its held-out items, see `eval_data`)."""
    from ..data.collators import NLVR2Collator

    collator = NLVR2Collator(processor, max_length=data.max_length)
    if data.dataset == "synthetic":
        from ..data.nlvr2_dataset import SyntheticNLVR2Dataset

        return SyntheticNLVR2Dataset(seed=seed, image_size=data.image_size, level=data.nlvr2_level), collator
    from ..data.files import load_nlvr2_json
    from ..data.holdout import held_out_rows

    items = load_nlvr2_json(data.dataset, data.image_root)
    return (items if data.eval_dataset else items.select(held_out_rows(data, range(len(items)), False))), collator


def eval_data(data) -> list:
    """The held-out items: `--eval_dataset` (X-VLM NLVR2 JSON), else the items of a JSON `--dataset` held out from
    training, else held-out synthetic pairs."""
    if data.eval_dataset or data.dataset != "synthetic":
        from ..data.files import load_nlvr2_json
        from ..data.holdout import held_out_rows

        if data.eval_dataset:
            return load_nlvr2_json(data.eval_dataset, data.image_root)
        items = load_nlvr2_json(data.dataset, data.image_root, check_images=False)
        return items.select(held_out_rows(data, range(len(items)), True))
    from ..data.nlvr2_dataset import make_nlvr2_eval_set

    return make_nlvr2_eval_set(data.eval_images, seed=data.eval_seed, image_size=data.image_size,
                               level=data.nlvr2_level)


# -------------------------------------------------------------------------------------------------------- evaluation
def evaluate_nlvr2(
    model: torch.nn.Module,
    items: Sequence[dict],
    processor: Any,
    *, batch_size: int = 32,
    device: torch.device | str | None = None,
    show_progress: bool = True,
    max_length: int = 40,
    pruning_masks: Any = None,
    return_per_item: bool = False,
) -> dict[str, float] | tuple[dict[str, float], np.ndarray]:
    """NLVR2 accuracy (percent) of a model with `forward(pixel_values (B, 2, C, H, W), input_ids, attention_mask)`
    returning `.logits` (B, 2) (index 1 = statement true).

    Args:
        model: the NLVR2 classifier.
        items: {"images": [left, right], "sentence": str, "label": 0 | 1} (see `NLVR2Collator`).
        processor: an `EfficientVLMProcessor`-like callable.
        batch_size: items per forward.
        device: where to run; default the model's device.
        show_progress: tqdm bar.
        max_length: statement truncation length in tokens.
        pruning_masks: passed to the model's forward when given.
        return_per_item: also return each item's score in percent (100 if correct, else 0).

    Returns:
        {"accuracy": percent correct}; with `return_per_item` a tuple (metrics, (N,) float64 array whose mean is
        "accuracy", for `training.metrics.confidence.mean_ci95`).
    """
    from ..data.collators import NLVR2Collator

    if len(items) == 0:
        raise ValueError("evaluate_nlvr2 needs at least one item")
    parameter = next(model.parameters())
    device, dtype = torch.device(device) if device is not None else parameter.device, parameter.dtype
    collate = NLVR2Collator(processor, max_length=max_length)
    extra = {} if pruning_masks is None else {"pruning_masks": pruning_masks}
    was_training, hits = model.training, []
    model.eval()
    try:
        with torch.no_grad():
            for start in tqdm(range(0, len(items), batch_size), desc="NLVR2", disable=not show_progress):
                batch = collate(list(items[start : start + batch_size]))
                logits = model(pixel_values=batch["pixel_values"].to(device=device, dtype=dtype),
                               input_ids=batch["input_ids"].to(device),
                               attention_mask=batch["attention_mask"].to(device), **extra).logits
                hits.append((logits.argmax(-1).cpu() == batch["labels"]).numpy())
    finally:
        model.train(was_training)
    correct = np.concatenate(hits)  # (N,) bool
    metrics = {"accuracy": 100.0 * int(correct.sum()) / len(items)}
    return (metrics, 100.0 * correct.astype(np.float64)) if return_per_item else metrics


def evaluate(model, processor, data, held_out, show_progress: bool = True, pruning_masks=None, *,
             return_per_item: bool = False) -> dict | tuple[dict, np.ndarray]:
    """The task's metrics on `held_out` (see `eval_data`); with `return_per_item` also each item's score in percent
    (see `evaluate_nlvr2`)."""
    return evaluate_nlvr2(model, held_out, processor, show_progress=show_progress, pruning_masks=pruning_masks,
                          max_length=data.max_length, return_per_item=return_per_item)


def blind_baseline(data, held_out) -> dict | None:
    """The statement-only predictor: per statement text its most common label in a fresh training sample (else the
    most common label overall), scored on `held_out` (synthetic data only; chance is 50 %)."""
    from collections import Counter

    from ..data.nlvr2_dataset import make_nlvr2_item

    train = blind_training_sample(data, "nlvr2", lambda rng: make_nlvr2_item(
        rng, int(rng.random() < 0.5), image_size=8, level=data.nlvr2_level))
    if train is None:
        return None
    by_statement: dict[str, Counter] = {}
    overall: Counter = Counter()
    for item in train:
        by_statement.setdefault(item["sentence"], Counter())[item["label"]] += 1
        overall[item["label"]] += 1
    correct = sum((by_statement.get(item["sentence"]) or overall).most_common(1)[0][0] == item["label"]
                  for item in held_out)
    return {"accuracy": 100.0 * correct / len(held_out),
            "what": f"statement only: the most common label of each statement in {len(train)} training items"}


# ---------------------------------------------------------------------------------------------------- inference path
def workload(model, processor, data, held_out, batch: int) -> Callable[[], Any]:
    """Classify `batch` held-out (left, right, statement) items."""
    from ..data.collators import NLVR2Collator

    inputs = NLVR2Collator(processor, max_length=data.max_length)(list(held_out)[:batch])
    inputs.pop("labels")
    return lambda: model(**inputs).logits


def workload_text(data, batch: int) -> str:
    return f"NLVR2 classification of {batch} held-out items (2 images + statement each)"


DOMAIN_LABELS = 3
"""Outputs of the NLVR domain pre-training head (left / right / neither; `training.tasks.nlvr2_domain`)."""


def num_labels(model: nn.Module) -> int:
    """The number of outputs of an NLVR2 model's classifier (its last Linear layer)."""
    return _last_linear(model.nlvr_head)[1].out_features


def _last_linear(head: nn.Module) -> tuple[str, nn.Linear]:
    linears = [(name, module) for name, module in head.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise TypeError(f"the NLVR2 head has no Linear layer: {head}")
    return linears[-1]


def set_num_labels(model: nn.Module, labels: int) -> bool:
    """Gives an NLVR2 model a classifier with `labels` outputs: a no-op when it has them, else the whole head is
    replaced by a freshly initialised one of the same layout (X-VLM: the domain head is not reused for NLVR2) and
    `config.num_labels` is updated, with a log line naming the change.

    Returns:
        True when the head was replaced.
    """
    current = num_labels(model)
    if current == labels:
        return False
    head = _fresh_head(model, labels)
    model.nlvr_head = head.to(next(model.parameters()).device)
    model.config.num_labels = labels  # HF's field: the width the model is rebuilt with by from_pretrained
    if current == DOMAIN_LABELS:  # the official order: domain pre-training checkpoint → NLVR2 fine-tuning
        logger.warning("NLVR2 head: the checkpoint's 3-way NLVR domain pre-training head (left / right / neither) is "
                       "replaced by a freshly initialised %d-way head; the encoders are kept", labels)
    else:
        logger.info("NLVR2 head: %d-way head replaced by a freshly initialised %d-way head", current, labels)
    return True


def _fresh_head(model: nn.Module, labels: int) -> nn.Module:
    """A copy of `model.nlvr_head` with `labels` outputs, every module re-initialised by the model's `_init_weights`."""
    head = copy.deepcopy(model.nlvr_head)
    name, last = _last_linear(head)
    parent = head.get_submodule(name.rpartition(".")[0]) if "." in name else head
    setattr(parent, name.rpartition(".")[2], nn.Linear(last.in_features, labels, bias=last.bias is not None))
    head.apply(model._init_weights)
    return head


def prepare_model(model, processor, data=None) -> None:
    """NLVR2 needs a 2-way head: an NLVR domain pre-training checkpoint's 3-way head is replaced by a fresh one."""
    set_num_labels(model, 2)


USAGE = """import torch
from PIL import Image
from transformers import AutoModelForSequenceClassification, AutoProcessor

model = AutoModelForSequenceClassification.from_pretrained("{repo}", trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained("{repo}", trust_remote_code=True)
left, right = Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 64), "blue")
inputs = processor(images=[left, right], text=["there is a red circle in exactly one image"])
pixel_values = inputs["pixel_values"].view(1, 2, *inputs["pixel_values"].shape[1:])  # (B, 2, C, H, W)
with torch.no_grad():
    logits = model(pixel_values=pixel_values, input_ids=inputs["input_ids"],
                   attention_mask=inputs["attention_mask"]).logits
print(logits.softmax(-1)[:, 1])  # probability that the statement is true"""

TASK = Task(
    name="nlvr2",
    model_class=EfficientVLMForVisualReasoning,
    teacher_class=EfficientVLMForVisualReasoning,
    metric="accuracy",
    loss_step=nlvr2_losses,
    # official NLVR2 config: 0.8·task + 0.2·KD, reg lr 0.1, cross-attention maps in task KD
    prune_defaults={"lambda_vlp": NLVR2_LAMBDA, "reg_learning_rate": 0.1, "cross_attention_kd": True,
                    "target_sparsity": 0.25},
    train_data=train_data,
    eval_data=eval_data,
    eval_size=len,
    evaluate=evaluate,
    workload=workload,
    workload_text=workload_text,
    # the paper's finding: vision and text matter for NLVR2, fusion much less
    manual_split="vision=auto,text=auto,fusion={more}",
    card=ModelCardSpec(
        task_type="visual-reasoning", pipeline_tag=None, tag="nlvr2",
        heads="NLVR2 head: two images + a statement → true / false", speed_name="NLVR2", usage=USAGE,
        metric_keys=("accuracy",), report_keys=("accuracy",), title="NLVR2",
    ),
    description="two images + a statement → true/false; accuracy",
    prepare_model=prepare_model,
    # two images and one statement of <= 40 tokens per item
    path_sizes={"items": 1000, "text_length": 40},
    cost_path=nlvr2_path,
    flops=nlvr2_flops,
    blind_baseline=blind_baseline,
)
