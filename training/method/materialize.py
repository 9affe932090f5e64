"""Materialize: turn pruning masks into a physically smaller dense model (a new object; the input is untouched).

binarize masks → fold the kept units' mask values into the weights → kept indices per layer → config with per-layer
sizes (0 = removed sub-layer) → fresh model → copy sliced weights → verify masked forward ≈ materialized forward.

Hidden-dimension masks (`PruningMasks.vision.hidden` / `.text.hidden`, binary) shrink a residual stream: the config's
widths, every embedding / LayerNorm / output row writing into the stream and every input column reading from it
(`HIDDEN_SLICES`). The text stream is the text AND fusion encoders' (the fusion encoder continues it).
"""

from __future__ import annotations

import copy
import re

import torch

from modeling_efficientvlm import EncoderPruningMasks, PruningMasks
from modeling_efficientvlm.modeling_efficientvlm import head_width, stream_mask

from .structure import ENCODER_CONFIG_KEYS, ENCODER_MODULES, STREAMS, modalities, unit_kinds


def _kept(mask: torch.Tensor | None, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept indices and their scales (mask values) for one sub-layer; None = keep all with scale 1."""
    if mask is None:
        return torch.arange(size), torch.ones(size)
    mask = mask.detach().float().cpu()
    if mask.shape != (size,):
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not match the sub-layer's {size} units")
    keep = torch.nonzero(mask != 0).flatten()
    return keep, mask[keep]


def _slice_attention(state: dict, prefix: str, keep: torch.Tensor, scale: torch.Tensor, head_dim: int) -> None:
    """Keeps heads `keep` of the attention at `prefix`; folds each head's scale into its out_proj columns."""
    rows = (keep[:, None] * head_dim + torch.arange(head_dim)).flatten()  # (kept * head_dim,)
    for proj in ("q_proj", "k_proj", "v_proj"):
        state[f"{prefix}.{proj}.weight"] = state[f"{prefix}.{proj}.weight"][rows]
        state[f"{prefix}.{proj}.bias"] = state[f"{prefix}.{proj}.bias"][rows]
    out = state[f"{prefix}.out_proj.weight"][:, rows]
    state[f"{prefix}.out_proj.weight"] = out * scale.repeat_interleave(head_dim).to(out.dtype)


def _slice_mlp(state: dict, prefix: str, keep: torch.Tensor, scale: torch.Tensor) -> None:
    """Keeps FFN neurons `keep`; folds each neuron's scale into its fc2 column."""
    state[f"{prefix}.fc1.weight"] = state[f"{prefix}.fc1.weight"][keep]
    state[f"{prefix}.fc1.bias"] = state[f"{prefix}.fc1.bias"][keep]
    fc2 = state[f"{prefix}.fc2.weight"][:, keep]
    state[f"{prefix}.fc2.weight"] = fc2 * scale.to(fc2.dtype)


def _drop_prefix(state: dict, prefixes: tuple[str, ...]) -> None:
    for name in [n for n in state if n.startswith(prefixes)]:
        del state[name]


def _check_shared_pairs(sub, layer_masks: list[torch.Tensor | None] | None) -> None:
    """An NLVR2 pair (`shared_cross_kv`) shares its K/V heads, so both copies must keep the same cross heads (their
    scales may differ: they fold into each copy's own out_proj)."""
    if not getattr(sub, "shared_cross_kv", False) or layer_masks is None:
        return
    for even in range(0, sub.num_hidden_layers, 2):
        size = sub.num_cross_attention_heads[even]
        if size and not torch.equal(_kept(layer_masks[even], size)[0], _kept(layer_masks[even + 1], size)[0]):
            raise ValueError(
                f"fusion cross-head masks of layers {even} and {even + 1} keep different heads, but the pair shares "
                "its cross-attention keys / values (shared_cross_kv): give both copies the same kept heads (the L0 "
                "module ties their gates)"
            )


def _prune_encoder(state: dict, config, modality: str, masks: EncoderPruningMasks | None) -> None:
    """Slices one encoder's layers in `state` (sizes of the original `config`).

    The K/V of an NLVR2 pair appear under both copies' names (one tensor); each name is sliced with the same kept
    heads, and loading both names into the pruned model's one shared module writes the same values."""
    sub = getattr(config, ENCODER_CONFIG_KEYS[modality])
    module = ENCODER_MODULES[modality]
    for kind in unit_kinds(modality):
        layer_masks = getattr(masks, kind.name) if masks is not None else None
        if kind.name == "cross_head":
            _check_shared_pairs(sub, layer_masks)
        for layer, size in enumerate(getattr(sub, kind.config_field)):
            if size == 0:
                continue
            keep, scale = _kept(None if layer_masks is None else layer_masks[layer], size)
            prefix = f"{module}.layers.{layer}.{kind.module}"
            if len(keep) == 0:  # removed sub-layer: no parameters at all, not even its LayerNorm
                _drop_prefix(state, (prefix + ".", f"{module}.layers.{layer}.{kind.norm}."))
            elif kind.name == "ffn":
                _slice_mlp(state, prefix, keep, scale)
            else:
                _slice_attention(state, prefix, keep, scale, sub.head_dim)


HIDDEN_CLASSES = ("EfficientVLMModel", "EfficientVLMForImageTextRetrieval", "EfficientVLMForVisualReasoning")
"""Model classes whose hidden dimensions `materialize` can shrink (their heads are the ones `HIDDEN_SLICES` covers)."""
HIDDEN_STREAM_CONFIGS = {
    stream: tuple(ENCODER_CONFIG_KEYS[m] for m, s in STREAMS.items() if s == stream) for stream in ("vision", "text")
}
"""Sub-configs whose `hidden_size` is a stream's width (the fusion encoder continues the text stream)."""
HIDDEN_SLICES = (
    # (stream, state-dict name pattern, dim of the stream's channels): outputs into the stream are rows / dim 0,
    # inputs read from it are columns / dim 1
    ("vision", r"vision_model\.embeddings\.(class_embedding|patch_embedding\.weight)", 0),
    ("vision", r"vision_model\.embeddings\.position_embedding\.weight", 1),
    ("vision", r"vision_model\.(pre_layrnorm|post_layernorm)\.(weight|bias)", 0),
    ("vision", r"vision_model\.layers\.\d+\.(layer_norm\w*|self_attn\.out_proj|mlp\.fc2)\.(weight|bias)", 0),
    ("vision", r"vision_model\.layers\.\d+\.(self_attn\.[qkv]_proj|mlp\.fc1)\.weight", 1),
    ("vision", r"fusion_model\.layers\.\d+\.cross_attn\.[kv]_proj\.weight", 1),  # cross K/V read image tokens
    ("vision", r"vision_proj\.weight", 1),
    ("text", r"text_model\.embeddings\.(word|position|token_type)_embeddings\.weight", 1),
    ("text", r"text_model\.embeddings\.LayerNorm\.(weight|bias)", 0),
    ("text", r"(text|fusion)_model\.layers\.\d+\.(layer_norm\w*|(self|cross)_attn\.out_proj|mlp\.fc2)\.\w+", 0),
    ("text", r"(text|fusion)_model\.layers\.\d+\.(self_attn\.[qkv]_proj|cross_attn\.q_proj|mlp\.fc1)\.weight", 1),
    ("text", r"(text_proj|itm_head\.0|nlvr_head\.0)\.weight", 1),
)
"""Every tensor of the `HIDDEN_CLASSES` with a residual-stream dimension, and which dimension that is."""


def hidden_keep(config, masks: PruningMasks, binary: bool = False) -> dict[str, torch.Tensor]:
    """Kept channel indices {stream: (kept,)} of the streams ("vision", "text") that have a hidden mask.

    Raises:
        ValueError: `fusion.hidden` / `decoder.hidden` set, a mask of the wrong shape, a stream with no channel left,
            or (`binary`) a mask value other than 0 / 1.
    """
    out = {}
    for stream, keys in HIDDEN_STREAM_CONFIGS.items():
        # the model's own check: no fusion / decoder mask, one value per channel
        mask = stream_mask(masks, stream, getattr(config, keys[0]).hidden_size)
        if mask is None:
            continue
        mask = mask.detach().float().cpu()
        if binary and not bool(((mask == 0) | (mask == 1)).all()):
            odd = sorted({float(v) for v in mask[(mask != 0) & (mask != 1)][:5]})
            raise ValueError(
                f"pruning_masks.{stream}.hidden must be binary (1 = keep channel, 0 = prune) to materialize: a channel "
                f"scale cannot be folded into the weights (LN_h scales after normalising); got values such as {odd}"
            )
        keep = torch.nonzero(mask != 0).flatten()
        if keep.numel() == 0:
            raise ValueError(f"pruning_masks.{stream}.hidden keeps no channel: a stream needs at least one")
        out[stream] = keep
    return out


def _slice_hidden(state: dict, keep: dict[str, torch.Tensor]) -> None:
    """Keeps channels `keep[stream]` of every tensor `HIDDEN_SLICES` lists (in place, on the unit-sliced state)."""
    for name in list(state):
        for stream, pattern, dim in HIDDEN_SLICES:
            if stream in keep and re.fullmatch(pattern, name):
                state[name] = state[name].index_select(dim, keep[stream].to(state[name].device))
                break


def pruned_config(config, masks: PruningMasks):
    """The config a materialization with `masks` produces (kept units per layer; with hidden masks the kept stream
    widths, the original task-head width kept as `head_hidden_size`), without touching weights."""
    config = copy.deepcopy(config)
    for modality in modalities(config):  # the encoders (+ the VQA answer decoder)
        sub = getattr(config, ENCODER_CONFIG_KEYS[modality])
        encoder_masks = getattr(masks, modality)
        for kind in unit_kinds(modality):
            if encoder_masks is None or getattr(encoder_masks, kind.name) is None:
                continue
            sizes = list(getattr(sub, kind.config_field))
            for layer, mask in enumerate(getattr(encoder_masks, kind.name)):
                if mask is not None and sizes[layer]:
                    sizes[layer] = int((mask != 0).sum())
            setattr(sub, kind.config_field, sizes)
        sub.validate()
    for stream, kept in hidden_keep(config, masks).items():
        set_stream_width(config, stream, len(kept))
    config.validate()
    return config


def set_stream_width(config, stream: str, width: int) -> None:
    """Sets residual stream `stream`'s width in `config` (in place): the `hidden_size` of every encoder on it, the
    fusion cross-attention's `encoder_hidden_size` for the vision stream; a narrower text stream pins the task heads'
    inner width (`head_hidden_size`) to what it was."""
    if stream == "text" and width < config.text_config.hidden_size:
        config.head_hidden_size = head_width(config)
    for key in HIDDEN_STREAM_CONFIGS[stream]:
        getattr(config, key).hidden_size = width
    if stream == "vision":
        config.fusion_encoder_config.encoder_hidden_size = width  # cross K/V read the vision stream


@torch.no_grad()
def materialize(model, masks: PruningMasks, verify: bool = True, atol: float = 1e-4) -> torch.nn.Module:
    """Returns a new, physically smaller model equivalent to `model` run with `masks`.

    Args:
        model: an EfficientVLM model (any head class); left unchanged.
        masks: the pruning masks (binary, or with scales for kept units that get folded into the weights); hidden
            masks (`vision.hidden`, `text.hidden`) must be binary and need one of `HIDDEN_CLASSES`.
        verify: run masked and materialized forwards on random inputs and raise if they differ by more than `atol`.
        atol: tolerance of the verification (float32: differences are ~1e-6).

    Returns:
        A fresh model of the same class whose config lists the kept sizes per layer (0 = removed sub-layer).
    """
    keep = hidden_keep(model.config, masks, binary=True)
    if keep and type(model).__name__ not in HIDDEN_CLASSES:
        raise ValueError(
            f"hidden-dimension masks can be materialized for {', '.join(HIDDEN_CLASSES)}, not {type(model).__name__} "
            "(its other heads / answer decoder read the text stream); drop pruning_masks.vision.hidden / .text.hidden"
        )
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for modality in modalities(model.config):
        _prune_encoder(state, model.config, modality, getattr(masks, modality))
    _slice_hidden(state, keep)
    config = pruned_config(model.config, masks)
    pruned = type(model)._from_config(config, attn_implementation=model.config._attn_implementation or "sdpa")
    if getattr(model, "generation_config", None) is not None:  # decoding settings (end token, beams) travel along
        pruned.generation_config = copy.deepcopy(model.generation_config)
    pruned = pruned.to(dtype=next(model.parameters()).dtype, device=next(model.parameters()).device)
    missing, unexpected = pruned.load_state_dict(state, strict=False)
    tied = set(getattr(pruned, "_tied_weights_keys", None) or {})
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"materialize produced mismatched weights: missing={missing}, unexpected={unexpected}")
    if hasattr(pruned, "tie_weights"):
        pruned.tie_weights()
    pruned.eval()
    if verify:
        error = materialization_error(model, pruned, masks)
        if error > atol:
            raise RuntimeError(f"materialized model differs from the masked model by {error:.3g} (> atol {atol})")
    return pruned


@torch.no_grad()
def materialization_error(model, pruned, masks: PruningMasks, *, batch: int = 2, length: int = 9,
                          seed: int = 0) -> float:
    """Max |masked − materialized| over image tokens, text tokens and fused tokens (masked: at the kept channels of a
    hidden-pruned stream), ITC embeddings, the ITM / NLVR2 head's logits, on random inputs (and, for a VQA model, the
    answer decoder's output and LM logits on random answers cross-attending to the fused tokens)."""
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    vision = model.config.vision_config
    device = next(model.parameters()).device
    pixels = torch.randn(batch, vision.num_channels, vision.image_size, vision.image_size, generator=g).to(device)
    vocab = model.config.text_config.vocab_size
    ids = torch.randint(0, vocab, (batch, length), generator=g).to(device)
    attention = torch.ones_like(ids)
    attention[0, -3:] = 0
    errors = []
    outs = []
    paired = getattr(model.config.fusion_encoder_config, "shared_cross_kv", False)
    keep = hidden_keep(model.config, masks)
    for net, net_masks in ((model, masks), (pruned, None)):
        kept = keep if net is model else {}  # the pruned model's streams hold the kept channels only

        def channels(x: torch.Tensor, stream: str) -> torch.Tensor:
            return x.index_select(-1, kept[stream].to(x.device)) if stream in kept else x

        image = net.encode_image(pixels, net_masks).last_hidden_state
        text = net.encode_text(ids, attention, net_masks).last_hidden_state
        images = (image, image.flip(0)) if paired else image  # NLVR2: the two copies read different images
        fused = net.fuse(text, attention, images, net_masks).last_hidden_state
        heads = tuple(getattr(net, h)(fused[:, 0]) for h in ("itm_head", "nlvr_head") if hasattr(net, h))
        outs.append((channels(image, "vision"), channels(text, "text"), channels(fused, "text"),
                     net.image_itc_embeds(image), net.text_itc_embeds(text), *heads))
        if "decoder" in modalities(model.config):  # answers (shorter, one padded) reading the fused question tokens
            answers = ids[:, : max(length // 2, 2)]
            answer_mask = torch.ones_like(answers)
            answer_mask[-1, -1] = 0
            logits, decoded = net.decode(answers, answer_mask, fused, attention, pruning_masks=net_masks)
            outs[-1] += (decoded.last_hidden_state, logits)
    for a, b in zip(*outs):
        errors.append((a - b).abs().max().item())
    model.train(was_training)
    return max(errors)
