"""Weight conversion into EfficientVLM.

Two entry points:

* `convert_xvlm_checkpoint`: an X-VLM (CLIP-ViT variant) or official EfficientVLM `.pth` checkpoint → an EfficientVLM
  model (and optionally a Hub-ready folder). The layout (pre-training `text_encoder.bert.…`, retrieval
  `text_encoder.…`, or NLVR2: `text_encoder.…` with each fusion layer duplicated, the copies sharing
  `crossattention.self.{key,value}`, and `cls_head` / `ta_head`), depths, widths, head counts, image size and
  vocabulary are read from the tensors; every key is mapped or explicitly ignored (with a reason), and unknown or
  missing keys raise a `ValueError` that lists them.
* `from_vision_text_pretrained`: a fresh EfficientVLM whose vision encoder comes from a CLIP / ViT vision tower and
  whose text + fusion encoders come from one BERT (layers `0..n_text-1` → text, the rest → fusion, cross-attention
  and the ITC / ITM heads freshly initialised), as X-VLM initialises its teacher.

BERT layer naming (X-VLM and transformers' BERT share it) → EfficientVLM:
    attention.self.{query,key,value} → self_attn.{q,k,v}_proj;   attention.output.dense → self_attn.out_proj
    attention.output.LayerNorm → layer_norm1;   crossattention.* → cross_attn.* / layer_norm_cross
    intermediate.dense → mlp.fc1;   output.dense → mlp.fc2;        output.LayerNorm → layer_norm2
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from modeling_efficientvlm import (
    EfficientVLMConfig,
    EfficientVLMForImageTextRetrieval,
    EfficientVLMForPreTraining,
    EfficientVLMForQuestionAnswering,
    EfficientVLMForVisualReasoning,
    EfficientVLMVisionConfig,
)
from modeling_efficientvlm.modeling_efficientvlm import EfficientVLMVisionEmbeddings

from ..infra.runs import atomic_directory

logger = logging.getLogger(__name__)

__all__ = [
    "ConversionReport",
    "convert_xvlm_checkpoint",
    "from_vision_text_pretrained",
    "interpolate_position_table",
    "load_xvlm_state_dict",
    "save_converted",
    "xvlm_config_from_state_dict",
]

StateDict = dict[str, torch.Tensor]

# BERT sub-module name (between `layer.N.` and `.weight`/`.bias`) → EfficientVLM layer sub-module name
_BERT_LAYER_NAMES = {
    "attention.self.query": "self_attn.q_proj",
    "attention.self.key": "self_attn.k_proj",
    "attention.self.value": "self_attn.v_proj",
    "attention.output.dense": "self_attn.out_proj",
    "attention.output.LayerNorm": "layer_norm1",
    "crossattention.self.query": "cross_attn.q_proj",
    "crossattention.self.key": "cross_attn.k_proj",
    "crossattention.self.value": "cross_attn.v_proj",
    "crossattention.output.dense": "cross_attn.out_proj",
    "crossattention.output.LayerNorm": "layer_norm_cross",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "output.LayerNorm": "layer_norm2",
}
_BERT_EMBEDDINGS = ("word_embeddings", "position_embeddings", "token_type_embeddings", "LayerNorm")
# BERT MLM head (`cls.predictions.` stripped) → EfficientVLM `mlm_head.`
_MLM_NAMES = {
    "transform.dense.weight": "dense.weight",
    "transform.dense.bias": "dense.bias",
    "transform.LayerNorm.weight": "LayerNorm.weight",
    "transform.LayerNorm.bias": "LayerNorm.bias",
    "bias": "bias",
    "decoder.weight": "decoder.weight",
}
# ViT layer sub-module (transformers 5 names and the older `encoder.layer` names) → EfficientVLM
_VIT_LAYER_NAMES = {
    "attention.q_proj": "self_attn.q_proj",
    "attention.k_proj": "self_attn.k_proj",
    "attention.v_proj": "self_attn.v_proj",
    "attention.o_proj": "self_attn.out_proj",
    "attention.attention.query": "self_attn.q_proj",
    "attention.attention.key": "self_attn.k_proj",
    "attention.attention.value": "self_attn.v_proj",
    "attention.output.dense": "self_attn.out_proj",
    "layernorm_before": "layer_norm1",
    "layernorm_after": "layer_norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
# X-VLM keys that have no counterpart in EfficientVLM, with the reason they are dropped
_XVLM_IGNORED = (
    (re.compile(r"(^|\.)position_ids$"), "position-id buffer (rebuilt by the model)"),
    (re.compile(r"^text_encoder\.(bert\.)?pooler\."), "BERT pooler (unused by X-VLM)"),
    (re.compile(r"^text_decoder\.bert\.pooler\."), "BERT pooler of the VQA answer decoder (unused by X-VLM)"),
    (
        re.compile(r"^ta_head\."),
        "NLVR domain pre-training head (Linear(d, 3), text-agnostic pair classes); the NLVR2 head starts fresh, as "
        "X-VLM's fine-tuning starts its cls_head",
    ),
    (
        re.compile(r"^l0_module\."),
        "L0 pruning gates / Lagrange multipliers: the converted model is the dense (unpruned) network; the tensors "
        "are kept in ConversionReport.gate_tensors",
    ),
)


@dataclass
class ConversionReport:
    """What a conversion did.

    Args:
        source: the checkpoint path (or "<state dict>").
        layout: "pretrain" (`text_encoder.bert.…` + MLM head), "retrieval" (`text_encoder.…`) or "nlvr2"
            (`text_encoder.…` with X-VLM's duplicated fusion layers and `cls_head` / `ta_head`).
        model_class: the EfficientVLM class built.
        source_image_size: image size the checkpoint's position table was trained at.
        image_size: image size of the converted model (differs when the table was interpolated).
        num_converted: number of tensors copied.
        ignored: source key → reason it was not converted.
        initialised: target keys freshly initialised (only for `from_vision_text_pretrained`).
        gate_tensors: `l0_module.*` tensors of an official EfficientVLM pruning checkpoint (not part of the model).
    """

    source: str
    layout: str
    model_class: str
    source_image_size: int
    image_size: int
    num_converted: int
    ignored: dict[str, str] = field(default_factory=dict)
    initialised: list[str] = field(default_factory=list)
    gate_tensors: StateDict = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (gate tensors given by shape only)."""
        out = asdict(self)
        out["gate_tensors"] = {k: list(v.shape) for k, v in self.gate_tensors.items()}
        return out


# --------------------------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------------------------


def _bert_layer_target(index: int, module: str, param: str, num_text_layers: int) -> str | None:
    """Target key of BERT layer `index`'s `module.param`, or None when the name is not a BERT layer parameter."""
    name = _BERT_LAYER_NAMES.get(module)
    if name is None or param not in ("weight", "bias"):
        return None
    if index < num_text_layers:
        return f"text_model.layers.{index}.{name}.{param}"
    return f"fusion_model.layers.{index - num_text_layers}.{name}.{param}"


def _heads(rows: int, head_dim: int, key: str) -> int:
    """Number of heads of a projection with `rows` output features (raises when `head_dim` does not divide it)."""
    if head_dim <= 0:
        raise ValueError(f"head_dim must be > 0, got {head_dim}")
    if rows % head_dim:
        raise ValueError(
            f"{key} has {rows} output features, not a multiple of head_dim={head_dim}: pass the checkpoint's head_dim"
        )
    return rows // head_dim


def _layer_indices(keys: list[str], pattern: str) -> list[int]:
    """Sorted distinct layer indices captured by `pattern` (one group) over `keys`."""
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for key in keys if (m := regex.match(key))})


def _check_contiguous(indices: list[int], what: str) -> int:
    """Number of layers of a stack whose indices must be 0..n-1."""
    if indices != list(range(len(indices))):
        raise ValueError(f"{what} layer indices must be 0..n-1 without gaps, got {indices}")
    return len(indices)


def interpolate_position_table(table: torch.Tensor, patch_size: int, image_size: int) -> torch.Tensor:
    """Resizes a ViT position table (1 + g*g, D) to another square image size (bicubic on the grid, CLS row kept).

    Uses `EfficientVLMVisionEmbeddings.interpolate_pos_encoding`, so the converted table equals what the model computes
    with `interpolate_pos_encoding=True`.

    Args:
        table: (1 + g*g, D) position embeddings, row 0 = CLS.
        patch_size: patch side in pixels.
        image_size: target image side in pixels (a multiple of `patch_size`).

    Returns:
        (1 + (image_size / patch_size)^2, D) table.
    """
    if image_size <= 0 or image_size % patch_size:
        raise ValueError(f"image_size ({image_size}) must be a positive multiple of the patch size ({patch_size})")
    grid = math.isqrt(table.shape[0] - 1)
    if grid * grid + 1 != table.shape[0]:
        raise ValueError(f"position table has {table.shape[0]} rows, not 1 + a square number of patches")
    config = EfficientVLMVisionConfig(
        image_size=grid * patch_size, patch_size=patch_size, hidden_size=table.shape[1], num_hidden_layers=0,
        num_channels=1,
    )
    embeddings = EfficientVLMVisionEmbeddings(config)
    with torch.no_grad():
        embeddings.position_embedding.weight.copy_(table)
        return embeddings.interpolate_pos_encoding(image_size, image_size)[0].detach().clone()


def _load_exact(
    model: nn.Module, mapped: StateDict, sources: dict[str, str], fresh: re.Pattern[str] | None = None
) -> list[str]:
    """Loads `mapped` into `model`, refusing unknown targets, missing keys and shape mismatches (listing them all).

    Args:
        model: the freshly built model.
        mapped: target key → tensor.
        sources: target key → source key (for error messages).
        fresh: targets allowed to stay freshly initialised (matched with `re.match`); None = every key must be given.

    Returns:
        The target keys left at their fresh initialisation.
    """
    expected = model.state_dict()
    unknown = sorted(f"{sources.get(k, k)} → {k}" for k in mapped if k not in expected)
    mismatched = sorted(
        f"{sources.get(k, k)}: {tuple(v.shape)} vs model {k}: {tuple(expected[k].shape)}"
        for k, v in mapped.items()
        if k in expected and v.shape != expected[k].shape
    )
    absent = [k for k in expected if k not in mapped]
    missing = sorted(k for k in absent if fresh is None or not fresh.match(k))
    problems = []
    if unknown:
        problems.append(f"unknown keys (no EfficientVLM parameter of that name): {unknown}")
    if missing:
        problems.append(f"missing keys (EfficientVLM parameters the source does not provide): {missing}")
    if mismatched:
        problems.append(f"shape mismatches: {mismatched}")
    if problems:
        raise ValueError("cannot convert the checkpoint:\n  " + "\n  ".join(problems))
    model.load_state_dict(mapped, strict=False)  # every gap was checked above against the allowed fresh keys
    return sorted(set(absent) - set(missing))


# --------------------------------------------------------------------------------------------------------------------
# X-VLM / EfficientVLM .pth checkpoints
# --------------------------------------------------------------------------------------------------------------------


def load_xvlm_state_dict(path_or_state_dict: str | os.PathLike | StateDict) -> StateDict:
    """Reads an X-VLM `.pth` (a dict with key `model`, or the state dict itself) with `weights_only=True`.

    A `module.` prefix on every key (DistributedDataParallel) is removed.
    """
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        if not os.path.isfile(path_or_state_dict):
            raise FileNotFoundError(f"no X-VLM checkpoint at {path_or_state_dict}")
        obj = torch.load(path_or_state_dict, map_location="cpu", weights_only=True)
    else:
        obj = path_or_state_dict
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("expected a state dict (name → tensor), or a dict holding one under the key 'model'")
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _xvlm_text_prefix(state: StateDict) -> tuple[str, str]:
    """(text prefix, layout name): `text_encoder.bert.` for pre-training, `text_encoder.` for retrieval."""
    if any(k.startswith("text_encoder.bert.") for k in state):
        return "text_encoder.bert.", "pretrain"
    if any(k.startswith("text_encoder.encoder.layer.") for k in state):
        return "text_encoder.", "retrieval"
    raise ValueError(
        "not an X-VLM checkpoint: no `text_encoder.bert.encoder.layer.*` nor `text_encoder.encoder.layer.*` keys"
    )


def _require(state: StateDict, key: str) -> torch.Tensor:
    if key not in state:
        raise ValueError(f"not an X-VLM (CLIP ViT) checkpoint: key {key!r} is missing")
    return state[key]


def _xvlm_vision_config(state: StateDict, head_dim: int) -> dict[str, Any]:
    """Vision sub-config from `vision_encoder.*` shapes (per-layer heads / FFN widths, image size from pos rows)."""
    patch = _require(state, "vision_encoder.patch_embed.weight")  # (D, C, P, P)
    rows = _require(state, "vision_encoder.pos_embed.weight").shape[0]  # 1 + (img / P)^2
    grid = math.isqrt(rows - 1)
    if grid * grid + 1 != rows:
        raise ValueError(f"vision_encoder.pos_embed.weight has {rows} rows, not 1 + a square number of patches")
    prefix = "vision_encoder.encoder.layers."
    depth = _check_contiguous(_layer_indices(list(state), re.escape(prefix) + r"(\d+)\."), "vision_encoder")
    heads, widths = [], []
    for i in range(depth):
        q = state.get(f"{prefix}{i}.self_attn.q_proj.weight")
        fc1 = state.get(f"{prefix}{i}.mlp.fc1.weight")
        heads.append(0 if q is None else _heads(q.shape[0], head_dim, f"{prefix}{i}.self_attn.q_proj.weight"))
        widths.append(0 if fc1 is None else fc1.shape[0])
    return dict(
        image_size=grid * patch.shape[-1], patch_size=patch.shape[-1], num_channels=patch.shape[1],
        hidden_size=patch.shape[0], num_hidden_layers=depth, num_attention_heads=heads, head_dim=head_dim,
        intermediate_size=widths, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    )


def _xvlm_bert_layers(state: StateDict, prefix: str, head_dim: int) -> tuple[int, list[int], list[int], list[int]]:
    """(first fusion layer, self heads, cross heads, FFN widths) of the BERT stack, per layer."""
    layer = f"{prefix}encoder.layer."
    depth = _check_contiguous(_layer_indices(list(state), re.escape(layer) + r"(\d+)\."), "text_encoder")
    cross = _layer_indices(list(state), re.escape(layer) + r"(\d+)\.crossattention\.")
    split = cross[0] if cross else depth
    if cross != list(range(split, depth)):
        raise ValueError(
            f"cross-attention must be in every layer from the first fusion layer ({split}) on; found it in {cross}"
        )

    def count(i: int, module: str) -> int:
        key = f"{layer}{i}.{module}.self.query.weight"
        return _heads(state[key].shape[0], head_dim, key) if key in state else 0

    heads = [count(i, "attention") for i in range(depth)]
    cross_heads = [count(i, "crossattention") for i in range(depth)]
    ffn = [state.get(f"{layer}{i}.intermediate.dense.weight") for i in range(depth)]
    widths = [0 if w is None else w.shape[0] for w in ffn]
    return split, heads, cross_heads, widths


def xvlm_config_from_state_dict(state: StateDict, head_dim: int = 64) -> EfficientVLMConfig:
    """Builds the EfficientVLMConfig that describes an X-VLM / EfficientVLM state dict.

    Args:
        state: the checkpoint's state dict (see `load_xvlm_state_dict`).
        head_dim: width of one attention head (64 in the released checkpoints); must divide every projection.

    Returns:
        The config (text vs fusion split = first BERT layer with `crossattention` keys).
    """
    prefix, _ = _xvlm_text_prefix(state)
    vision = _xvlm_vision_config(state, head_dim)
    words = _require(state, f"{prefix}embeddings.word_embeddings.weight")  # (V, D)
    split, heads, cross_heads, widths = _xvlm_bert_layers(state, prefix, head_dim)
    shared = dict(hidden_size=words.shape[1], head_dim=head_dim, vocab_size=words.shape[0])
    text = dict(
        shared, num_hidden_layers=split, num_attention_heads=heads[:split], intermediate_size=widths[:split],
        max_position_embeddings=_require(state, f"{prefix}embeddings.position_embeddings.weight").shape[0],
        type_vocab_size=_require(state, f"{prefix}embeddings.token_type_embeddings.weight").shape[0],
    )
    fusion = dict(
        shared, num_hidden_layers=len(heads) - split, num_attention_heads=heads[split:],
        num_cross_attention_heads=cross_heads[split:], intermediate_size=widths[split:],
    )
    decoder = state.get("text_encoder.cls.predictions.decoder.weight")
    tied = decoder is None or torch.equal(decoder, words)
    extra = {}
    if _is_nlvr(state):  # X-VLM's NLVR2 model has no ITC projections (its domain pre-training has vision_proj)
        fusion["shared_cross_kv"] = True
        _check_shared_kv(state, prefix, split, len(heads))
        if "cls_head.3.weight" in state:
            extra["num_labels"] = state["cls_head.3.weight"].shape[0]
        embed_dim = state["vision_proj.weight"].shape[0] if "vision_proj.weight" in state else 256
    elif _is_vqa(state):  # X-VLM's VQA model has no ITC projections; its answer decoder is `text_decoder.*`
        extra["decoder_config"] = _xvlm_decoder_config(state, head_dim, fusion["hidden_size"])
        embed_dim = state["vision_proj.weight"].shape[0] if "vision_proj.weight" in state else 256
    else:
        embed_dim = _require(state, "vision_proj.weight").shape[0]
    return EfficientVLMConfig(
        vision_config=vision, text_config=text, fusion_encoder_config=fusion, embed_dim=embed_dim,
        tie_word_embeddings=tied, **extra,
    )


_DECODER_PREFIX = "text_decoder.bert."
"""X-VLM / EfficientVLM VQA answer decoder (`BertLMHeadModel`): `text_decoder.bert.{embeddings,encoder.layer.N}.*`
and its LM head `text_decoder.cls.predictions.*`."""


def _is_vqa(state: StateDict) -> bool:
    """X-VLM / EfficientVLM VQA layout: an answer decoder `text_decoder.*` beside the encoders."""
    return any(k.startswith("text_decoder.") for k in state)


def _xvlm_decoder_config(state: StateDict, head_dim: int, fusion_width: int) -> dict[str, Any]:
    """The answer decoder's sub-config from `text_decoder.bert.*` shapes (every layer cross-attends to the fusion
    output, so its cross-attention keys / values read the fusion width)."""
    split, heads, cross_heads, widths = _xvlm_bert_layers(state, _DECODER_PREFIX, head_dim)
    if split != 0:
        raise ValueError(f"{_DECODER_PREFIX}encoder.layer.0 has no crossattention: every layer of the VQA answer "
                         "decoder cross-attends to the fusion output")
    words = _require(state, f"{_DECODER_PREFIX}embeddings.word_embeddings.weight")
    head = state.get("text_decoder.cls.predictions.decoder.weight")
    if head is not None and not torch.equal(head, words):
        raise ValueError("text_decoder.cls.predictions.decoder.weight differs from text_decoder.bert.embeddings."
                         "word_embeddings.weight: X-VLM ties them and EfficientVLM's answer LM head is tied")
    return dict(
        hidden_size=words.shape[1], head_dim=head_dim, vocab_size=words.shape[0], num_hidden_layers=len(heads),
        num_attention_heads=heads, num_cross_attention_heads=cross_heads, intermediate_size=widths,
        encoder_hidden_size=fusion_width,
        max_position_embeddings=_require(state, f"{_DECODER_PREFIX}embeddings.position_embeddings.weight").shape[0],
        type_vocab_size=_require(state, f"{_DECODER_PREFIX}embeddings.token_type_embeddings.weight").shape[0],
    )


def _is_nlvr(state: StateDict) -> bool:
    """X-VLM / EfficientVLM NLVR2 layout: `cls_head` (fine-tuned) or `ta_head` (NLVR domain pre-training)."""
    return any(k.startswith(("cls_head.", "ta_head.")) for k in state)


def _check_shared_kv(state: StateDict, prefix: str, split: int, depth: int) -> None:
    """X-VLM's NLVR2 fusion: BERT layers split + 2l and split + 2l + 1 are the copies of fusion layer l and share
    their cross-attention key / value (`share_cross_attention`: both keys hold the one tensor)."""
    if (depth - split) % 2:
        raise ValueError(
            f"NLVR2 checkpoint with {depth - split} fusion layers (text_encoder.encoder.layer.{split}..{depth - 1}): "
            "X-VLM duplicates every fusion layer, so the count must be even"
        )
    layer = f"{prefix}encoder.layer."
    for first in range(split, depth, 2):
        for name in ("key", "value"):
            for param in ("weight", "bias"):
                a = state.get(f"{layer}{first}.crossattention.self.{name}.{param}")
                b = state.get(f"{layer}{first + 1}.crossattention.self.{name}.{param}")
                if (a is None) != (b is None) or (a is not None and not torch.equal(a, b)):
                    raise ValueError(
                        f"{layer}{first}/{first + 1}.crossattention.self.{name}.{param} differ, but the two copies of "
                        "an NLVR2 fusion layer share their cross-attention key / value: not an X-VLM NLVR2 checkpoint"
                    )


def _xvlm_target(key: str, prefix: str, num_text_layers: int) -> str | None:
    """EfficientVLM key for an X-VLM key, or None when the name has no counterpart."""
    if key.startswith("vision_encoder."):
        rest = key[len("vision_encoder.") :]
        fixed = {
            "class_embedding": "embeddings.class_embedding",
            "patch_embed.weight": "embeddings.patch_embedding.weight",
            "pos_embed.weight": "embeddings.position_embedding.weight",
        }
        if rest in fixed:
            return "vision_model." + fixed[rest]
        if rest.startswith(("pre_layrnorm.", "post_layernorm.", "encoder.layers.")):
            return "vision_model." + rest.removeprefix("encoder.")
        return None
    if key.startswith(prefix + "embeddings."):
        rest = key[len(prefix + "embeddings.") :]
        return f"text_model.embeddings.{rest}" if rest.split(".")[0] in _BERT_EMBEDDINGS else None
    if m := re.match(re.escape(prefix) + r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$", key):
        return _bert_layer_target(int(m.group(1)), m.group(2), m.group(3), num_text_layers)
    if key.startswith("text_encoder.cls.predictions."):
        rest = _MLM_NAMES.get(key[len("text_encoder.cls.predictions.") :])
        return None if rest is None else f"mlm_head.{rest}"
    if key.startswith(_DECODER_PREFIX + "embeddings."):
        rest = key[len(_DECODER_PREFIX + "embeddings.") :]
        return f"decoder_model.embeddings.{rest}" if rest.split(".")[0] in _BERT_EMBEDDINGS else None
    if m := re.match(re.escape(_DECODER_PREFIX) + r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$", key):
        name = _BERT_LAYER_NAMES.get(m.group(2))
        return None if name is None else f"decoder_model.layers.{m.group(1)}.{name}.{m.group(3)}"
    if key.startswith("text_decoder.cls.predictions."):
        rest = _MLM_NAMES.get(key[len("text_decoder.cls.predictions.") :])
        return None if rest is None else f"decoder_model.lm_head.{rest}"
    if key.startswith("cls_head."):  # X-VLM's NLVR2 build_mlp: the same Sequential indices {0, 1, 3}
        return "nlvr_head." + key[len("cls_head.") :]
    if key == "temp" or key.startswith(("vision_proj.", "text_proj.", "itm_head.", "bbox_head.")):
        return key  # bbox_head: X-VLM's box head (L_BBOX), same Sequential indices {0, 1, 3}
    return None


def _ignore_reason(key: str, state: StateDict) -> str | None:
    """Why an X-VLM key is deliberately dropped, or None when it must be converted."""
    for pattern, reason in _XVLM_IGNORED:
        if pattern.search(key):
            return reason
    for stack, target in (("text_encoder", "mlm_head.bias"), ("text_decoder", "decoder_model.lm_head.bias")):
        if key == f"{stack}.cls.predictions.decoder.bias":
            bias = state.get(f"{stack}.cls.predictions.bias")
            if bias is None or not torch.equal(bias, state[key]):
                raise ValueError(
                    f"{key} differs from {stack}.cls.predictions.bias: BERT ties them and EfficientVLM keeps one LM "
                    f"bias ({target})"
                )
            return f"tied to {stack}.cls.predictions.bias (→ {target})"
    return None


def _map_xvlm(
    state: StateDict, prefix: str, num_text_layers: int
) -> tuple[StateDict, dict[str, str], dict[str, str], list[str]]:
    """(target → tensor, target → source, ignored source → reason, unmappable source keys)."""
    mapped, sources, ignored, unknown = {}, {}, {}, []
    for key, tensor in state.items():
        reason = _ignore_reason(key, state)
        if reason is not None:
            ignored[key] = reason
            continue
        target = _xvlm_target(key, prefix, num_text_layers)
        if target is None:
            unknown.append(key)
            continue
        mapped[target] = tensor.reshape(()) if target == "temp" else tensor
        sources[target] = key
    return mapped, sources, ignored, unknown


def _build_xvlm_model(
    state: StateDict, head_dim: int, image_size: int | None
) -> tuple[EfficientVLMForImageTextRetrieval, str, int, StateDict, dict[str, str]]:
    """Config + mapping + exact load; returns (model, layout, source image size, mapped, ignored)."""
    prefix, layout = _xvlm_text_prefix(state)
    config = xvlm_config_from_state_dict(state, head_dim)
    source_size = config.vision_config.image_size
    mapped, sources, ignored, unknown = _map_xvlm(state, prefix, config.text_config.num_hidden_layers)
    if unknown:
        raise ValueError(
            f"cannot convert the checkpoint: unknown keys (not part of the X-VLM CLIP-ViT / EfficientVLM layout): "
            f"{sorted(unknown)}"
        )
    if image_size is not None and image_size != source_size:
        table = "vision_model.embeddings.position_embedding.weight"
        mapped[table] = interpolate_position_table(mapped[table], config.vision_config.patch_size, image_size)
        config.vision_config.image_size = image_size
        config.vision_config.validate()
    has_mlm = any(k.startswith("mlm_head.") for k in mapped)
    fresh = r"bbox_head\."  # a pre-training layout without one: fresh
    if config.fusion_encoder_config.shared_cross_kv:
        cls, layout = EfficientVLMForVisualReasoning, "nlvr2"
        fresh = r"vision_proj\.|text_proj\.|temp$|nlvr_head\."  # absent from NLVR2 layouts (unused by NLVR2)
    elif config.decoder_config is not None:
        cls, layout = EfficientVLMForQuestionAnswering, "vqa"
        fresh = r"vision_proj\.|text_proj\.|temp$"  # absent from X-VLM's VQA model (unused by VQA)
    else:
        cls = EfficientVLMForPreTraining if has_mlm else EfficientVLMForImageTextRetrieval
    model = cls(config)
    _load_exact(model, mapped, sources, re.compile(fresh))
    return model.eval(), layout, source_size, mapped, ignored


def convert_xvlm_checkpoint(
    path_or_state_dict: str | os.PathLike | StateDict,
    output_dir: str | os.PathLike | None = None,
    image_size: int | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    *,
    head_dim: int = 64,
    overwrite: bool = False,
    return_report: bool = False,
) -> EfficientVLMForImageTextRetrieval | tuple[EfficientVLMForImageTextRetrieval, ConversionReport]:
    """Converts an X-VLM (CLIP ViT) or official EfficientVLM checkpoint into an EfficientVLM model.

    Args:
        path_or_state_dict: a `.pth` file (dict with key `model`, or the state dict) or an in-memory state dict.
        output_dir: when given, writes a Hub-ready folder there (weights, config, remote code, processor) atomically.
        image_size: resolution of the converted model; the position table is interpolated bicubically (CLS row
            kept) when it differs from the checkpoint's. None keeps the checkpoint's.
        tokenizer_dir: a BERT tokenizer directory; with `output_dir`, an `EfficientVLMProcessor` is saved too.
        head_dim: attention head width of the checkpoint (64 for the released X-VLM / EfficientVLM models).
        overwrite: replace an existing non-empty `output_dir`.
        return_report: also return the `ConversionReport`.

    Returns:
        `EfficientVLMForPreTraining` when the checkpoint has an MLM head, `EfficientVLMForVisualReasoning` for an
        NLVR2 checkpoint (duplicated fusion layers with shared cross K/V, `cls_head` → `nlvr_head`; ITC projections
        absent there are initialised fresh), else `EfficientVLMForImageTextRetrieval`, in eval mode (and the report
        when `return_report`).

    Raises:
        ValueError: unknown keys, missing keys, shape mismatches, or a head_dim that does not divide a projection.
    """
    source = "<state dict>" if isinstance(path_or_state_dict, dict) else os.fspath(path_or_state_dict)
    state = load_xvlm_state_dict(path_or_state_dict)
    model, layout, source_size, mapped, ignored = _build_xvlm_model(state, head_dim, image_size)
    report = ConversionReport(
        source=source, layout=layout, model_class=type(model).__name__, source_image_size=source_size,
        image_size=model.config.vision_config.image_size, num_converted=len(mapped), ignored=ignored,
        gate_tensors={k: v for k, v in state.items() if k.startswith("l0_module.")},
    )
    logger.info(
        "converted %s (%s layout) into %s: %d tensors, %d ignored: %s",
        source, layout, report.model_class, len(mapped), len(ignored), sorted(ignored),
    )
    if output_dir is not None:
        save_converted(model, output_dir, tokenizer_dir, overwrite)
    return (model, report) if return_report else model


# --------------------------------------------------------------------------------------------------------------------
# Hub-ready folder
# --------------------------------------------------------------------------------------------------------------------


def _load_tokenizer(tokenizer_dir: str | os.PathLike):
    """A BERT tokenizer from a directory (tokenizer files, or just a `vocab.txt`)."""
    from transformers import AutoTokenizer, BertTokenizerFast

    if not os.path.isdir(tokenizer_dir):
        raise FileNotFoundError(f"tokenizer_dir {tokenizer_dir} is not a directory")
    if os.path.isfile(os.path.join(tokenizer_dir, "tokenizer_config.json")) or os.path.isfile(
        os.path.join(tokenizer_dir, "tokenizer.json")
    ):
        return AutoTokenizer.from_pretrained(tokenizer_dir)
    if os.path.isfile(os.path.join(tokenizer_dir, "vocab.txt")):
        return BertTokenizerFast.from_pretrained(tokenizer_dir)
    raise FileNotFoundError(f"tokenizer_dir {tokenizer_dir} has no tokenizer files nor a vocab.txt")


def save_converted(
    model: EfficientVLMForImageTextRetrieval,
    output_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> None:
    """Writes `model` (+ an `EfficientVLMProcessor` when `tokenizer_dir` is given) atomically: temp dir → rename.

    Raises:
        FileExistsError: `output_dir` exists and is not empty, and `overwrite` is False.
        ValueError: the tokenizer has more tokens than the model's vocabulary.
    """
    from modeling_efficientvlm.processing_efficientvlm import EfficientVLMProcessor, build_image_processor

    output_dir = os.path.abspath(os.fspath(output_dir))
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise FileExistsError(f"{output_dir} exists and is not empty; pass overwrite=True to replace it")
    processor = None
    if tokenizer_dir is not None:
        tokenizer = _load_tokenizer(tokenizer_dir)
        vocab = model.config.text_config.vocab_size
        if len(tokenizer) > vocab:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {vocab}")
        image_processor = build_image_processor(model.config.vision_config.image_size)
        processor = EfficientVLMProcessor(image_processor=image_processor, tokenizer=tokenizer)
    with atomic_directory(output_dir, prefix=".convert-") as tmp:
        model.save_pretrained(tmp)
        if processor is not None:
            processor.save_pretrained(tmp)


# --------------------------------------------------------------------------------------------------------------------
# CLIP / ViT + BERT initialisation
# --------------------------------------------------------------------------------------------------------------------


def _auto_load(path: str | os.PathLike, role: str) -> nn.Module:
    """Loads a local transformers model directory for the `vision` or `text` role (no downloads)."""
    from transformers import AutoConfig, BertForMaskedLM, BertModel, CLIPModel, CLIPVisionModel, ViTModel

    if not os.path.isdir(path):
        raise FileNotFoundError(f"{role}_model {path} is not a local model directory")
    config = AutoConfig.from_pretrained(path)
    kind = config.model_type
    if role == "vision" and kind in ("clip", "clip_vision_model"):
        # a full CLIP directory loads as CLIPModel (its vision tower is taken), so no weights are reported unused
        return (CLIPModel if kind == "clip" else CLIPVisionModel).from_pretrained(path)
    if role == "vision" and kind == "vit":
        return ViTModel.from_pretrained(path)  # the pooler, if any, is skipped by the mapping
    if role == "text" and kind == "bert":
        mlm = any(a in ("BertForMaskedLM", "BertForPreTraining") for a in (config.architectures or []))
        return (BertForMaskedLM if mlm else BertModel).from_pretrained(path)
    expected = "clip / clip_vision_model / vit" if role == "vision" else "bert"
    raise ValueError(f"{role}_model {path} has model_type {kind!r}; expected {expected}")


def _vision_parts(model: nn.Module) -> tuple[StateDict, Any, str]:
    """(vision tower state dict, its config, "clip" or "vit") of a CLIPModel / CLIPVisionModel / ViTModel."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind == "clip":
        return model.vision_model.state_dict(), config.vision_config, "clip"
    if kind == "clip_vision_model":
        tower = getattr(model, "vision_model", model)  # transformers < 5 nests the tower one level deeper
        return tower.state_dict(), config, "clip"
    if kind == "vit":
        tower = getattr(model, "vit", model)  # ViTForImageClassification etc.
        return tower.state_dict(), config, "vit"
    raise ValueError(f"vision_model must be a CLIPModel, CLIPVisionModel or ViTModel, got {type(model).__name__}")


def _vision_config_from(config: Any, kind: str) -> dict[str, Any]:
    heads = config.num_attention_heads
    if config.hidden_size % heads:
        raise ValueError(f"vision hidden_size {config.hidden_size} is not divisible by {heads} heads")
    out = dict(
        image_size=config.image_size, patch_size=config.patch_size, num_channels=config.num_channels,
        hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers, num_attention_heads=heads,
        head_dim=config.hidden_size // heads, intermediate_size=config.intermediate_size,
        hidden_act=config.hidden_act, layer_norm_eps=config.layer_norm_eps,
        attention_dropout=getattr(config, "attention_dropout", getattr(config, "attention_probs_dropout_prob", 0.0)),
    )
    if kind == "vit":
        out["use_pre_layernorm"] = False  # ViT has no LayerNorm between the embeddings and the first layer
    return out


def _map_clip_vision(state: StateDict) -> StateDict:
    mapped = {}
    for key, tensor in state.items():
        if key.endswith("position_ids"):
            continue
        mapped["vision_model." + key.replace("encoder.layers.", "layers.", 1)] = tensor
    return mapped


def _map_vit_vision(state: StateDict) -> StateDict:
    """ViT → EfficientVLM vision keys; the patch-conv bias is folded into the patch rows of the position table."""
    mapped = {}
    for key, tensor in state.items():
        if key.startswith("pooler.") or key in ("embeddings.mask_token",) or key.endswith("position_ids"):
            continue
        if key == "embeddings.cls_token":
            mapped["vision_model.embeddings.class_embedding"] = tensor.reshape(-1)
        elif key == "embeddings.position_embeddings":
            mapped["vision_model.embeddings.position_embedding.weight"] = tensor.reshape(-1, tensor.shape[-1])
        elif key == "embeddings.patch_embeddings.projection.weight":
            mapped["vision_model.embeddings.patch_embedding.weight"] = tensor
        elif key.startswith("layernorm."):
            mapped["vision_model.post_layernorm." + key.split(".", 1)[1]] = tensor
        elif m := re.match(r"(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$", key):
            name = _VIT_LAYER_NAMES.get(m.group(2))
            mapped[f"vision_model.layers.{m.group(1)}.{name}.{m.group(3)}" if name else f"<vit>.{key}"] = tensor
        elif key != "embeddings.patch_embeddings.projection.bias":
            mapped[f"<vit>.{key}"] = tensor  # unknown: reported by _load_exact
    bias = state.get("embeddings.patch_embeddings.projection.bias")
    table = "vision_model.embeddings.position_embedding.weight"
    if bias is not None and table in mapped:
        # conv(x) + b + pos_i == conv_nobias(x) + (pos_i + b) for every patch token i ≥ 1; the CLS row has no conv
        folded = mapped[table].clone()
        folded[1:] += bias
        mapped[table] = folded
    return mapped


def _text_parts(model: nn.Module) -> tuple[StateDict, StateDict | None, Any]:
    """(BERT encoder state dict, MLM head state dict or None, BERT config) of a BertModel / BertForMaskedLM."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "bert":
        raise ValueError(f"text_model must be a BertModel or BertForMaskedLM, got {type(model).__name__}")
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"text_model uses position_embedding_type={config.position_embedding_type!r}; need 'absolute'")
    bert = getattr(model, "bert", model)
    head = getattr(getattr(model, "cls", None), "predictions", None)
    return bert.state_dict(), None if head is None else head.state_dict(), config


def _text_configs(config: Any, num_text_layers: int) -> tuple[dict[str, Any], dict[str, Any]]:
    heads = config.num_attention_heads
    if config.hidden_size % heads:
        raise ValueError(f"text hidden_size {config.hidden_size} is not divisible by {heads} heads")
    if not 0 <= num_text_layers <= config.num_hidden_layers:
        raise ValueError(f"num_text_layers must be in [0, {config.num_hidden_layers}], got {num_text_layers}")
    shared = dict(
        vocab_size=config.vocab_size, max_position_embeddings=config.max_position_embeddings,
        type_vocab_size=config.type_vocab_size, hidden_size=config.hidden_size, num_attention_heads=heads,
        head_dim=config.hidden_size // heads, intermediate_size=config.intermediate_size,
        hidden_act=config.hidden_act, layer_norm_eps=config.layer_norm_eps,
        hidden_dropout_prob=config.hidden_dropout_prob,
        attention_probs_dropout_prob=config.attention_probs_dropout_prob,
        initializer_range=config.initializer_range, pad_token_id=config.pad_token_id or 0,
    )
    text = dict(shared, num_hidden_layers=num_text_layers)
    fusion = dict(
        shared, num_hidden_layers=config.num_hidden_layers - num_text_layers, num_cross_attention_heads=heads
    )
    return text, fusion


def _map_bert(encoder: StateDict, head: StateDict | None, num_text_layers: int) -> StateDict:
    mapped = {}
    for key, tensor in encoder.items():
        if key.startswith("pooler.") or key.endswith("position_ids"):
            continue
        target = None
        if key.startswith("embeddings.") and key.split(".")[1] in _BERT_EMBEDDINGS:
            target = "text_model." + key
        elif m := re.match(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$", key):
            target = _bert_layer_target(int(m.group(1)), m.group(2), m.group(3), num_text_layers)
        mapped[target or f"<bert>.{key}"] = tensor
    for key, tensor in (head or {}).items():
        if key == "decoder.bias":
            continue  # tied to `bias` in transformers' BERT
        mapped[f"mlm_head.{_MLM_NAMES.get(key, '<unknown>.' + key)}"] = tensor
    return mapped


def _merge_overrides(vision: dict, text: dict, fusion: dict, overrides: dict[str, Any]) -> dict[str, Any]:
    """EfficientVLMConfig kwargs: derived sub-configs updated by `vision_config=` / `text_config=` / … overrides."""
    subs = {"vision_config": vision, "text_config": text, "fusion_encoder_config": fusion}
    for name, derived in subs.items():
        extra = overrides.pop(name, None) or {}
        if not isinstance(extra, dict):
            raise ValueError(f"config override {name} must be a dict of fields to change, got {type(extra).__name__}")
        derived.update(extra)
    return {**subs, **overrides}


def _vit_supported() -> bool:
    """Whether this EfficientVLMVisionConfig knows `use_pre_layernorm` (needed to skip the pre-LN for ViT)."""
    return hasattr(EfficientVLMVisionConfig(num_hidden_layers=0), "use_pre_layernorm")


def from_vision_text_pretrained(
    vision_model: nn.Module | str | os.PathLike,
    text_model: nn.Module | str | os.PathLike,
    num_text_layers: int | None = None,
    **config_overrides: Any,
) -> EfficientVLMForPreTraining:
    """A new EfficientVLM initialised from a pretrained vision tower and a pretrained BERT (X-VLM's initialisation).

    Args:
        vision_model: a CLIPModel / CLIPVisionModel / ViTModel, or a local directory holding one.
        text_model: a BertModel / BertForMaskedLM (its MLM head is copied), or a local directory.
        num_text_layers: BERT layers for the text encoder (the rest become fusion layers, whose self-attention and
            FFN are copied and cross-attention freshly initialised); default half the BERT depth.
        **config_overrides: EfficientVLMConfig fields (e.g. `embed_dim=256`); `vision_config=` / `text_config=` /
            `fusion_encoder_config=` dicts update the derived sub-configs (a different `image_size` interpolates the
            position table; other shape changes raise).

    Returns:
        `EfficientVLMForPreTraining` in eval mode; ITC projections, temperature, ITM and box heads (and the MLM
        head when the text model has none) freshly initialised.

    Raises:
        ValueError: unsupported model types, unknown / missing keys, shape mismatches, or a ViT while the config has
            no `vision_config.use_pre_layernorm` field.
    """
    vision_model = _auto_load(vision_model, "vision") if isinstance(vision_model, (str, os.PathLike)) else vision_model
    text_model = _auto_load(text_model, "text") if isinstance(text_model, (str, os.PathLike)) else text_model
    vision_state, vision_hf, kind = _vision_parts(vision_model)
    encoder_state, head_state, text_hf = _text_parts(text_model)
    if kind == "vit" and not _vit_supported():
        raise ValueError(
            "ViT has no pre-LayerNorm, but EfficientVLMVisionConfig has no `use_pre_layernorm` field to disable it; "
            "use a CLIP vision tower, or an EfficientVLM version with that field"
        )
    n_text = text_hf.num_hidden_layers // 2 if num_text_layers is None else num_text_layers
    text_cfg, fusion_cfg = _text_configs(text_hf, n_text)
    vision_cfg = _vision_config_from(vision_hf, kind)
    source_size = vision_cfg["image_size"]
    config = EfficientVLMConfig(**_merge_overrides(vision_cfg, text_cfg, fusion_cfg, dict(config_overrides)))
    mapped = _map_clip_vision(vision_state) if kind == "clip" else _map_vit_vision(vision_state)
    mapped.update(_map_bert(encoder_state, head_state, n_text))
    if config.vision_config.image_size != source_size:
        table = "vision_model.embeddings.position_embedding.weight"
        new_size = config.vision_config.image_size
        mapped[table] = interpolate_position_table(mapped[table], vision_cfg["patch_size"], new_size)
    cross = r"fusion_model\.layers\.\d+\.(cross_attn|layer_norm_cross)\."
    fresh = [r"vision_proj\.", r"text_proj\.", r"temp$", r"itm_head\.", r"bbox_head\.", cross]
    if head_state is None:
        fresh.append(r"mlm_head\.")
    if kind == "vit":
        fresh.append(r"vision_model\.pre_layrnorm\.")  # present only if the model keeps an (unused) module
    model = EfficientVLMForPreTraining(config)
    initialised = _load_exact(model, mapped, {}, re.compile("|".join(fresh)))
    logger.info("initialised from %s + %s; fresh parameters: %s", kind, type(text_model).__name__, initialised)
    return model.eval()
