"""Sizes from the config alone: prunable units and exact parameter counts (FLOPs: `training.method.cost`).

One place computes "how big is a network with these per-layer sizes", so the pruning size model (expected sparsity
at given keep probabilities), the materialized-size report and the benchmark all agree by construction; the FLOPs
model (`cost.py`) prices the same `unit_groups`.

Prunable units (the paper's pruning granularity):
  * an attention head of width `head_dim`: its q/k/v rows (+ biases) and out_proj columns;
    cross-attention heads read keys/values from the vision width;
  * an FFN neuron: one fc1 row (+ bias) and one fc2 column.
Everything else (embeddings, LayerNorms, out_proj / fc2 biases, heads) is "fixed"; a sub-layer whose units are all
removed also loses its fixed part (out bias + LayerNorm), because the model then owns no parameters for it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from modeling_efficientvlm.modeling_efficientvlm import head_width

MODALITIES = ("vision", "text", "fusion")
"""The three encoders every model has. Loops over a given config's prunable stacks use `modalities(config)`."""
ENCODER_CONFIG_KEYS = {
    "vision": "vision_config", "text": "text_config", "fusion": "fusion_encoder_config", "decoder": "decoder_config",
}
ENCODER_MODULES = {"vision": "vision_model", "text": "text_model", "fusion": "fusion_model", "decoder": "decoder_model"}
STREAMS = {"vision": "vision", "text": "text", "fusion": "text"}
"""The residual stream each encoder's units read and write (the fusion encoder continues the text stream): what a
hidden-dimension mask covers (`PruningMasks.vision.hidden` / `.text.hidden`)."""
VQA_HEADS = ("vqa",)
"""`count_parameters` heads of `EfficientVLMForQuestionAnswering`: the answer decoder's own embeddings and LM head."""


def modalities(config) -> tuple[str, ...]:
    """The prunable stacks of `config`, in order: vision, text, fusion, and "decoder" when it has a VQA answer
    decoder (`decoder_config` not None).

    The decoder is its OWN modality in the size model, the gates' per-modality report and the split reports, not a
    part of fusion: its cost scales with the answer length and, at inference, with the number of candidate answers
    re-scored per question (k·L decoder tokens against one fusion pass per question), so a split that lumps it with
    fusion would hide where a VQA model's time goes, and a per-modality target could not hold the two apart.
    """
    has_decoder = getattr(config, "decoder_config", None) is not None
    return MODALITIES + (("decoder",) if has_decoder else ())
PRETRAINING_HEADS = ("itm", "mlm", "bbox")
"""`count_parameters` heads of `EfficientVLMForPreTraining` (ITM, MLM and X-VLM's box head)."""


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


CROSS_ATTENTION_MODALITIES = ("fusion", "decoder")
"""Stacks whose layers cross-attend (fusion: to the image tokens; the VQA decoder: to the fusion output)."""


def unit_kinds(modality: str) -> tuple[UnitKind, ...]:
    """The unit kinds a stack's layers have (fusion and the VQA decoder add cross-attention heads)."""
    return tuple(kind for kind in UNIT_KINDS if modality in CROSS_ATTENTION_MODALITIES or not kind.fusion_only)


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
        kv_shared_with: NLVR2 fusion (`shared_cross_kv`): the odd copy's cross-head group names the layer of the even
            copy whose key / value projections (and gate) it shares; its `unit_params` then count only q / out (the
            K/V rows are counted once, in the even copy's group). None elsewhere.
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
    kv_shared_with: int | None = None

    @property
    def name(self) -> str:
        return f"{self.modality}.{self.kind}.{self.layer}"

    @property
    def gate_name(self) -> str:
        """The group whose gate this group uses: itself, or (shared K/V) the even copy's cross-head group."""
        layer = self.layer if self.kv_shared_with is None else self.kv_shared_with
        return f"{self.modality}.{self.kind}.{layer}"


def unit_groups(config) -> list[UnitGroup]:
    """All prunable groups of an EfficientVLMConfig, in encoder / layer / kind order (`modalities(config)`)."""
    groups = []
    for modality in modalities(config):
        sub = getattr(config, ENCODER_CONFIG_KEYS[modality])
        d, hd = sub.hidden_size, sub.head_dim
        for layer in range(sub.num_hidden_layers):
            for kind in unit_kinds(modality):
                size = getattr(sub, kind.config_field)[layer]
                if kind.name == "ffn":
                    group = UnitGroup(modality, kind.name, layer, size, 0, 3 * d, d, d, 0)
                else:
                    kv = sub.encoder_hidden_size if kind.name == "cross_head" else d
                    # an NLVR2 pair's odd copy reads the even copy's K/V projections: its heads own only q and out
                    paired = kind.name == "cross_head" and getattr(sub, "shared_cross_kv", False) and layer % 2
                    shared = layer - 1 if paired else None
                    group = UnitGroup(modality, kind.name, layer, size, 0, 3 * d, d, kv, hd, shared)
                groups.append(replace(group, unit_params=unit_parameter_count(group)))
    return groups


def _fixed_parameters(config, heads: tuple[str, ...]) -> int:
    """Parameters outside the prunable sub-layers: embeddings, encoder LayerNorms, ITC/ITM/MLM/box heads (the ITM /
    box / NLVR2 heads' inner width `head_width(config)`: `head_hidden_size`, default 2 x text width)."""
    v, t = config.vision_config, config.text_config
    dv, dt, w = v.hidden_size, t.hidden_size, head_width(config)
    norms = 4 * dv if getattr(v, "use_pre_layernorm", True) else 2 * dv  # pre- and post-LayerNorm
    vision = dv + v.num_channels * v.patch_size**2 * dv + (v.num_patches + 1) * dv + norms  # cls, conv, pos
    text = (t.vocab_size + t.max_position_embeddings + t.type_vocab_size) * dt + 2 * dt
    itc = (dv + 1) * config.embed_dim + (dt + 1) * config.embed_dim + 1  # projections + temperature
    total = vision + text + itc
    if "itm" in heads:  # Linear(d, w) + LayerNorm(w) + Linear(w, 2)
        total += (dt * w + w) + 2 * w + (w * 2 + 2)
    if "mlm" in heads:  # dense + LayerNorm + decoder bias; the decoder weight is tied to the word embeddings
        total += dt * dt + dt + 2 * dt + t.vocab_size
    if "bbox" in heads:  # X-VLM box head: Linear(d, w) + LayerNorm(w) + Linear(w, 4)
        total += (dt * w + w) + 2 * w + (w * 4 + 4)
    if "vqa" in heads:  # the answer decoder's own embeddings + LM head (its decoder weight tied to its word embeddings)
        dec = config.decoder_config
        dd = dec.hidden_size
        total += (dec.vocab_size + dec.max_position_embeddings + dec.type_vocab_size) * dd + 2 * dd
        total += dd * dd + dd + 2 * dd + dec.vocab_size
    if "nlvr" in heads:  # NLVR2 head on the single [CLS]: Linear(d, w) + LayerNorm(w) + Linear(w, num_labels)
        labels = getattr(config, "num_labels", 2)
        total += (dt * w + w) + 2 * w + (w * labels + labels)
    return total


def count_parameters(config, heads: tuple[str, ...] = ("itm",)) -> dict[str, int]:
    """Exact parameter count of a model built from `config`, by part.

    Args:
        config: an EfficientVLMConfig.
        heads: which task heads the model class has: () for EfficientVLMModel, ("itm",) for the retrieval model,
            `PRETRAINING_HEADS` ("itm", "mlm", "bbox") for the pre-training model, ("nlvr",) for the NLVR2 model
            (its head width follows `config.num_labels`), `VQA_HEADS` ("vqa",) for the VQA model (answer decoder
            embeddings + LM head; its layers count under "decoder").

    Returns:
        {"vision", "text", "fusion"[, "decoder"]} (`modalities(config)`): prunable-layer parameters incl. their fixed
        parts, "other": the rest, "prunable": units only (what sparsity is measured against), "total".
    """
    out = {m: 0 for m in modalities(config)}
    prunable = 0
    for group in unit_groups(config):
        out[group.modality] += group.size * group.unit_params + (group.fixed_params if group.size else 0)
        prunable += group.size * group.unit_params
    out["other"] = _fixed_parameters(config, heads)
    out["total"] = sum(out[m] for m in modalities(config)) + out["other"]
    out["prunable"] = prunable
    return out


def prunable_parameters(config) -> dict[str, int]:
    """Prunable parameters (units only) per modality (`modalities(config)`) and in total."""
    out = {m: 0 for m in modalities(config)}
    for group in unit_groups(config):
        out[group.modality] += group.size * group.unit_params
    out["total"] = sum(out.values())
    return out


def structure_table(config) -> dict[str, dict[str, list[int] | int]]:
    """Per-modality sizes: {"vision": {"heads": [...], "ffn": [...], "hidden": width}, "fusion": {..., "cross_heads"}}
    (and "decoder", like fusion, for a VQA config); "hidden" is the encoder's residual width (an int)."""
    out = {}
    for modality in modalities(config):
        sub = getattr(config, ENCODER_CONFIG_KEYS[modality])
        entry = {"heads": list(sub.num_attention_heads), "ffn": list(sub.intermediate_size), "hidden": sub.hidden_size}
        if modality in CROSS_ATTENTION_MODALITIES:
            entry["cross_heads"] = list(sub.num_cross_attention_heads)
        out[modality] = entry
    return out


def unit_parameter_count(group: UnitGroup) -> int:
    """Parameters of ONE unit of `group` from its widths (what `unit_groups` stores as `unit_params`): attention head q (d·hd + hd), k / v
    (kv·hd + hd each, unless an NLVR2 copy shares them) and out (hd·d); FFN neuron fc1 row (d + 1) and fc2 column (d).
    A function of the group's fields, so the hidden-dimension size model can evaluate it at other widths."""
    d, kv, hd = group.hidden_size, group.kv_size, group.head_dim
    if group.kind == "ffn":
        return 2 * d + 1
    return d * hd + hd + (0 if group.kv_shared_with is not None else 2 * (kv * hd + hd)) + hd * d
