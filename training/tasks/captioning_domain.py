"""Captioning domain pre-training (EfficientVLM `Captioning_pretrain.py`, X-VLM `XVLMForGenPretraining`): the
captioning decoder trained on the pre-training image-caption pairs before captioning fine-tuning.

`efficientvlm teacher --task captioning_domain --init_from <pre-training checkpoint>` turns the checkpoint into the
captioning model (`EfficientVLMForConditionalGeneration`: the text + fusion stacks become one causal decoder, the MLM
head its LM head) and trains it with the decoder's LM loss only, no KD, on "[CLS] <caption> [SEP]" — no prompt, every
caption token and [SEP] predicted (the official `ImageTextJsonDataset(..., add_eos=True)` texts, `pad` out of the
loss); `teacher --task captioning --init_from <it>` (or `prune --task captioning --student <it>`) then fine-tunes with
the prompt "a picture of". The official config runs it on the small model (`x-vlm-small-ft/Captioning_pretrain_O1.yaml`:
2 epochs of the 4M pre-training pairs, lr 3e-5) with an unsmoothed LM loss (its `BertLMHeadModel`, label smoothing 0;
captioning fine-tuning smooths by 0.1).

Evaluation and inference path: the captioning ones (BLEU-4 / CIDEr-D of prompted beam search on the held-out set).
"""

from __future__ import annotations

from modeling_efficientvlm import EfficientVLMForConditionalGeneration

from ..method import losses as L
from . import captioning
from .base import ModelCardSpec, Task


def domain_losses(student, teacher, inputs: dict, args, maps: dict | None, *, masks=None, generator=None,
                  step: int = 0):
    """The decoder's LM loss (no label smoothing) on an un-prompted caption batch, no KD (`teacher` and `maps` are
    ignored).

    Returns:
        (total, {"lm", "total"}).
    """
    missing = [key for key in ("pixel_values", "input_ids", "attention_mask", "labels") if key not in inputs]
    if missing:
        raise KeyError(f"captioning batches need {missing} (got keys {sorted(inputs)}); use CaptioningCollator")
    output = student(**inputs, pruning_masks=masks, label_smoothing=0.0)
    return L.combine_losses({"lm": output.loss}, {}, lambda_vlp=1.0, alpha_attn=0.0, beta_hidden=0.0,
                            gamma_logits=0.0)


def train_data(data, processor, seed: int, mlm: bool):
    """(train dataset, collator): the captioning image-caption pairs (synthetic scenes or an ALBEF / COCO caption
    JSON), collated without a prompt: "[CLS] caption [SEP]", labels on every caption token and [SEP]."""
    from ..data.captioning_dataset import SyntheticCaptioningDataset
    from ..data.collators import CaptioningCollator
    from .retrieval import caption_pairs

    return caption_pairs(data, seed, SyntheticCaptioningDataset), CaptioningCollator(processor, data.max_length,
                                                                                     prompt="")


TASK = Task(
    name="captioning_domain",
    model_class=EfficientVLMForConditionalGeneration,
    teacher_class=EfficientVLMForConditionalGeneration,
    metric="cider",
    loss_step=domain_losses,
    prune_defaults={},
    train_data=train_data,
    eval_data=captioning.eval_data,
    eval_size=captioning.TASK.eval_size,
    evaluate=captioning.evaluate,
    workload=captioning.workload,
    workload_text=captioning.workload_text,
    manual_split=captioning.TASK.manual_split,
    card=ModelCardSpec(
        task_type="image-to-text", pipeline_tag="image-to-text", tag="captioning-domain-pretraining",
        heads=captioning.TASK.card.heads, speed_name="captioning", usage=captioning.USAGE,
        metric_keys=("bleu4", "cider"), report_keys=("bleu4", "cider"), title="Captioning domain pre-training",
    ),
    description="captioning domain pre-training (before captioning): the decoder's LM loss on image-caption pairs "
                "without the prompt, no KD; BLEU-4, CIDEr-D",
    prepare_model=captioning.TASK.prepare_model,
    path_sizes=captioning.TASK.path_sizes,
    cost_path=captioning.TASK.cost_path,
    flops=captioning.TASK.flops,
)
