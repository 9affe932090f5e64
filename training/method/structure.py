"""Sizes from the config alone: prunable units, exact parameter counts, analytic FLOPs.

One place computes "how big is a network with these per-layer sizes", so the pruning size model (expected sparsity
at given keep probabilities), the materialized-size report and the benchmark all agree by construction.

Prunable units (the paper's pruning granularity):
  * an attention head of width `head_dim`: its q/k/v rows (+ biases) and out_proj columns;
    cross-attention heads read keys/values from the vision width;
  * an FFN neuron: one fc1 row (+ bias) and one fc2 column.
Everything else (embeddings, LayerNorms, out_proj / fc2 biases, heads) is "fixed"; a sub-layer whose units are all
removed also loses its fixed part (out bias + LayerNorm), because the model then owns no parameters for it.
"""

from __future__ import annotations

from dataclasses import dataclass

MODALITIES = ("vision", "text", "fusion")
ENCODER_CONFIG_KEYS = {"vision": "vision_config", "text": "text_config", "fusion": "fusion_encoder_config"}
ENCODER_MODULES = {"vision": "vision_model", "text": "text_model", "fusion": "fusion_model"}


@dataclass(frozen=True)
class UnitKind:
    """One kind of prunable unit: where its sizes live in the config and where its weights live in a layer.

    Attributes:
        name: the kind ("head", "cross_head", "ffn"), also the field of `EncoderPruningMasks` holding its masks.
        config_field: the per-layer size list in the encoder config.
        module: the `EfficientVLMLayer` attribute holding the units' weights.
        norm: the sub-layer's LayerNorm (removed with the sub-layer when no unit is left).
        fusion_only: only fusion layers have it (cross-attention).
    """

    name: str
    config_field: str
    module: str
    norm: str
    fusion_only: bool = False


UNIT_KINDS = (
    UnitKind("head", "num_attention_heads", "self_attn", "layer_norm1"),
    UnitKind("cross_head", "num_cross_attention_heads", "cross_attn", "layer_norm_cross", fusion_only=True),
    UnitKind("ffn", "intermediate_size", "mlp", "layer_norm2"),
)
"""The one table of unit kinds: every module that maps kinds to config fields, masks or weights reads it."""


def unit_kinds(modality: str) -> tuple[UnitKind, ...]:
    """The unit kinds an encoder's layers have (fusion adds cross-attention heads)."""
    return tuple(kind for kind in UNIT_KINDS if modality == "fusion" or not kind.fusion_only)


@dataclass(frozen=True)
class UnitGroup:
    """One prunable group: the heads of one attention sub-layer or the neurons of one FFN.

    Attributes:
        modality: "vision", "text" or "fusion".
        kind: "head" (self-attention), "cross_head" (fusion cross-attention) or "ffn".
        layer: layer index within the encoder.
        size: number of units (heads or neurons).
        unit_params: parameters one unit owns.
        fixed_params: parameters the sub-layer owns besides its units (out bias + LayerNorm), present iff size > 0.
        hidden_size: width of the residual stream of this sub-layer.
        kv_size: width the keys/values read (cross-attention: the vision width).
        head_dim: head width (attention kinds).
    """

    modality: str
    kind: str
    layer: int
    size: int
    unit_params: int
    fixed_params: int
    hidden_size: int
    kv_size: int
    head_dim: int

    @property
    def name(self) -> str:
        return f"{self.modality}.{self.kind}.{self.layer}"


def unit_groups(config) -> list[UnitGroup]:
    """All prunable groups of an EfficientVLMConfig, in encoder / layer / kind order."""
    groups = []
    for modality in MODALITIES:
        sub = getattr(config, ENCODER_CONFIG_KEYS[modality])
        d, hd = sub.hidden_size, sub.head_dim
        for layer in range(sub.num_hidden_layers):
            for kind in unit_kinds(modality):
                size = getattr(sub, kind.config_field)[layer]
                if kind.name == "ffn":  # fc1 row (+ bias) and fc2 column
                    groups.append(UnitGroup(modality, kind.name, layer, size, 2 * d + 1, 3 * d, d, d, 0))
                    continue
                kv = sub.encoder_hidden_size if kind.name == "cross_head" else d
                # q: d→hd (+hd bias); k, v: kv→hd (+hd each); out: hd→d columns
                unit = d * hd + hd + 2 * (kv * hd + hd) + hd * d
                groups.append(UnitGroup(modality, kind.name, layer, size, unit, 3 * d, d, kv, hd))
    return groups


def _fixed_parameters(config, heads: tuple[str, ...]) -> int:
    """Parameters outside the prunable sub-layers: embeddings, encoder LayerNorms, ITC/ITM/MLM heads."""
    v, t = config.vision_config, config.text_config
    dv, dt = v.hidden_size, t.hidden_size
    norms = 4 * dv if getattr(v, "use_pre_layernorm", True) else 2 * dv  # pre- and post-LayerNorm
    vision = dv + v.num_channels * v.patch_size**2 * dv + (v.num_patches + 1) * dv + norms  # cls, conv, pos
    text = (t.vocab_size + t.max_position_embeddings + t.type_vocab_size) * dt + 2 * dt
    itc = (dv + 1) * config.embed_dim + (dt + 1) * config.embed_dim + 1  # projections + temperature
    total = vision + text + itc
    if "itm" in heads:
        total += (dt * 2 * dt + 2 * dt) + 4 * dt + (2 * dt * 2 + 2)
    if "mlm" in heads:  # dense + LayerNorm + decoder bias; the decoder weight is tied to the word embeddings
        total += dt * dt + dt + 2 * dt + t.vocab_size
    return total


def count_parameters(config, heads: tuple[str, ...] = ("itm",)) -> dict[str, int]:
    """Exact parameter count of a model built from `config`, by part.

    Args:
        config: an EfficientVLMConfig.
        heads: which task heads the model class has: () for EfficientVLMModel, ("itm",) for the retrieval model,
            ("itm", "mlm") for the pre-training model.

    Returns:
        {"vision", "text", "fusion"}: prunable-layer parameters incl. their fixed parts, "other": the rest,
        "prunable": units only (what sparsity is measured against), "total".
    """
    out = {m: 0 for m in MODALITIES}
    prunable = 0
    for group in unit_groups(config):
        out[group.modality] += group.size * group.unit_params + (group.fixed_params if group.size else 0)
        prunable += group.size * group.unit_params
    out["other"] = _fixed_parameters(config, heads)
    out["total"] = sum(out[m] for m in MODALITIES) + out["other"]
    out["prunable"] = prunable
    return out


def prunable_parameters(config) -> dict[str, int]:
    """Prunable parameters (units only) per modality and in total."""
    out = {m: 0 for m in MODALITIES}
    for group in unit_groups(config):
        out[group.modality] += group.size * group.unit_params
    out["total"] = sum(out.values())
    return out


def _attention_flops(tokens: int, context: int, group: UnitGroup) -> int:
    inner = group.size * group.head_dim
    projections = tokens * group.hidden_size * inner + 2 * context * group.kv_size * inner + tokens * inner * group.hidden_size
    scores = 2 * tokens * context * inner  # QK^T and probs @ V
    return 2 * (projections + scores)  # multiply-accumulate = 2 FLOPs


def encoder_flops(config, modality: str, tokens: int, context: int | None = None) -> int:
    """Forward FLOPs of one encoder for one sequence (matmuls only; softmax/LayerNorm/activations are O(T·d)).

    Args:
        config: an EfficientVLMConfig.
        modality: "vision", "text" or "fusion".
        tokens: sequence length of this encoder's input.
        context: fusion only: number of image tokens the cross-attention reads.
    """
    total = 0
    for group in unit_groups(config):
        if group.modality != modality or group.size == 0:
            continue
        if group.kind == "ffn":
            total += 2 * 2 * tokens * group.hidden_size * group.size
        elif group.kind == "cross_head":
            total += _attention_flops(tokens, context or 0, group)
        else:
            total += _attention_flops(tokens, tokens, group)
    if modality == "vision":
        v = config.vision_config
        total += 2 * v.num_patches * v.num_channels * v.patch_size**2 * v.hidden_size  # patch conv
    return total


def retrieval_flops(config, num_images: int, num_texts: int, text_length: int, k: int, image_size: int | None = None) -> dict[str, int]:
    """FLOPs of the retrieval inference path: encode every image and text, ITC scores, ITM on top-k per query.

    The ITM re-ranking fuses k candidates for every image query and every text query: (num_images + num_texts)·k
    fusion passes (the ALBEF/X-VLM protocol).
    """
    v = config.vision_config
    size = image_size or v.image_size
    image_tokens = 1 + (size // v.patch_size) ** 2
    scaled = config if size == v.image_size else _with_image_size(config, size)
    vision = num_images * encoder_flops(scaled, "vision", image_tokens)
    text = num_texts * encoder_flops(config, "text", text_length)
    itc = 2 * num_images * num_texts * config.embed_dim
    itc += 2 * (num_images * v.hidden_size + num_texts * config.text_config.hidden_size) * config.embed_dim
    pairs = (num_images + num_texts) * k
    fusion = pairs * encoder_flops(config, "fusion", text_length, context=image_tokens)
    d = config.text_config.hidden_size
    itm = pairs * 2 * (d * 2 * d + 2 * d * 2)
    return {"vision": vision, "text": text, "itc": itc, "fusion": fusion + itm, "total": vision + text + itc + fusion + itm}


def _with_image_size(config, image_size: int):
    vision = config.vision_config.to_dict()
    vision["image_size"] = image_size
    return type(config)(
        vision_config=vision,
        text_config=config.text_config.to_dict(),
        fusion_encoder_config=config.fusion_encoder_config.to_dict(),
        embed_dim=config.embed_dim,
    )


def structure_table(config) -> dict[str, dict[str, list[int]]]:
    """Per-modality per-layer sizes: {"vision": {"heads": [...], "ffn": [...]}, "fusion": {..., "cross_heads"}}."""
    out = {}
    for modality in MODALITIES:
        sub = getattr(config, ENCODER_CONFIG_KEYS[modality])
        entry = {"heads": list(sub.num_attention_heads), "ffn": list(sub.intermediate_size)}
        if modality == "fusion":
            entry["cross_heads"] = list(sub.num_cross_attention_heads)
        out[modality] = entry
    return out
