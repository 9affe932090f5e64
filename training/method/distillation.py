"""What every task's loss step shares: KD layer pairs from the student's one layer map, attention / hidden-state KD
over the three encoders, and ITC over the local or the global (multi-process) batch.

Normalisation (one choice, used by every task):
  * attention KD: per mapped layer pair, the squared error of the post-softmax probabilities is averaged over batch,
    heads and real query rows and multiplied by the key length T_k — i.e. each query row's squared errors are *summed*
    over its keys, as the official code does (mean × T_k). A row of probabilities sums to 1, so a plain mean would
    shrink as 1/T_k and weigh a 577-token ViT map far below a 40-token text map; the row sum keeps encoders with
    different sequence lengths on one scale. Pairs are averaged within an encoder, and the encoders' terms (vision
    self, text self, fusion self, fusion cross when enabled) are averaged, so a deeper encoder does not outweigh the
    others.
  * hidden KD: per mapped pair, the squared error averaged over batch, real tokens and channels; pairs averaged
    within an encoder (embeddings included); the encoders' terms summed with the vision term down-weighted by
    `image_hidden_weight` (0.1, official code 0.1-0.2).
  * logit KD: T² · KL(teacher ‖ student), batchmean (see `losses.logit_kd_loss`).
"""

from __future__ import annotations

import torch

from . import losses as L
from .structure import CROSS_ATTENTION_MODALITIES, ENCODER_CONFIG_KEYS, STREAMS, modalities
from .student import resolve_layer_map

ENCODER_OUTPUT_KEYS = {"vision": "image", "text": "text", "fusion": "fusion", "decoder": "decoder"}
"""Key of each encoder's output (`EfficientVLMEncoderOutput`) in the dicts the KD helpers read; "decoder" (the VQA
answer decoder, teacher-forced on the same answers) only where the task passes it. A stack missing from the dicts or
from the layer map is skipped."""


def kd_pairs(layer_map: dict[str, list[int]]) -> dict[str, dict[str, list[tuple[int, int]]]]:
    """KD pairs of every stack in the student's layer map (student layer i copies teacher layer map[i]); the VQA
    answer decoder's entry is mapped like fusion (see `student.resolve_layer_map`).

    attention: (i, map[i]); hidden states (HF indexing, 0 = embeddings): (0, 0) and (i + 1, map[i] + 1), i.e. the
    output of student layer i against the output of the teacher layer it was initialised from.
    """
    return {
        modality: {
            "attn": [(i, t) for i, t in enumerate(layer_map[modality])],
            "hidden": [(0, 0)] + [(i + 1, t + 1) for i, t in enumerate(layer_map[modality])],
        }
        for modality in layer_map
    }


def attention_kd(
    student: dict, teacher: dict, pairs: dict, *, query_masks: dict, cross: bool, key_length_scale: bool = True
) -> torch.Tensor:
    """Mean over stacks of the attention-map KD (self-attention of every stack; fusion and VQA-decoder
    cross-attention if `cross`).

    Args:
        student / teacher: encoder outputs under "image", "text", "fusion" (and "decoder" for VQA) with `attentions` /
            `cross_attentions`.
        pairs: `kd_pairs(...)`.
        query_masks: per encoder key, (B, T_q) 1 for real query tokens, or None (vision: no padding).
        cross: also distil the fusion cross-attention maps (task KD in the official code).
        key_length_scale: multiply each pair's mean by T_k (see the module docstring).
    """
    terms = []
    for modality, key in ENCODER_OUTPUT_KEYS.items():
        if modality not in pairs or key not in student or key not in teacher:
            continue
        kinds = [("attentions", pairs[modality]["attn"])]
        if cross and modality in CROSS_ATTENTION_MODALITIES:
            kinds.append(("cross_attentions", pairs[modality]["attn"]))
        for field, layer_pairs in kinds:
            s_maps, t_maps = getattr(student[key], field), getattr(teacher[key], field)
            if s_maps is None or t_maps is None:
                continue
            usable = [(i, j) for i, j in layer_pairs if s_maps[i] is not None and t_maps[j] is not None]
            if usable:  # a sub-layer removed by pruning has no map
                terms.append(
                    L.attention_kd_loss(list(s_maps), list(t_maps), usable, query_masks.get(key), key_length_scale)
                )
    return sum(terms) / len(terms) if terms else torch.zeros(())


def forward_with_teacher(student, teacher, inputs: dict, args, masks=None):
    """The student's forward on a supervised batch (its own task loss from `inputs["labels"]`) and, with a teacher,
    the teacher's forward on the same inputs (no grad, no masks), asking for attention maps / hidden states only when
    their KD weight is on (the fusion output then also carries the cross-attention maps).

    Returns:
        (student output, teacher output or None, use_attn, use_hidden).
    """
    use_attn = teacher is not None and args.alpha_attn > 0
    use_hidden = teacher is not None and args.beta_hidden > 0
    model_inputs = {key: inputs[key] for key in ("pixel_values", "input_ids", "attention_mask")}
    model_inputs.update(output_attentions=use_attn, output_hidden_states=use_hidden)
    s_out = student(**model_inputs, labels=inputs["labels"], pruning_masks=masks)
    if teacher is None:
        return s_out, None, use_attn, use_hidden
    with torch.no_grad():
        t_out = teacher(**model_inputs)
    return s_out, t_out, use_attn, use_hidden


def stack_outputs(output) -> dict:
    """Per-stack outputs of a model output (`vision_model_output`, ..., and a VQA `decoder_model_output`) under the
    keys the KD helpers read."""
    stacks = {"image": output.vision_model_output, "text": output.text_model_output,
              "fusion": output.fusion_model_output}
    if getattr(output, "decoder_model_output", None) is not None:
        stacks["decoder"] = output.decoder_model_output
    return stacks


def hidden_kd(
    student: dict, teacher: dict, pairs: dict, *, image_weight: float, token_masks: dict | None = None,
    pruning_masks=None,
) -> torch.Tensor:
    """Σ over encoders of the hidden-state KD, the vision term weighted by `image_weight`; `token_masks` (per output
    key, (B, T) 1 = real token) restricts a stack's term to its real tokens (the VQA decoder's answer tokens).

    With hidden-dimension masks in `pruning_masks` (`.vision.hidden`, `.text.hidden` for text and fusion) the teacher's
    states are compared on the student's kept channels only (teacher · h, h detached): a pruned channel is 0 in the
    student by construction and must not be pulled back towards the teacher's value."""
    total = torch.zeros(())
    for modality, key in ENCODER_OUTPUT_KEYS.items():
        if modality not in pairs or key not in student or key not in teacher:
            continue
        weight = image_weight if modality == "vision" else 1.0
        s_hidden, t_hidden = student[key].hidden_states, teacher[key].hidden_states
        channels = _stream_mask(pruning_masks, modality)
        if channels is not None:
            t_hidden = [h * channels.detach().to(h.dtype) for h in t_hidden]
        mask = (token_masks or {}).get(key)
        term = L.hidden_kd_loss(list(s_hidden), list(t_hidden), pairs[modality]["hidden"], **(
            {"mask": mask} if mask is not None else {}))
        total = total.to(term.device) + weight * term
    return total


def _stream_mask(pruning_masks, modality: str) -> torch.Tensor | None:
    """The hidden-dimension mask of the residual stream `modality` writes (fusion continues the text stream)."""
    if pruning_masks is None or modality not in STREAMS:
        return None
    return getattr(pruning_masks, STREAMS[modality]).hidden


def itc(image_feat: torch.Tensor, text_feat: torch.Tensor, temperature, global_batch: bool,
        image_ids: torch.Tensor | None = None) -> torch.Tensor:
    """ITC on the local batch, or (multi-process, `global_batch`) against the features gathered from every rank;
    with `image_ids` (B,) every pair showing the same image is a positive (X-VLM's image-id targets).

    `torch.distributed.nn.all_gather` is differentiable, and DDP averages the gradients of the per-rank means, so
    the update equals that of one process computing the loss over the global batch.
    """
    import torch.distributed as dist

    if not (global_batch and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        mask = None if image_ids is None else L.same_image_mask(image_ids)
        return L.itc_loss(image_feat, text_feat, temperature, positive_mask=mask)
    from torch.distributed.nn.functional import all_gather

    all_image, all_text = torch.cat(all_gather(image_feat)), torch.cat(all_gather(text_feat))
    offset = dist.get_rank() * image_feat.shape[0]
    all_ids = None
    if image_ids is not None:  # dataset-wide ids (X-VLM's idx): the same image on two ranks is one positive
        gathered = [torch.empty_like(image_ids) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, image_ids.contiguous())
        all_ids = torch.cat(gathered)
    return L.itc_loss_global(image_feat, text_feat, all_image, all_text, temperature=temperature, offset=offset,
                             image_ids=image_ids, all_image_ids=all_ids)


def check_compatible(student_config, teacher_config, hidden_kd_on: bool) -> None:
    """KD compares tokens and logits position by position: vocabularies and widths must agree."""
    s_text, t_text = student_config.text_config, teacher_config.text_config
    if s_text.vocab_size != t_text.vocab_size:
        raise ValueError(
            f"student vocab_size ({s_text.vocab_size}) != teacher vocab_size ({t_text.vocab_size}): MLM/ITM KD needs one "
            "tokenizer"
        )
    teacher_stacks = modalities(teacher_config)
    stacks = [m for m in modalities(student_config) if m in teacher_stacks]
    for key in (ENCODER_CONFIG_KEYS[m] for m in stacks) if hidden_kd_on else ():
        s, t = getattr(student_config, key).hidden_size, getattr(teacher_config, key).hidden_size
        if s != t:
            raise ValueError(
                f"{key}.hidden_size differs (student {s}, teacher {t}): hidden-state KD would need a projection; set "
                "beta_hidden=0 or use equal widths"
            )


def layer_maps(student_config, teacher_config, layer_map: dict[str, list[int]] | None = None) -> dict:
    """`kd_pairs` of the completed layer map (`student.resolve_layer_map`): the given entries, default elsewhere.

    NLVR2 fusion (`shared_cross_kv`, task KD in prune: student 2×3 copies ↔ teacher 2×6): copy c of student pair l
    pairs with copy c of the teacher pair it was initialised from (layer 2l + c ↔ 2·map[l] + c), for attention maps
    and hidden states alike.
    """
    return kd_pairs(resolve_layer_map(student_config, teacher_config, layer_map))
