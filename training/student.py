"""Student initialisation: a shallower copy of the teacher, layer i ← teacher layer map[i] per encoder."""

from __future__ import annotations

import copy

import torch

from modeling_efficientvlm import EfficientVLMConfig

from .structure import ENCODER_CONFIG_KEYS, MODALITIES

ENCODER_MODULES = {"vision": "vision_model", "text": "text_model", "fusion": "fusion_model"}


def default_init_map(num_student_layers: int, num_teacher_layers: int) -> list[int]:
    """Every other layer generalised: student layer i ← teacher layer (i+1)·step − 1 (6 of 12 → 1, 3, 5, …, 11).

    Raises:
        ValueError: when the student is deeper than the teacher or the depths don't divide (give a map then).
    """
    if num_student_layers > num_teacher_layers:
        raise ValueError(
            f"student has {num_student_layers} layers but the teacher only {num_teacher_layers}: a student cannot be "
            "deeper than its teacher"
        )
    if num_student_layers == 0:
        return []
    if num_teacher_layers % num_student_layers:
        raise ValueError(
            f"cannot derive a default layer map from {num_teacher_layers} teacher layers to {num_student_layers} "
            "student layers (not a divisor): pass an explicit layer map"
        )
    step = num_teacher_layers // num_student_layers
    return [(i + 1) * step - 1 for i in range(num_student_layers)]


def student_config(
    teacher_config: EfficientVLMConfig, num_layers: dict[str, int] | None = None
) -> EfficientVLMConfig:
    """The teacher's config with fewer layers per encoder (default: half of each, rounded up).

    Per-layer lists (heads, FFN width) are taken from the layers the default map selects.
    """
    num_layers = num_layers or {}
    unknown = set(num_layers) - set(MODALITIES)
    if unknown:
        raise ValueError(f"num_layers has unknown encoders {sorted(unknown)}; allowed: {list(MODALITIES)}")
    config = copy.deepcopy(teacher_config)
    for modality in MODALITIES:
        sub = getattr(config, ENCODER_CONFIG_KEYS[modality])
        teacher_depth = sub.num_hidden_layers
        depth = num_layers.get(modality, (teacher_depth + 1) // 2)
        if not isinstance(depth, int) or depth < 0:
            raise ValueError(f"num_layers[{modality!r}] must be an int >= 0, got {depth!r}")
        if depth > teacher_depth:
            raise ValueError(
                f"num_layers[{modality!r}] = {depth} exceeds the teacher's {teacher_depth} {modality} layers"
            )
        picked = default_init_map(depth, teacher_depth) if teacher_depth % max(depth, 1) == 0 else list(range(depth))
        for field in sub.per_layer_fields:
            setattr(sub, field, [getattr(sub, field)[t] for t in picked])
        sub.num_hidden_layers = depth
        sub.validate()
    return config


def init_student_from_teacher(
    teacher: torch.nn.Module,
    num_layers: dict[str, int] | None = None,
    layer_map: dict[str, list[int]] | None = None,
    student_class: type | None = None,
) -> torch.nn.Module:
    """Builds a half-depth (or `num_layers`) student and copies embeddings, heads and the mapped teacher layers.

    Args:
        teacher: an EfficientVLM model (any head class).
        num_layers: student depth per encoder, e.g. {"vision": 6, "text": 3, "fusion": 3}; default half.
        layer_map: per encoder, the teacher layer index each student layer copies; default `default_init_map`
            (student layer i ← teacher layer 2i+1 for half depth).
        student_class: model class of the student (default: the teacher's class).

    Returns:
        The student model; every non-layer tensor (embeddings, LayerNorms, projections, ITM/MLM heads) equals the
        teacher's, and student layer i of each encoder equals teacher layer layer_map[i].
    """
    layer_map = dict(layer_map or {})
    depths = dict(num_layers or {})
    for modality, mapping in layer_map.items():
        depths.setdefault(modality, len(mapping))
    config = student_config(teacher.config, depths)
    for modality in MODALITIES:
        teacher_depth = getattr(teacher.config, ENCODER_CONFIG_KEYS[modality]).num_hidden_layers
        depth = getattr(config, ENCODER_CONFIG_KEYS[modality]).num_hidden_layers
        mapping = layer_map.get(modality) or default_init_map(depth, teacher_depth)
        _check_map(modality, mapping, depth, teacher_depth)
        layer_map[modality] = mapping
        teacher_sub = getattr(teacher.config, ENCODER_CONFIG_KEYS[modality])
        student_sub = getattr(config, ENCODER_CONFIG_KEYS[modality])
        for field in student_sub.per_layer_fields:  # sizes follow the copied layers
            setattr(student_sub, field, [getattr(teacher_sub, field)[t] for t in mapping])
        student_sub.validate()
    student = (student_class or type(teacher))(config)
    state = _mapped_state_dict(teacher.state_dict(), layer_map)
    missing, unexpected = student.load_state_dict(state, strict=False)
    missing = [k for k in missing if not _is_tied(student, k)]
    if missing or unexpected:
        raise ValueError(f"student init left tensors unmapped: missing={missing}, unexpected={unexpected}")
    return student


def _check_map(modality: str, mapping: list[int], depth: int, teacher_depth: int) -> None:
    if len(mapping) != depth:
        raise ValueError(f"layer_map[{modality!r}] has {len(mapping)} entries for a {depth}-layer student encoder")
    bad = [t for t in mapping if not isinstance(t, int) or not 0 <= t < teacher_depth]
    if bad:
        raise ValueError(
            f"layer_map[{modality!r}] points outside the teacher: {bad} (valid teacher layers: 0..{teacher_depth - 1})"
        )


def _mapped_state_dict(teacher_state: dict[str, torch.Tensor], layer_map: dict[str, list[int]]) -> dict:
    """Renames teacher tensors to student names: `<encoder>.layers.<t>.` → `<encoder>.layers.<i>.` for mapped t."""
    state = {}
    inverse = {
        ENCODER_MODULES[m]: {t: i for i, t in enumerate(mapping)} for m, mapping in layer_map.items()
    }
    for name, tensor in teacher_state.items():
        parts = name.split(".")
        if len(parts) > 2 and parts[0] in inverse and parts[1] == "layers":
            student_index = inverse[parts[0]].get(int(parts[2]))
            if student_index is None:
                continue
            parts[2] = str(student_index)
        state[".".join(parts)] = tensor.detach().clone()
    return state


def _is_tied(model: torch.nn.Module, key: str) -> bool:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return key in tied
