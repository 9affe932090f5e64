"""Student initialisation: a shallower copy of the teacher, layer i ← teacher layer map[i] per encoder.

The layer map is chosen once (default: every other layer, generalised; or the user's) and recorded beside the student
(`layer_map.json`), so every later KD term pairs student layer i with the teacher layer it was copied from.
"""

from __future__ import annotations

import copy
import json
import os

import torch

from modeling_efficientvlm import EfficientVLMConfig

from .structure import ENCODER_CONFIG_KEYS, ENCODER_MODULES, MODALITIES


LAYER_MAP_FILE = "layer_map.json"
"""Beside a student checkpoint: {"vision": [...], "text": [...], "fusion": [...]}, the teacher layer of each student
layer."""


def default_init_map(num_student_layers: int, num_teacher_layers: int) -> list[int]:
    """Every other layer generalised: student layer i ← the last teacher layer of its block,
    ceil((i+1)·T/S) − 1 (6 of 12 → 1, 3, 5, …, 11; 4 of 6 → 1, 2, 4, 5).

    Raises:
        ValueError: when the student is deeper than the teacher.
    """
    if num_student_layers > num_teacher_layers:
        raise ValueError(
            f"student has {num_student_layers} layers but the teacher only {num_teacher_layers}: a student cannot be "
            "deeper than its teacher"
        )
    return [-(-(i + 1) * num_teacher_layers // num_student_layers) - 1 for i in range(num_student_layers)]


def resolve_layer_map(student_config, teacher_config, layer_map: dict[str, list[int]] | None = None) -> dict:
    """The complete layer map of a (student, teacher) pair: the given entries, `default_init_map` for the others.

    Raises:
        ValueError: an entry of the wrong length or pointing outside the teacher (naming the encoder).
    """
    layer_map = dict(layer_map or {})
    unknown = set(layer_map) - set(MODALITIES)
    if unknown:
        raise ValueError(f"layer map has unknown encoders {sorted(unknown)}; allowed: {list(MODALITIES)}")
    out = {}
    for modality in MODALITIES:
        depth = getattr(student_config, ENCODER_CONFIG_KEYS[modality]).num_hidden_layers
        teacher_depth = getattr(teacher_config, ENCODER_CONFIG_KEYS[modality]).num_hidden_layers
        mapping = layer_map.get(modality)
        mapping = default_init_map(depth, teacher_depth) if mapping is None else list(mapping)
        _check_map(modality, mapping, depth, teacher_depth)
        out[modality] = mapping
    return out


def save_layer_map(directory: str, layer_map: dict[str, list[int]]) -> None:
    """Writes `layer_map.json` beside a student checkpoint."""
    with open(os.path.join(directory, LAYER_MAP_FILE), "w") as f:
        json.dump({m: list(layer_map[m]) for m in MODALITIES}, f, indent=2)


def load_layer_map(directory: str | None) -> dict[str, list[int]] | None:
    """The recorded layer map of a student checkpoint, or None when it has none (a teacher, an older checkpoint).

    Raises:
        ValueError: the file exists but is not {encoder: [teacher layer, ...]} (naming the file).
    """
    path = os.path.join(directory, LAYER_MAP_FILE) if directory else ""
    if not path or not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            layer_map = json.load(f)
        if not isinstance(layer_map, dict) or not all(isinstance(v, list) for v in layer_map.values()):
            raise ValueError("expected {encoder: [teacher layer, ...]}")
        return {m: [int(t) for t in v] for m, v in layer_map.items()}
    except (ValueError, TypeError) as error:
        raise ValueError(f"{path} is not a layer map: {error}") from error


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
        picked = default_init_map(depth, teacher_depth)
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
            (student layer i ← teacher layer 2i+1 for half depth). Give the same map to the distillation trainer
            (`resolve_layer_map` completes it), which records it beside the student for every later KD stage.
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
