"""Student initialisation: a shallower copy of the teacher, layer i ← teacher layer map[i] per encoder.

The layer map is chosen once (default: every other layer, generalised; or the user's) and recorded beside the student
(`layer_map.json`), so every later KD term pairs student layer i with the teacher layer it was copied from.

NLVR2 fusion (`shared_cross_kv`: layers 2l, 2l + 1 are the two copies of original layer l) is mapped by PAIRS: student
pair l ← teacher pair map[l], copy c ← copy c, i.e. layer 2l + c ← teacher layer 2·map[l] + c. A fusion map may be
given per pair (the original layers, as general distillation records it) or per layer; resolved maps are per layer.
"""

from __future__ import annotations

import copy
import json
import os

import torch

from modeling_efficientvlm import EfficientVLMConfig

from .structure import ENCODER_CONFIG_KEYS, ENCODER_MODULES, modalities


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


def _paired(config, modality: str) -> bool:
    """Whether the encoder is an NLVR2 fusion of copy pairs (`shared_cross_kv`)."""
    return modality == "fusion" and bool(getattr(config.fusion_encoder_config, "shared_cross_kv", False))


def copies_map(pair_map: list[int]) -> list[int]:
    """Pair map → layer map of an NLVR2 fusion: copy c of student pair l ← copy c of teacher pair pair_map[l]."""
    return [2 * t + c for t in pair_map for c in (0, 1)]


def _layer_level_map(modality: str, mapping: list[int] | None, depth: int, teacher_depth: int, paired: bool) -> list:
    """The per-layer map of one encoder: `mapping` (None = default), checked; NLVR2 fusion maps may be per pair."""
    if not paired:
        mapping = default_init_map(depth, teacher_depth) if mapping is None else list(mapping)
        _check_map(modality, mapping, depth, teacher_depth)
        return mapping
    if mapping is None:
        return copies_map(default_init_map(depth // 2, teacher_depth // 2))
    mapping = list(mapping)
    if len(mapping) not in (depth // 2, depth):
        raise ValueError(
            f"layer_map[{modality!r}] has {len(mapping)} entries, but the student's NLVR2 fusion has {depth // 2} copy "
            f"pairs ({depth} layers): give one teacher pair per pair or one teacher layer per layer"
        )
    if len(mapping) == depth // 2 and depth:  # one entry per pair (original layers)
        _check_map(modality, mapping, depth // 2, teacher_depth // 2)
        return copies_map(mapping)
    _check_map(modality, mapping, depth, teacher_depth)
    if mapping != copies_map([t // 2 for t in mapping[::2]]):
        raise ValueError(
            f"layer_map[{modality!r}] = {mapping} splits NLVR2 copy pairs: student layers 2l, 2l+1 must map to teacher "
            "layers 2t, 2t+1 (or give one teacher pair per student pair)"
        )
    return mapping


def resolve_layer_map(student_config, teacher_config, layer_map: dict[str, list[int]] | None = None) -> dict:
    """The complete per-layer map of a (student, teacher) pair: the given entries, `default_init_map` elsewhere
    (NLVR2 fusion: by pairs, see the module docstring).

    Raises:
        ValueError: an entry of the wrong length or pointing outside the teacher (naming the encoder), or a student
            and teacher of which only one has the NLVR2 fusion.
    """
    layer_map = dict(layer_map or {})
    stacks = _shared_stacks(student_config, teacher_config)
    unknown = set(layer_map) - set(stacks)
    if unknown:
        raise ValueError(f"layer map has unknown encoders {sorted(unknown)}; allowed: {list(stacks)}")
    out = {}
    for modality in stacks:
        if modality == "decoder" and "decoder" not in layer_map:
            out[modality] = _decoder_default_map(student_config, teacher_config, out["fusion"])
            continue
        depth = getattr(student_config, ENCODER_CONFIG_KEYS[modality]).num_hidden_layers
        teacher_depth = getattr(teacher_config, ENCODER_CONFIG_KEYS[modality]).num_hidden_layers
        paired = _paired(student_config, modality)
        if paired != _paired(teacher_config, modality):
            raise ValueError(
                f"student fusion shared_cross_kv = {paired} but teacher's = {not paired}: KD pairs an NLVR2 "
                "(duplicated-fusion) student only with an NLVR2 teacher; load both as EfficientVLMForVisualReasoning"
            )
        out[modality] = _layer_level_map(modality, layer_map.get(modality), depth, teacher_depth, paired)
    return out


def _shared_stacks(student_config, teacher_config) -> tuple[str, ...]:
    """The stacks a layer map covers: the three encoders, and the VQA answer decoder when both configs have one."""
    teacher = modalities(teacher_config)
    return tuple(m for m in modalities(student_config) if m in teacher)


def _decoder_default_map(student_config, teacher_config, fusion_map: list[int]) -> list[int]:
    """Default map of the VQA answer decoder: the fusion map when both decoders mirror their fusion encoders (each
    decoder is initialised from its own fusion layers, so student decoder layer i descends from the teacher fusion
    layer fusion_map[i], which initialised teacher decoder layer fusion_map[i]); every other layer otherwise."""
    depth = student_config.decoder_config.num_hidden_layers
    teacher_depth = teacher_config.decoder_config.num_hidden_layers
    mirrors = (depth == student_config.fusion_encoder_config.num_hidden_layers
               and teacher_depth == teacher_config.fusion_encoder_config.num_hidden_layers)
    mapping = list(fusion_map) if mirrors and len(fusion_map) == depth else default_init_map(depth, teacher_depth)
    _check_map("decoder", mapping, depth, teacher_depth)
    return mapping


def save_layer_map(directory: str, layer_map: dict[str, list[int]]) -> None:
    """Writes `layer_map.json` beside a student checkpoint (every stack it maps: encoders, VQA decoder)."""
    with open(os.path.join(directory, LAYER_MAP_FILE), "w") as f:
        json.dump({m: list(mapping) for m, mapping in layer_map.items()}, f, indent=2)


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

    Per-layer lists (heads, FFN width) are taken from the layers the default map selects. An NLVR2 fusion
    (`shared_cross_kv`) keeps whole copy pairs: its depth counts layers and must be even (default: half the pairs,
    rounded up, = every other pair).
    """
    num_layers = num_layers or {}
    unknown = set(num_layers) - set(modalities(teacher_config))
    if unknown:
        raise ValueError(
            f"num_layers has unknown encoders {sorted(unknown)}; allowed: {list(modalities(teacher_config))}"
        )
    config = copy.deepcopy(teacher_config)
    for modality in modalities(config):  # a VQA teacher's answer decoder too: every other layer by default
        sub = getattr(config, ENCODER_CONFIG_KEYS[modality])
        teacher_depth = sub.num_hidden_layers
        paired = _paired(config, modality)
        depth = num_layers.get(modality, 2 * ((teacher_depth // 2 + 1) // 2) if paired else (teacher_depth + 1) // 2)
        if not isinstance(depth, int) or depth < 0:
            raise ValueError(f"num_layers[{modality!r}] must be an int >= 0, got {depth!r}")
        if depth > teacher_depth:
            raise ValueError(
                f"num_layers[{modality!r}] = {depth} exceeds the teacher's {teacher_depth} {modality} layers"
            )
        if paired and depth % 2:
            raise ValueError(
                f"num_layers[{modality!r}] = {depth} is odd, but the teacher's NLVR2 fusion (shared_cross_kv) consists "
                "of copy pairs: give an even number of layers"
            )
        picked = _layer_level_map(modality, None, depth, teacher_depth, paired)
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
            An NLVR2 teacher's fusion (`shared_cross_kv`) is mapped by pairs: its `num_layers` counts layers (even)
            and its map names one teacher pair per student pair (default every other pair: 1, 3, 5 of 6).
        student_class: model class of the student (default: the teacher's class).

    Returns:
        The student model; every non-layer tensor (embeddings, LayerNorms, projections, ITM/MLM heads) equals the
        teacher's, and student layer i of each encoder equals teacher layer layer_map[i].
    """
    layer_map = dict(layer_map or {})
    depths = dict(num_layers or {})
    for modality, mapping in layer_map.items():  # an NLVR2 fusion map names one teacher pair per student pair
        depths.setdefault(modality, len(mapping) * (2 if _paired(teacher.config, modality) else 1))
    config = student_config(teacher.config, depths)
    for modality in modalities(teacher.config):
        teacher_depth = getattr(teacher.config, ENCODER_CONFIG_KEYS[modality]).num_hidden_layers
        depth = getattr(config, ENCODER_CONFIG_KEYS[modality]).num_hidden_layers
        mapping = _layer_level_map(
            modality, layer_map.get(modality) or None, depth, teacher_depth, _paired(teacher.config, modality)
        )
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


def reinitialized(model: torch.nn.Module, *, seed: int) -> torch.nn.Module:
    """A model of the same class and config with fresh weights (the class's own initialisation, seeded): the student
    structure without the teacher's layers, for the initialisation ablation (`distill --student_init random`)."""
    torch.manual_seed(seed)
    fresh = type(model)._from_config(model.config)
    return fresh.to(next(model.parameters()).device).train(model.training)


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
