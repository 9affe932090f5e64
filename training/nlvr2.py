"""NLVR2 task loss + task-specific distillation (REFERENCE §2, §4).

The student and teacher are `EfficientVLMForVisualReasoning` models: one vision pass over the 2B images (pair-adjacent:
row 2b = left, 2b + 1 = right image of item b), one text pass over the B statements and one fusion pass over 2B rows
(statement b repeated for its two images). KD terms reuse the retrieval step's helpers from `training.trainer`; the
only adapter needed is the (image row, text row) index of every fusion row, which tells the attention KD which text
padding mask applies to each of the 2B fusion queries.
"""

from __future__ import annotations

import torch

from . import losses as L
from .trainer import DistillationArguments, _attention_kd, _hidden_kd

NLVR2_LAMBDA = 0.8
"""Official NLVR2 weighting: 0.8·task + 0.2·KD (pass it as `lambda_vlp`)."""


def fusion_pairs(batch: int, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(image row, text row) of each of the 2B fusion rows of `EfficientVLMForVisualReasoning`.

    Args:
        batch: B, the number of NLVR2 items.
        device: where to put the indices.

    Returns:
        (image_idx (2B,) = 0..2B−1, text_idx (2B,) = [0, 0, 1, 1, …]), the `pairs` form `_attention_kd` reads.
    """
    image_idx = torch.arange(2 * batch, device=device)
    text_idx = torch.arange(batch, device=device).repeat_interleave(2)
    return image_idx, text_idx


def _encoder_outputs(output) -> dict:
    """Per-encoder outputs under the keys the trainer's KD helpers expect ("image", "text", "fusion")."""
    return {"image": output.vision_model_output, "text": output.text_model_output, "fusion": output.fusion_model_output}


def nlvr2_losses(
    student,
    teacher,
    inputs: dict,
    args: DistillationArguments,
    maps: dict | None,
    masks=None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """NLVR2 cross-entropy of the student + task KD from the teacher on the same batch.

    total = λ·L_task + (1 − λ)·(α·L_attn + β·L_hid + γ·L_logits) with λ = `args.lambda_vlp` (official NLVR2: 0.8,
    see `NLVR2_LAMBDA`). Attention KD covers the self-attention of all three encoders, plus the fusion
    cross-attention when `args.cross_attention_kd`; hidden KD covers all three encoders (vision down-weighted by
    `args.image_hidden_weight`); logit KD is KL·T² on the (B, 2) classifier logits.

    Args:
        student: an `EfficientVLMForVisualReasoning` (trained).
        teacher: an `EfficientVLMForVisualReasoning` (frozen; run under no_grad, without masks), or None for the task
            loss only (teacher fine-tuning).
        inputs: an `NLVR2Collator` batch: pixel_values (B, 2, C, H, W), input_ids / attention_mask (B, T),
            labels (B,).
        args: the distillation weights (`DistillationArguments` or any object with the same fields).
        maps: `training.trainer.layer_maps(student.config, teacher.config)`; unused when `teacher` is None.
        masks: the student's `PruningMasks` (pruning), or None.
        generator: unused (NLVR2 samples nothing); accepted so this is a drop-in for `distillation_losses`.

    Returns:
        (total scalar, parts): parts holds "task", the KD terms computed ("logits", "attn", "hidden") and "total".

    Raises:
        KeyError: the batch has no "labels".
    """
    if "labels" not in inputs:
        raise KeyError(f"NLVR2 batches need 'labels' (got keys {sorted(inputs)})")
    use_attn = teacher is not None and args.alpha_attn > 0
    use_hidden = teacher is not None and args.beta_hidden > 0
    model_inputs = {
        "pixel_values": inputs["pixel_values"],
        "input_ids": inputs["input_ids"],
        "attention_mask": inputs["attention_mask"],
        "output_attentions": use_attn,  # the fusion output then also carries the cross-attention maps
        "output_hidden_states": use_hidden,
    }
    s_out = student(**model_inputs, labels=inputs["labels"], pruning_masks=masks)
    task = {"task": s_out.loss}
    if teacher is None:
        return L.combine_losses(task, {}, 1.0, 0.0, 0.0, 0.0)
    with torch.no_grad():
        t_out = teacher(**model_inputs)
    device = s_out.logits.device
    kd = {"logits": L.logit_kd_loss(s_out.logits, t_out.logits, args.kd_temperature)}
    student_encoders, teacher_encoders = _encoder_outputs(s_out), _encoder_outputs(t_out)
    if use_attn:
        pairs = fusion_pairs(inputs["input_ids"].shape[0], inputs["attention_mask"].device)
        kd["attn"] = _attention_kd(
            student_encoders,
            teacher_encoders,
            maps,
            inputs,
            pairs,
            args.cross_attention_kd,
            args.attention_key_length_scale,
        ).to(device)
    if use_hidden:
        kd["hidden"] = _hidden_kd(student_encoders, teacher_encoders, maps, args.image_hidden_weight).to(device)
    return L.combine_losses(task, kd, args.lambda_vlp, args.alpha_attn, args.beta_hidden, args.gamma_logits)


__all__ = ["NLVR2_LAMBDA", "fusion_pairs", "nlvr2_losses"]
