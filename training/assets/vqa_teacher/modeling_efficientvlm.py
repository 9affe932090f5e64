"""EfficientVLM models: a CLIP-style ViT, a BERT text encoder and a BERT fusion encoder with cross-attention.

Reading order: outputs and masks → attention / MLP / layer → encoders → PreTrainedModel → models with heads.

One layer class (`EfficientVLMLayer`) serves the dense teacher, the gated student and the physically pruned model:
every block takes explicit sizes from the config (heads and FFN width per layer, 0 = sub-layer removed). Pruning masks
are one optional typed argument (`PruningMasks`) applied at documented points:
  * head mask: scales each head's context vector before the output projection;
  * FFN mask: scales the FFN activations after the nonlinearity;
  * hidden mask (CoFi's hidden dimension) h of a residual stream (vision; text + fusion): every write into the stream
    is multiplied by h and every LayerNorm on it is `_masked_layer_norm` (statistics over the kept channels only), so
    pruned channels are exactly 0 everywhere and every Linear reading the stream can drop those input columns.
A sub-layer with no heads / no FFN neurons (by config, or because its mask is all zeros) is an exact identity.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Cache, DynamicCache, GenerationConfig, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import DynamicLayer
from transformers.activations import ACT2FN
from transformers.utils import ModelOutput

from .configuration_efficientvlm import (
    EfficientVLMConfig,
    EfficientVLMDecoderConfig,
    EfficientVLMFusionConfig,
    EfficientVLMTextConfig,
    EfficientVLMVisionConfig,
    decoder_config_from_fusion,
)

# --------------------------------------------------------------------------------------------------------------------
# Outputs and masks
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class EfficientVLMEncoderOutput(ModelOutput):
    """Output of one encoder.

    Args:
        last_hidden_state: (B, T, D) final tokens (vision: after the post-LayerNorm).
        hidden_states: embeddings output + each layer's output, each (B, T, D), when asked.
        attentions: self-attention probabilities per layer, each (B, H_l, T, T) (None for a removed sub-layer).
        cross_attentions: fusion only: cross-attention probabilities per layer, each (B, H_l, T, N_image).
    """

    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor | None, ...] | None = None
    cross_attentions: tuple[torch.Tensor | None, ...] | None = None


@dataclass
class EfficientVLMOutput(ModelOutput):
    """Output of the EfficientVLM models.

    Args:
        loss: sum of the computed losses when labels are given (see each model).
        logits_per_image: (B_img, B_txt) ITC similarities scaled by 1 / temperature.
        logits_per_text: (B_txt, B_img), the transpose.
        image_embeds: (B_img, embed_dim) L2-normalised ITC image embeddings.
        text_embeds: (B_txt, embed_dim) L2-normalised ITC text embeddings.
        itm_logits: (N_pairs, 2) ITM logits for the fused pairs (index 1 = match).
        mlm_logits: (B, T, vocab) MLM logits (pre-training model, when `mlm_input_ids` is given).
        vision_model_output / text_model_output / fusion_model_output: per-encoder outputs (hidden states and
            attention probabilities for distillation).
    """

    loss: torch.Tensor | None = None
    logits_per_image: torch.Tensor | None = None
    logits_per_text: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    itm_logits: torch.Tensor | None = None
    mlm_logits: torch.Tensor | None = None
    vision_model_output: EfficientVLMEncoderOutput | None = None
    text_model_output: EfficientVLMEncoderOutput | None = None
    fusion_model_output: EfficientVLMEncoderOutput | None = None


@dataclass
class EncoderPruningMasks:
    """Masks of one encoder: lists indexed by layer; an entry (or the whole list) may be None = keep all.

    Args:
        head: per layer, (num_attention_heads[l],) scales for the self-attention heads.
        cross_head: fusion only: per layer, (num_cross_attention_heads[l],) scales for the cross-attention heads.
        ffn: per layer, (intermediate_size[l],) scales for the FFN neurons.
        hidden: (hidden_size,) scales for the channels of the encoder's residual stream (None = keep all). Read only
            on `PruningMasks.vision` (vision stream) and `PruningMasks.text` (the text stream, which the fusion
            encoder continues: it reads `text.hidden` too); `fusion.hidden` / `decoder.hidden` raise ValueError.
    """

    head: list[torch.Tensor | None] | None = None
    cross_head: list[torch.Tensor | None] | None = None
    ffn: list[torch.Tensor | None] | None = None
    hidden: torch.Tensor | None = None

    def layer(self, index: int) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        pick = lambda masks: None if masks is None else masks[index]  # noqa: E731
        return pick(self.head), pick(self.cross_head), pick(self.ffn)


@dataclass
class PruningMasks:
    """The `pruning_masks` argument of every EfficientVLM forward: one `EncoderPruningMasks` per encoder (and the
    VQA answer decoder's, read only by `EfficientVLMForQuestionAnswering`)."""

    vision: EncoderPruningMasks = field(default_factory=EncoderPruningMasks)
    text: EncoderPruningMasks = field(default_factory=EncoderPruningMasks)
    fusion: EncoderPruningMasks = field(default_factory=EncoderPruningMasks)
    decoder: EncoderPruningMasks = field(default_factory=EncoderPruningMasks)


@dataclass
class CrossAttentionKeyValues:
    """One fusion layer's cross-attention keys and values of image tokens, already projected: (B, H, S, Dh) each."""

    key: torch.Tensor
    value: torch.Tensor


@dataclass
class ImageKeyValueCache:
    """The image side of the fusion encoder, projected once (`EfficientVLMModel.image_key_value_cache`): per fusion
    layer the cross-attention keys and values of G images, (G, H, S, Dh) each (None where a layer has no
    cross-attention). `fuse` accepts it in place of image tokens after `select` has matched it to the text batch, so
    an image re-scored against many texts is projected to K/V once per layer instead of once per pair."""

    layers: list[CrossAttentionKeyValues | None]

    def __len__(self) -> int:
        """G, the number of images (0 when no layer has cross-attention)."""
        return next((kv.key.shape[0] for kv in self.layers if kv is not None), 0)

    def select(self, index: torch.Tensor) -> ImageKeyValueCache:
        """The cache of a text batch whose row b reads image `index[b]` ((B,) long); a broadcast view (no copy) when
        every row reads the same image, the cache itself when row b reads image b."""
        one = bool((index == index[0]).all())
        identity = index.numel() == len(self) and torch.equal(index, torch.arange(len(self), device=index.device))

        def rows(x: torch.Tensor) -> torch.Tensor:
            if identity:
                return x
            return x[index[:1]].expand(index.numel(), *x.shape[1:]) if one else x.index_select(0, index)

        return ImageKeyValueCache(
            [None if kv is None else CrossAttentionKeyValues(rows(kv.key), rows(kv.value)) for kv in self.layers]
        )


def _removed(num_units: int, mask: torch.Tensor | None) -> bool:
    """A sub-layer is removed when it has no units, or when every unit's mask is exactly zero."""
    return num_units == 0 or (mask is not None and not bool(mask.any()))


def stream_mask(pruning_masks: PruningMasks | None, stream: str, width: int) -> torch.Tensor | None:
    """The hidden mask (width,) of residual stream `stream` ("vision" / "text"), or None; checks its shape and that
    no encoder without a stream of its own (fusion, decoder) carries one."""
    if pruning_masks is None:
        return None
    for name in ("fusion", "decoder"):
        if getattr(pruning_masks, name).hidden is not None:
            raise ValueError(
                f"pruning_masks.{name}.hidden must be None: the {name} stream has no hidden mask of its own (the "
                "fusion encoder continues the text stream and reads pruning_masks.text.hidden; the VQA answer "
                "decoder's stream is not gated)"
            )
    mask = getattr(pruning_masks, stream).hidden
    if mask is not None and tuple(mask.shape) != (width,):
        raise ValueError(
            f"pruning_masks.{stream}.hidden has shape {tuple(mask.shape)}, but the {stream} stream has {width} "
            f"channels: give one value per channel, shape ({width},)"
        )
    return mask


def _masked_layer_norm(x: torch.Tensor, norm: nn.LayerNorm, mask: torch.Tensor | None) -> torch.Tensor:
    """LN_h(x): LayerNorm over the channels where `mask` != 0 only (their weight / bias), pruned channels 0, then
    scaled by `mask` (soft in training). Equals the LayerNorm of a model whose pruned channels were removed.

    Args:
        x: (..., D) stream tokens; norm: a LayerNorm of width D; mask: (D,) or None (plain `norm(x)`).
    """
    if mask is None:
        return norm(x)
    mask = mask.to(x.dtype)
    keep = torch.nonzero(mask).flatten()  # (K,): the same LayerNorm call as the materialized model's
    if keep.numel() == 0:  # a training sample that closed every channel: the stream is all zeros
        return x.new_zeros(x.shape) * mask
    kept = F.layer_norm(x.index_select(-1, keep), (keep.numel(),), norm.weight[keep], norm.bias[keep], norm.eps)
    return x.new_zeros(x.shape).index_copy(x.dim() - 1, keep, kept) * mask


# --------------------------------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------------------------------


class EfficientVLMAttention(nn.Module):
    """Multi-head (self- or cross-) attention with explicit sizes; keys/values may read another width."""

    def __init__(self, config, hidden_size: int, num_heads: int, head_dim: int, kv_size: int, dropout: float):
        super().__init__()
        self.config = config  # read at run time for the attention implementation (eager / sdpa)
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.dropout = dropout
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(hidden_size, inner)
        self.k_proj = nn.Linear(kv_size, inner)
        self.v_proj = nn.Linear(kv_size, inner)
        self.out_proj = nn.Linear(inner, hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *, key_value_states: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        past_key_values: Cache | None = None,
        cache_index: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states (B, T, D); attention_mask additive (B, 1, 1, S) or (B, 1, T, S) (causal) or None;
        key_value_states (B, S, D_kv). With `past_key_values` (self-attention only) this step's keys / values are
        appended to the cache at layer `cache_index` and the queries attend to the cached + new ones."""
        batch, length, _ = hidden_states.shape
        kv = hidden_states if key_value_states is None else key_value_states
        query = self._split(self.q_proj(hidden_states))
        # projected image keys / values (an `ImageKeyValueCache` entry) are used as they are
        key, value = (kv.key, kv.value) if isinstance(kv, CrossAttentionKeyValues) else self.project_key_values(kv)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, cache_index)  # (B, H, S_past + T, Dh) each
        dropout = self.dropout if self.training else 0.0
        probs = None
        if output_attentions or self.config._attn_implementation == "eager":
            scores = query @ key.transpose(-1, -2) / math.sqrt(self.head_dim)  # (B, H, T, S)
            if attention_mask is not None:
                scores = scores + attention_mask
            probs = scores.softmax(dim=-1)
            context = F.dropout(probs, p=dropout, training=self.training) @ value  # (B, H, T, Dh)
        else:
            context = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout)
        if head_mask is not None:
            context = context * head_mask.to(context.dtype).view(1, -1, 1, 1)
        context = context.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)
        return self.out_proj(context), (probs if output_attentions else None)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, H·Dh) → (B, H, S, Dh)."""
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def project_key_values(self, key_value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, H, S, Dh) of `key_value_states` (B, S, D_kv): what `forward` attends to."""
        return self._split(self.k_proj(key_value_states)), self._split(self.v_proj(key_value_states))


class EfficientVLMMLP(nn.Module):
    """FFN: fc1 → activation → (neuron mask) → fc2."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.act = ACT2FN[hidden_act]
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor, neuron_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.act(self.fc1(hidden_states))  # (B, T, I)
        if neuron_mask is not None:
            hidden = hidden * neuron_mask.to(hidden.dtype)
        return self.fc2(hidden)


class EfficientVLMLayer(nn.Module):
    """One transformer layer: self-attention, optional cross-attention, FFN; each sub-layer residual.

    `pre_norm=True` is the CLIP/ViT form `x + f(LN(x))`; `pre_norm=False` is the BERT form `LN(x + drop(f(x)))`.
    A sub-layer with 0 heads / 0 FFN width owns no parameters (not even its LayerNorm) and is an identity.
    """

    def __init__(self, config, layer_idx: int, pre_norm: bool, cross_attention: bool = False):
        super().__init__()
        d = config.hidden_size
        self.pre_norm = pre_norm
        self.num_heads = config.num_attention_heads[layer_idx]
        self.num_cross_heads = config.num_cross_attention_heads[layer_idx] if cross_attention else 0
        self.intermediate_size = config.intermediate_size[layer_idx]
        attn_dropout = getattr(config, "attention_probs_dropout_prob", getattr(config, "attention_dropout", 0.0))
        self.hidden_dropout = getattr(config, "hidden_dropout_prob", 0.0)
        eps = config.layer_norm_eps
        if self.num_heads:
            self.self_attn = EfficientVLMAttention(config, d, self.num_heads, config.head_dim, d, attn_dropout)
            self.layer_norm1 = nn.LayerNorm(d, eps=eps)
        if self.num_cross_heads:
            kv = config.encoder_hidden_size
            self.cross_attn = EfficientVLMAttention(config, d, self.num_cross_heads, config.head_dim, kv, attn_dropout)
            self.layer_norm_cross = nn.LayerNorm(d, eps=eps)
        if self.intermediate_size:
            self.mlp = EfficientVLMMLP(d, self.intermediate_size, config.hidden_act)
            self.layer_norm2 = nn.LayerNorm(d, eps=eps)

    def _residual(self, x: torch.Tensor, norm: nn.LayerNorm, fn, hidden_mask: torch.Tensor | None) -> torch.Tensor:
        """Pre-norm `x + h·f(LN_h(x))`, post-norm `LN_h(x + h·drop(f(x)))`; h = `hidden_mask` (None: plain form)."""
        if hidden_mask is None:
            if self.pre_norm:
                return x + fn(norm(x))
            return norm(x + F.dropout(fn(x), p=self.hidden_dropout, training=self.training))
        h = hidden_mask.to(x.dtype)
        if self.pre_norm:
            return x + fn(_masked_layer_norm(x, norm, h)) * h
        update = F.dropout(fn(x), p=self.hidden_dropout, training=self.training) * h
        return _masked_layer_norm(x + update, norm, h)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        *, masks: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None] = (None, None, None),
        output_attentions: bool = False,
        past_key_values: Cache | None = None,
        cache_index: int = 0,
        hidden_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Returns (hidden (B, T, D), self-attention probs or None, cross-attention probs or None).

        `past_key_values` caches this layer's self-attention keys / values at `cache_index` (decoder use only).
        `hidden_mask` (D,): the stream's hidden mask (see `_residual`); None = no hidden pruning.
        """
        head_mask, cross_head_mask, ffn_mask = masks
        self_probs = cross_probs = None
        if not _removed(self.num_heads, head_mask):

            def attend(x):
                nonlocal self_probs
                out, self_probs = self.self_attn(
                    x, attention_mask, key_value_states=None, head_mask=head_mask,
                    output_attentions=output_attentions, past_key_values=past_key_values, cache_index=cache_index
                )
                return out

            hidden_states = self._residual(hidden_states, self.layer_norm1, attend, hidden_mask)
        elif past_key_values is not None:
            # a removed self-attention still records its length with a (B, 1, T, 1) zero placeholder (an empty tensor
            # reads as length 0), so every cache layer knows how many tokens were seen (transformers reads layer 0's)
            placeholder = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
            past_key_values.update(placeholder, placeholder, cache_index)
        if not _removed(self.num_cross_heads, cross_head_mask):

            def cross_attend(x):
                nonlocal cross_probs
                out, cross_probs = self.cross_attn(
                    x, encoder_attention_mask, key_value_states=encoder_hidden_states, head_mask=cross_head_mask,
                    output_attentions=output_attentions
                )
                return out

            hidden_states = self._residual(hidden_states, self.layer_norm_cross, cross_attend, hidden_mask)
        if not _removed(self.intermediate_size, ffn_mask):
            mlp = lambda x: self.mlp(x, ffn_mask)  # noqa: E731
            hidden_states = self._residual(hidden_states, self.layer_norm2, mlp, hidden_mask)
        return hidden_states, self_probs, cross_probs


def _run_layers(
    layers: nn.ModuleList,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    masks: EncoderPruningMasks | None,
    *, output_attentions: bool,
    output_hidden_states: bool,
    encoder_hidden_states: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
    encoder_attention_mask: torch.Tensor | tuple[torch.Tensor | None, ...] | None = None,
    past_key_values: Cache | None = None,
    cache_offset: int = 0,
    hidden_mask: torch.Tensor | None = None,
) -> EfficientVLMEncoderOutput:
    """Runs a layer stack and collects hidden states / attention probabilities (shared by the three encoders).

    With `past_key_values`, layer i caches its self-attention at index `cache_offset + i` (decoder use).
    `hidden_mask` (D,): the residual stream's hidden mask, given to every layer.
    `encoder_hidden_states` / `encoder_attention_mask` given as a tuple of n: layer i cross-attends to entry i mod n
    (X-VLM's NLVR2: copy 2l reads image 0, copy 2l + 1 image 1).
    """
    all_hidden = [hidden_states] if output_hidden_states else None
    self_attns, cross_attns = [], []
    pick = lambda x, i: x[i % len(x)] if isinstance(x, tuple) else x  # noqa: E731
    for i, layer in enumerate(layers):
        layer_masks = masks.layer(i) if masks is not None else (None, None, None)
        hidden_states, self_probs, cross_probs = layer(
            hidden_states, attention_mask, pick(encoder_hidden_states, i), pick(encoder_attention_mask, i),
            masks=layer_masks, output_attentions=output_attentions, past_key_values=past_key_values,
            cache_index=cache_offset + i, hidden_mask=hidden_mask,
        )
        self_attns.append(self_probs)
        cross_attns.append(cross_probs)
        if output_hidden_states:
            all_hidden.append(hidden_states)
    return EfficientVLMEncoderOutput(
        last_hidden_state=hidden_states,
        hidden_states=tuple(all_hidden) if output_hidden_states else None,
        attentions=tuple(self_attns) if output_attentions else None,
        cross_attentions=tuple(cross_attns) if output_attentions and encoder_hidden_states is not None else None,
    )


def _additive_mask(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """(B, S) 1 = attend / 0 = padding → additive (B, 1, 1, S) mask with the dtype's minimum at padding."""
    if attention_mask is None:
        return None
    mask = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - mask) * torch.finfo(dtype).min


def _causal_mask(
    attention_mask: torch.Tensor | None, query_length: int, past_length: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Causal + padding additive mask (B or 1, 1, T, S), S = past_length + T: query t (absolute position
    past_length + t) sees the keys at positions <= past_length + t that are not padding; others get the minimum.

    Args:
        attention_mask: (B, S) 1 = token / 0 = padding over the cached AND the new tokens, or None (no padding).
    """
    key_length = past_length + query_length
    query_positions = past_length + torch.arange(query_length, device=device)
    allowed = torch.arange(key_length, device=device)[None, :] <= query_positions[:, None]  # (T, S)
    allowed = allowed[None, None]  # (1, 1, T, S)
    if attention_mask is not None:
        if attention_mask.shape[1] != key_length:
            raise ValueError(
                f"attention_mask must cover the cached and the new tokens: length {key_length} "
                f"({past_length} cached + {query_length} new), got {attention_mask.shape[1]}"
            )
        allowed = allowed & attention_mask[:, None, None, :].to(device=device, dtype=torch.bool)
    # one where() (not a sum of two additive masks): a padded future key gets the minimum once, never -inf
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


# --------------------------------------------------------------------------------------------------------------------
# Encoders
# --------------------------------------------------------------------------------------------------------------------


class EfficientVLMVisionEmbeddings(nn.Module):
    """Patch conv (no bias) + class token + learned position embeddings (interpolated for other image sizes)."""

    def __init__(self, config: EfficientVLMVisionConfig):
        super().__init__()
        self.config = config
        self.patch_size = config.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(config.hidden_size))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, config.patch_size, stride=config.patch_size, bias=False
        )
        self.num_positions = config.num_patches + 1
        self.position_embedding = nn.Embedding(self.num_positions, config.hidden_size)
        self.register_buffer("position_ids", torch.arange(self.num_positions).expand((1, -1)), persistent=False)

    def interpolate_pos_encoding(self, height: int, width: int) -> torch.Tensor:
        """Position table (1, 1 + h*w, D) for a (height, width) image: grid resized bicubically, CLS row kept."""
        table = self.position_embedding.weight
        grid_h, grid_w = height // self.patch_size, width // self.patch_size
        if grid_h * grid_w + 1 == self.num_positions and height == width:
            return table.unsqueeze(0)
        old = int(math.sqrt(self.num_positions - 1))
        grid = table[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)  # (1, D, old, old)
        grid = F.interpolate(grid.float(), size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        grid = grid.to(table.dtype).permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
        return torch.cat([table[:1].unsqueeze(0), grid], dim=1)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        batch, _, height, width = pixel_values.shape
        if not interpolate_pos_encoding and (height, width) != (self.config.image_size,) * 2:
            raise ValueError(
                f"Input image size ({height}x{width}) doesn't match the model ({self.config.image_size}x"
                f"{self.config.image_size}); pass interpolate_pos_encoding=True to interpolate position embeddings"
            )
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(dtype)).flatten(2).transpose(1, 2)  # (B, N, D)
        cls = self.class_embedding.expand(batch, 1, -1)
        embeddings = torch.cat([cls, patches], dim=1)
        if interpolate_pos_encoding:
            return embeddings + self.interpolate_pos_encoding(height, width)
        return embeddings + self.position_embedding(self.position_ids)


class EfficientVLMVisionTransformer(nn.Module):
    """CLIP ViT: embeddings → pre-LayerNorm → pre-norm layers → post-LayerNorm on every token (X-VLM style)."""

    def __init__(self, config: EfficientVLMVisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = EfficientVLMVisionEmbeddings(config)
        # CLIP normalises the embeddings before the first layer; ViT-style towers don't
        use_pre = getattr(config, "use_pre_layernorm", True)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if use_pre else nn.Identity()
        self.layers = nn.ModuleList(
            EfficientVLMLayer(config, i, pre_norm=True) for i in range(config.num_hidden_layers)
        )
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self,
        pixel_values: torch.Tensor,
        masks: EncoderPruningMasks | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        interpolate_pos_encoding: bool = False,
        hidden_mask: torch.Tensor | None = None,
    ) -> EfficientVLMEncoderOutput:
        """pixel_values (B, C, H, W) → tokens (B, 1 + N, D); `hidden_states` are before the post-LayerNorm.

        `hidden_mask` (D,): the vision stream's hidden mask (pre- / post-LayerNorm become LN_h; without a
        pre-LayerNorm the embeddings are scaled by it)."""
        hidden = self.embeddings(pixel_values, interpolate_pos_encoding)
        if hidden_mask is None:
            hidden = self.pre_layrnorm(hidden)
        elif isinstance(self.pre_layrnorm, nn.LayerNorm):
            hidden = _masked_layer_norm(hidden, self.pre_layrnorm, hidden_mask)
        else:
            hidden = hidden * hidden_mask.to(hidden.dtype)
        out = _run_layers(
            self.layers, hidden, None, masks, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, hidden_mask=hidden_mask
        )
        out.last_hidden_state = _masked_layer_norm(out.last_hidden_state, self.post_layernorm, hidden_mask)
        return out


class EfficientVLMTextEmbeddings(nn.Module):
    """BERT embeddings: word + position + token type, LayerNorm, dropout."""

    def __init__(self, config: EfficientVLMTextConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        positions = torch.arange(config.max_position_embeddings).expand((1, -1))
        self.register_buffer("position_ids", positions, persistent=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        past_length: int = 0,
        hidden_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) → (B, T, D); positions start at `past_length` (the cached tokens when decoding);
        `hidden_mask` (D,): the text stream's hidden mask (the LayerNorm becomes LN_h)."""
        length = input_ids.shape[1]
        if past_length + length > self.position_ids.shape[1]:
            raise ValueError(
                f"{past_length + length} tokens exceed text_config.max_position_embeddings "
                f"({self.position_ids.shape[1]})"
            )
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        embeddings = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(self.position_ids[:, past_length : past_length + length])
            + self.token_type_embeddings(token_type_ids)
        )
        return self.dropout(_masked_layer_norm(embeddings, self.LayerNorm, hidden_mask))


class EfficientVLMTextTransformer(nn.Module):
    """BERT text encoder (self-attention only)."""

    def __init__(self, config: EfficientVLMTextConfig):
        super().__init__()
        self.config = config
        self.embeddings = EfficientVLMTextEmbeddings(config)
        self.layers = nn.ModuleList(
            EfficientVLMLayer(config, i, pre_norm=False) for i in range(config.num_hidden_layers)
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        masks: EncoderPruningMasks | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        causal: bool = False,
        past_key_values: Cache | None = None,
        hidden_mask: torch.Tensor | None = None,
    ) -> EfficientVLMEncoderOutput:
        """input_ids (B, T), attention_mask (B, T) 1/0 → tokens (B, T, D).

        `causal=True` (the captioning decoder): token t attends to tokens <= t; `past_key_values` caches the
        self-attention of layer i at index i, and attention_mask then covers the cached + new tokens (B, S_past + T).
        `hidden_mask` (D,): the text stream's hidden mask.
        """
        past = past_key_values.get_seq_length(0) if past_key_values is not None else 0
        hidden = self.embeddings(input_ids, token_type_ids, past, hidden_mask)
        if causal:
            additive = _causal_mask(attention_mask, input_ids.shape[1], past, hidden.dtype, hidden.device)
        else:
            additive = _additive_mask(attention_mask, hidden.dtype)
        return _run_layers(
            self.layers, hidden, additive, masks, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            past_key_values=past_key_values, hidden_mask=hidden_mask,
        )


def shared_cross_kv_keys(config: EfficientVLMFusionConfig, prefix: str = "fusion_model.") -> dict[str, str]:
    """{odd copy's cross-attention key / value parameter: the even copy's} of a `shared_cross_kv` fusion config (the
    tensors the pair shares; empty otherwise). The even copy 2l owns them; copy 2l + 1 holds the same module."""
    if not getattr(config, "shared_cross_kv", False):
        return {}
    return {
        f"{prefix}layers.{even + 1}.cross_attn.{proj}.{param}": f"{prefix}layers.{even}.cross_attn.{proj}.{param}"
        for even in range(0, config.num_hidden_layers, 2)
        if config.num_cross_attention_heads[even]
        for proj in ("k_proj", "v_proj")
        for param in ("weight", "bias")
    }


class EfficientVLMFusionTransformer(nn.Module):
    """BERT fusion encoder: self-attention over text, cross-attention to image tokens, FFN (no embeddings).

    With `config.shared_cross_kv` (X-VLM's NLVR2 structure) layers 2l and 2l + 1 are two copies of one original layer:
    copy 2l cross-attends to image 0, copy 2l + 1 to image 1, and the pair shares ONE cross-attention k_proj / v_proj
    module (the same object in both layers, so one tensor); everything else is per copy.
    """

    def __init__(self, config: EfficientVLMFusionConfig):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(
            EfficientVLMLayer(config, i, pre_norm=False, cross_attention=True) for i in range(config.num_hidden_layers)
        )
        if getattr(config, "shared_cross_kv", False):
            for even in range(0, len(self.layers), 2):
                owner, copy = self.layers[even], self.layers[even + 1]
                if owner.num_cross_heads:  # the config guarantees equal cross heads within a pair
                    copy.cross_attn.k_proj = owner.cross_attn.k_proj
                    copy.cross_attn.v_proj = owner.cross_attn.v_proj

    def forward(
        self,
        text_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        image_hidden_states: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        image_attention_mask: torch.Tensor | tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
        masks: EncoderPruningMasks | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        causal: bool = False,
        past_key_values: Cache | None = None,
        cache_offset: int = 0,
        hidden_mask: torch.Tensor | None = None,
    ) -> EfficientVLMEncoderOutput:
        """text (B, T, D_text) + image (B, N, D_vision) → fused text tokens (B, T, D_text).

        `hidden_mask` (D_text,): the TEXT stream's hidden mask (the fusion encoder continues that stream).

        With `config.shared_cross_kv`, `image_hidden_states` is the pair (image 0 (B, N, D_vision), image 1) (and
        `image_attention_mask` None or a pair): layer i reads image i mod 2. An `ImageKeyValueCache` (selected for
        the batch) stands for image tokens whose cross-attention keys / values are already projected.
        `causal=True`: causal self-attention (the captioning decoder); `past_key_values` caches the self-attention of
        layer i at index `cache_offset + i` (cross-attention keys / values are recomputed from the image tokens).
        """
        dtype = text_hidden_states.dtype
        if isinstance(image_hidden_states, ImageKeyValueCache):  # projected K/V: one entry per layer (no image mask)
            if getattr(self.config, "shared_cross_kv", False) or len(image_hidden_states.layers) != len(self.layers):
                raise ValueError(
                    f"an ImageKeyValueCache of {len(image_hidden_states.layers)} layers does not fit this fusion "
                    f"encoder ({len(self.layers)} layers, shared_cross_kv = "
                    f"{getattr(self.config, 'shared_cross_kv', False)})"
                )
            image_hidden_states, image_attention_mask = tuple(image_hidden_states.layers), None
            paired = False
        else:
            paired = isinstance(image_hidden_states, (tuple, list))
        if bool(getattr(self.config, "shared_cross_kv", False)) != paired or (paired and len(image_hidden_states) != 2):
            raise ValueError(
                "a fusion encoder with shared_cross_kv (NLVR2) reads a pair of image token tensors (image 0, image 1); "
                f"any other reads one tensor; got {type(image_hidden_states).__name__} with shared_cross_kv = "
                f"{getattr(self.config, 'shared_cross_kv', False)}"
            )
        if paired:
            image_hidden_states = tuple(image_hidden_states)
            image_masks = (None, None) if image_attention_mask is None else tuple(image_attention_mask)
            image_attention_mask = tuple(_additive_mask(m, dtype) for m in image_masks)  # (mask 0, mask 1)
        else:
            image_attention_mask = _additive_mask(image_attention_mask, dtype)
        if causal:
            past = past_key_values.get_seq_length(cache_offset) if past_key_values is not None else 0
            length = text_hidden_states.shape[1]
            self_mask = _causal_mask(attention_mask, length, past, dtype, text_hidden_states.device)
        else:
            self_mask = _additive_mask(attention_mask, dtype)
        return _run_layers(
            self.layers,
            text_hidden_states,
            self_mask,
            masks,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            encoder_hidden_states=image_hidden_states,
            encoder_attention_mask=image_attention_mask,
            past_key_values=past_key_values,
            cache_offset=cache_offset,
            hidden_mask=hidden_mask,
        )


# --------------------------------------------------------------------------------------------------------------------
# PreTrainedModel
# --------------------------------------------------------------------------------------------------------------------


HUB_AUTO_MAP = {
    "AutoConfig": "configuration_efficientvlm.EfficientVLMConfig",
    "AutoModel": "modeling_efficientvlm.EfficientVLMForImageTextRetrieval",
    "AutoModelForPreTraining": "modeling_efficientvlm.EfficientVLMForPreTraining",
    # the built-in zero-shot-image-classification pipeline only tries this class; it reads logits_per_image
    "AutoModelForZeroShotImageClassification": "modeling_efficientvlm.EfficientVLMForImageTextRetrieval",
    "AutoModelForSequenceClassification": "modeling_efficientvlm.EfficientVLMForVisualReasoning",
    # the built-in image-text-to-text pipeline (transformers 5's name for "image-to-text") loads this class
    "AutoModelForImageTextToText": "modeling_efficientvlm.EfficientVLMForConditionalGeneration",
    # the built-in visual-question-answering pipeline loads this class (generative: it calls `generate`)
    "AutoModelForVisualQuestionAnswering": "modeling_efficientvlm.EfficientVLMForQuestionAnswering",
}


HEAD_PREFIXES = ("itm_head.", "mlm_head.", "bbox_head.", "nlvr_head.", "decoder_model.")
"""Weight-name prefixes of the heads. A checkpoint may lack a whole head its class has (the head is initialised: a task
model built from a pre-training checkpoint) or hold a whole head its class lacks (dropped); every other tensor of the
checkpoint and of the model must match up, else `from_pretrained` raises `CheckpointMismatchError`."""
QUIET_NEW_HEADS = ("bbox_head.",)
"""Heads initialised without a MISSING line in transformers' load report: the box head serves only pre-training
(L_BBOX), and converted or older checkpoints have none."""


class CheckpointMismatchError(ValueError):
    """The tensors of a checkpoint do not all load into the model its config.json builds (a layer more or fewer than
    the config says, part of a head): `from_pretrained` refuses it rather than run with unused or random weights."""


def _head_of(key: str) -> str | None:
    return next((head for head in HEAD_PREFIXES if key.startswith(head)), None)


def unfitting_weights(model: nn.Module, missing, unexpected) -> tuple[list[str], list[str]]:
    """The (missing, unexpected) keys of a load that show that the checkpoint does not fit `model`.

    Fits: a whole head of the model absent from the checkpoint (initialised), a whole head the model lacks present in
    it (dropped). Does not fit: any other missing or unexpected key, e.g. an encoder layer more or fewer than the
    config says, or a head only partly in the checkpoint. Tied copies (never stored) are not counted as missing.
    """
    tied = set(model.get_expanded_tied_weights_keys(all_submodels=True))
    own = [key for key in model.state_dict() if key not in tied]
    heads = {_head_of(key) for key in own} - {None}
    missing = set(missing) - tied
    whole = {head for head in heads if all(key in missing for key in own if key.startswith(head))}
    bad_missing = sorted(key for key in missing if _head_of(key) not in whole)
    bad_unexpected = sorted(key for key in unexpected if _head_of(key) is None or _head_of(key) in heads)
    return bad_missing, bad_unexpected


def _mismatch_message(path, class_name: str, missing: list[str], unexpected: list[str]) -> str:
    """One line: the folder, the class, and the first three keys of each kind."""

    def keys(names: list[str]) -> str:
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    parts = [f"{len(unexpected)} checkpoint tensors have no place in the model ({keys(unexpected)})"] * bool(unexpected)
    parts += [f"{len(missing)} model tensors are not in the checkpoint ({keys(missing)})"] * bool(missing)
    return (f"{path}: the weights do not fit the {class_name} that config.json describes: {'; '.join(parts)}. "
            "Use the config.json saved with these weights (layer counts and per-layer lists must match)")


class EfficientVLMPreTrainedModel(PreTrainedModel):
    config_class = EfficientVLMConfig
    config: EfficientVLMConfig
    base_model_prefix = "efficientvlm"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = False
    _supports_sdpa = True
    _no_split_modules = ["EfficientVLMLayer", "EfficientVLMVisionEmbeddings", "EfficientVLMTextEmbeddings"]
    # the pre-training box head (X-VLM's L_BBOX) is dropped by every other class without an "UNEXPECTED" report;
    # a subclass that sets its own list keeps this entry
    _keys_to_ignore_on_load_unexpected = [r"^bbox_head\.", r"^decoder_model\."]

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Saves safetensors + config + remote code; `auto_map` always lists every EfficientVLM Auto class. The
        weight files get the permissions of every other file (0666 minus the umask), not safetensors' private 0600."""
        self.config.auto_map = {**HUB_AUTO_MAP, **(getattr(self.config, "auto_map", None) or {})}
        out = super().save_pretrained(save_directory, *args, **kwargs)
        mask = os.umask(0o022)
        os.umask(mask)
        for name in os.listdir(save_directory):
            if name.endswith(".safetensors"):
                os.chmod(os.path.join(save_directory, name), 0o666 & ~mask)
        return out

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """transformers' `from_pretrained`, refusing weights that do not fit the config (`CheckpointMismatchError`,
        see `unfitting_weights`): a whole head may be missing (initialised) or extra (dropped), nothing else."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *model_args, output_loading_info=True,
                                              **kwargs)
        judged = model.__dict__.pop("_unfitting_weights", None)  # set by `_adjust_missing_and_unexpected_keys`
        missing, unexpected = judged or unfitting_weights(model, info["missing_keys"], info["unexpected_keys"])
        if missing or unexpected:
            raise cls._mismatch_error(pretrained_model_name_or_path, missing, unexpected)
        info["missing_keys"] = {*info["missing_keys"], *model.__dict__.pop("_quiet_missing", ())}  # not reported
        return (model, info) if want_info else model

    @classmethod
    def _mismatch_error(cls, path, missing: list[str], unexpected: list[str]) -> Exception:
        return CheckpointMismatchError(_mismatch_message(path, cls.__name__, missing, unexpected))

    def _adjust_missing_and_unexpected_keys(self, loading_info) -> None:
        """transformers' hook that filters the load report by `_keys_to_ignore_on_load_*`: also judges the keys
        (`unfitting_weights`, on the missing keys before a quiet head is filtered out). Weights that do not fit
        empty the report (`from_pretrained` raises one line instead of a table); a new box head is not reported."""
        ignore = [re.compile(pattern) for pattern in (self._keys_to_ignore_on_load_missing or ())]
        missing = {key for key in loading_info.missing_keys if not any(p.search(key) for p in ignore)}
        super()._adjust_missing_and_unexpected_keys(loading_info)
        self._unfitting_weights = unfitting_weights(self, missing, loading_info.unexpected_keys)
        if any(self._unfitting_weights):
            loading_info.missing_keys, loading_info.unexpected_keys = set(), set()
        else:
            self._quiet_missing = {k for k in loading_info.missing_keys if k.startswith(QUIET_NEW_HEADS)}
            loading_info.missing_keys = set(loading_info.missing_keys) - self._quiet_missing

    def post_init(self):
        """Declares the K/V tensors a `shared_cross_kv` fusion pair shares as tied weights (odd copy → even copy), so
        safetensors stores them once and `from_pretrained` loads the one tensor; then transformers' `post_init`."""
        shared = shared_cross_kv_keys(self.config.fusion_encoder_config)
        if shared:  # instance attribute: the shared keys depend on the config
            self._tied_weights_keys = {**(type(self)._tied_weights_keys or {}), **shared}
        super().post_init()

    def get_expanded_tied_weights_keys(self, all_submodels: bool = False) -> dict:
        """transformers' tied keys plus the shared cross K/V (tied by the module structure, whatever
        `tie_word_embeddings` says, which is all transformers consults)."""
        tied = super().get_expanded_tied_weights_keys(all_submodels=all_submodels)
        tied.update(shared_cross_kv_keys(self.config.fusion_encoder_config))
        return tied

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.text_config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, EfficientVLMVisionEmbeddings):
            init.normal_(module.class_embedding, mean=0.0, std=module.class_embedding.shape[0] ** -0.5)
            init.copy_(module.position_ids, torch.arange(module.num_positions).expand((1, -1)))
        elif isinstance(module, EfficientVLMTextEmbeddings):
            init.copy_(module.position_ids, torch.arange(module.position_ids.shape[-1]).expand((1, -1)))
        elif isinstance(module, EfficientVLMMLMHead):
            init.zeros_(module.bias)
        elif isinstance(module, EfficientVLMModel):
            init.constant_(module.temp, self.config.temperature_init)


# --------------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------------


class EfficientVLMModel(EfficientVLMPreTrainedModel):
    """The three encoders plus the ITC projections and temperature (a CLIP-like dual encoder with a fusion encoder).

    `forward(pixel_values, input_ids, attention_mask)` returns `logits_per_image` / `logits_per_text` (ITC), so
    zero-shot classification works like CLIP; `fuse` runs the fusion encoder on (text tokens, image tokens) pairs.
    """

    def __init__(self, config: EfficientVLMConfig):
        super().__init__(config)
        config = self.config  # PreTrainedModel may copy the config: build from the copy it keeps
        self.vision_model = EfficientVLMVisionTransformer(config.vision_config)
        self.text_model = EfficientVLMTextTransformer(config.text_config)
        self.fusion_model = EfficientVLMFusionTransformer(config.fusion_encoder_config)
        self.vision_proj = nn.Linear(config.vision_config.hidden_size, config.embed_dim)
        self.text_proj = nn.Linear(config.text_config.hidden_size, config.embed_dim)
        self.temp = nn.Parameter(torch.tensor(config.temperature_init))
        if type(self) is EfficientVLMModel:  # subclasses add heads first, then run post_init once
            self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.text_model.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.text_model.embeddings.word_embeddings = value

    @property
    def temperature(self) -> torch.Tensor:
        """The learnable ITC temperature clamped to [temperature_min, temperature_max]."""
        return self.temp.clamp(self.config.temperature_min, self.config.temperature_max)

    def encode_image(
        self,
        pixel_values: torch.Tensor,
        pruning_masks: PruningMasks | None = None,
        *, output_attentions: bool = False,
        output_hidden_states: bool = False,
        interpolate_pos_encoding: bool = False,
    ) -> EfficientVLMEncoderOutput:
        """Image tokens (B, 1 + N, D_vision) for the fusion encoder (and per-layer states for KD)."""
        masks = pruning_masks.vision if pruning_masks is not None else None
        return self.vision_model(
            pixel_values,
            masks=masks,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            interpolate_pos_encoding=interpolate_pos_encoding,
            hidden_mask=stream_mask(pruning_masks, "vision", self.config.vision_config.hidden_size),
        )

    def encode_text(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pruning_masks: PruningMasks | None = None,
        *, output_attentions: bool = False,
        output_hidden_states: bool = False,
        causal: bool = False,
        past_key_values: Cache | None = None,
    ) -> EfficientVLMEncoderOutput:
        """Text tokens (B, T, D_text) from the text encoder (`causal` / `past_key_values`: the captioning decoder)."""
        masks = pruning_masks.text if pruning_masks is not None else None
        return self.text_model(
            input_ids,
            attention_mask=attention_mask,
            masks=masks,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            causal=causal,
            past_key_values=past_key_values,
            hidden_mask=stream_mask(pruning_masks, "text", self.config.text_config.hidden_size),
        )

    def image_itc_embeds(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """(B, 1 + N, D_vision) → (B, embed_dim) L2-normalised ITC embedding of the [CLS] token."""
        return F.normalize(self.vision_proj(image_tokens[:, 0]), dim=-1)

    def text_itc_embeds(self, text_tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, D_text) → (B, embed_dim) L2-normalised ITC embedding of the [CLS] token."""
        return F.normalize(self.text_proj(text_tokens[:, 0]), dim=-1)

    def get_image_features(
        self, pixel_values: torch.Tensor, pruning_masks: PruningMasks | None = None, **kwargs
    ) -> torch.Tensor:
        """Normalised ITC image embeddings (B, embed_dim), as CLIP's `get_image_features`."""
        interpolate = kwargs.get("interpolate_pos_encoding", False)
        tokens = self.encode_image(pixel_values, pruning_masks, interpolate_pos_encoding=interpolate)
        return self.image_itc_embeds(tokens.last_hidden_state)

    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pruning_masks: PruningMasks | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Normalised ITC text embeddings (B, embed_dim), as CLIP's `get_text_features`."""
        return self.text_itc_embeds(self.encode_text(input_ids, attention_mask, pruning_masks).last_hidden_state)

    def fuse(
        self,
        text_tokens: torch.Tensor,
        attention_mask: torch.Tensor | None,
        image_tokens: torch.Tensor,
        pruning_masks: PruningMasks | None = None,
        *, output_attentions: bool = False,
        output_hidden_states: bool = False,
        causal: bool = False,
        past_key_values: Cache | None = None,
    ) -> EfficientVLMEncoderOutput:
        """Fusion encoder over aligned pairs: text (B, T, D_text) with image (B, 1 + N, D_vision).

        `causal` / `past_key_values`: the captioning decoder; fusion layer i caches at index (text layers) + i.
        `image_tokens` may be an `ImageKeyValueCache` selected for the batch (`image_key_value_cache`).
        """
        masks = pruning_masks.fusion if pruning_masks is not None else None
        return self.fusion_model(
            text_tokens,
            attention_mask=attention_mask,
            image_hidden_states=image_tokens,
            masks=masks,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            causal=causal,
            past_key_values=past_key_values,
            cache_offset=len(self.text_model.layers),
            hidden_mask=stream_mask(pruning_masks, "text", self.config.text_config.hidden_size),
        )

    def image_key_value_cache(self, image_tokens: torch.Tensor) -> ImageKeyValueCache:
        """Projects image tokens (G, 1 + N, D_vision) to every fusion layer's cross-attention keys and values once
        (the image side of the fusion encoder: it does not depend on the text). Cross-head masks scale contexts, not
        K/V, so one cache serves a gated model's masks too."""
        layers: list[CrossAttentionKeyValues | None] = []
        for layer in self.fusion_model.layers:
            attention = getattr(layer, "cross_attn", None)
            layers.append(None if attention is None else
                          CrossAttentionKeyValues(*attention.project_key_values(image_tokens)))
        return ImageKeyValueCache(layers)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pruning_masks: PruningMasks | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        interpolate_pos_encoding: bool = False,
        return_loss: bool = False,
        **kwargs,
    ) -> EfficientVLMOutput:
        """ITC between every image and every text of the batch: logits_per_image (B_img, B_txt) = sim / temp."""
        vision = text = None
        image_embeds = text_embeds = logits_per_image = logits_per_text = loss = None
        if pixel_values is not None:
            vision = self.encode_image(
                pixel_values,
                pruning_masks,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
                interpolate_pos_encoding=interpolate_pos_encoding,
            )
            image_embeds = self.image_itc_embeds(vision.last_hidden_state)
        if input_ids is not None:
            text = self.encode_text(
                input_ids,
                attention_mask,
                pruning_masks,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
            )
            text_embeds = self.text_itc_embeds(text.last_hidden_state)
        if image_embeds is not None and text_embeds is not None:
            logits_per_image = image_embeds @ text_embeds.t() / self.temperature
            logits_per_text = logits_per_image.t()
            if return_loss:
                targets = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
                loss = (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_text, targets)) / 2
        return EfficientVLMOutput(
            loss=loss,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_text,
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            vision_model_output=vision,
            text_model_output=text,
        )


ITM_SCORES = ("match_logit", "logit_diff", "match_logit_plus_itc", "probability")
"""How an ITM re-ranker scores a pair: X-VLM ranks by the match logit; "logit_diff" is the match log-odds
(logit(match) − logit(no match)); ALBEF adds the ITC cosine to the match logit; "probability" is softmax(match)."""
NOT_CANDIDATE_SCORE = -100.0
"""X-VLM's fill for pairs outside a query's ITC top-k. `rerank` does not use it: one constant for every non-candidate
ties them all, so R@K for K > k would count a true match outside the top-k as missed (see `rerank_rows`)."""
RERANK_BLOCK_SCORES = 1 << 20
"""Scores per block of queries when `rerank` / `rerank_blocks` choose the block (≈ 30 MB of temporaries)."""


def head_width(config: EfficientVLMConfig) -> int:
    """Inner width of the ITM / NLVR2 / box heads (Linear(d, w) → LayerNorm(w) → GELU → Linear(w, n)):
    `config.head_hidden_size`, or 2 x the text width when None (X-VLM; a hidden-pruned model keeps its original)."""
    width = getattr(config, "head_hidden_size", None)
    return width if width is not None else 2 * config.text_config.hidden_size


def itm_match_scores(logits: torch.Tensor, itm_score: str = "match_logit", itc: torch.Tensor | None = None):
    """(P,) ranking scores from ITM logits (P, 2) (index 1 = match); `itc` (P,) cosines for "match_logit_plus_itc"."""
    logits = logits.float()
    if itm_score == "match_logit":
        return logits[:, 1]
    if itm_score == "logit_diff":
        return logits[:, 1] - logits[:, 0]
    if itm_score == "probability":
        return logits.softmax(-1)[:, 1]
    if itm_score == "match_logit_plus_itc":
        if itc is None:
            raise ValueError("itm_score='match_logit_plus_itc' needs the pairs' ITC similarities")
        return logits[:, 1] + itc.float()
    raise ValueError(f"itm_score must be one of {ITM_SCORES}, got {itm_score!r}")


def rerank_rows(sim: torch.Tensor, top: torch.Tensor, itm: torch.Tensor) -> torch.Tensor:
    """Ranking scores (Q, C) of Q queries whose ITC top-k candidates were re-scored by the ITM head.

    The top-k keep their ITM score; every other candidate keeps its ITC order strictly below all of them:
    score = min(row's ITM scores) − (dense rank of its ITC similarity among the rest, 1 = best). Equal ITC
    similarities tie, different ones never do (integer steps, exact in float32 for galleries under 2^23), so R@K for
    K > k is still the ITC ranking's below the re-ranked block (X-VLM's constant −100 would tie them all).

    Args:
        sim: (Q, C) ITC similarities of the queries against every candidate.
        top: (Q, k) long, the columns of each query's re-ranked candidates (k <= C).
        itm: (Q, k) their ITM ranking scores.
    """
    itm = itm.float()
    scores = torch.empty(sim.shape, dtype=torch.float32, device=sim.device)
    if top.shape[1] < sim.shape[1]:
        # the top-k sort first (+inf, one dense rank 0) and are overwritten by their ITM scores below
        values, order = sim.float().scatter(1, top, float("inf")).sort(dim=1, descending=True)  # (Q, C) each
        step = torch.zeros_like(values)
        step[:, 1:] = values[:, 1:] != values[:, :-1]
        del values
        tail = itm.min(dim=1, keepdim=True).values - step.cumsum_(dim=1)  # (Q, C), in sorted order
        scores.scatter_(1, order, tail)
    return scores.scatter_(1, top, itm)


def _rerank_directions(directions: tuple[str, ...]) -> tuple[str, ...]:
    """The asked-for re-ranking directions in the order ("i2t", "t2i"); ValueError unless a non-empty subset."""
    if not directions or set(directions) - {"i2t", "t2i"}:
        raise ValueError(f"directions must be a non-empty subset of ('i2t', 't2i'), got {directions}")
    return tuple(d for d in ("i2t", "t2i") if d in directions)


def _query_block(query_block: int | None, n_candidates: int) -> int:
    """Queries per block: `query_block`, or as many as keep a block under `RERANK_BLOCK_SCORES` scores."""
    if query_block is not None and query_block < 1:
        raise ValueError(f"query_block must be >= 1 (or None), got {query_block}")
    return query_block or max(1, RERANK_BLOCK_SCORES // max(n_candidates, 1))


class EfficientVLMForImageTextRetrieval(EfficientVLMModel):
    """ITC + ITM: the retrieval model (ITC ranks everything; the ITM head re-scores the top candidates).

    Weight names are shared with `EfficientVLMModel` and `EfficientVLMForPreTraining` (no prefix), so every
    checkpoint loads into every class (missing heads are initialised, extra heads dropped with a warning).
    """

    ITM_SCORES = ITM_SCORES  # what `rerank` / `itm_pair_scores` accept as `itm_score`
    # a pre-training checkpoint's MLM head is expected to be dropped here: no "UNEXPECTED" load report for it
    _keys_to_ignore_on_load_unexpected = [r"^mlm_head\.", r"^bbox_head\.", r"^decoder_model\."]

    def __init__(self, config: EfficientVLMConfig):
        super().__init__(config)
        width, inner = self.config.text_config.hidden_size, head_width(self.config)
        self.itm_head = nn.Sequential(nn.Linear(width, inner), nn.LayerNorm(inner), nn.GELU(), nn.Linear(inner, 2))
        if type(self) is EfficientVLMForImageTextRetrieval:
            self.post_init()

    def itm_logits(
        self,
        text_tokens: torch.Tensor,
        attention_mask: torch.Tensor | None,
        image_tokens: torch.Tensor,
        pruning_masks: PruningMasks | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, EfficientVLMEncoderOutput]:
        """ITM logits (B, 2) for aligned (text, image) token pairs, and the fusion output."""
        fused = self.fuse(
            text_tokens,
            attention_mask,
            image_tokens,
            pruning_masks=pruning_masks,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        return self.itm_head(fused.last_hidden_state[:, 0]), fused

    @torch.no_grad()
    def score_pairs(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
    ) -> torch.Tensor:
        """Match score (B,) = ITM logit of "match" minus "no match", for aligned (image i, text i) pairs."""
        image_tokens = self.encode_image(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        text_tokens = self.encode_text(input_ids, attention_mask)
        logits, _ = self.itm_logits(text_tokens.last_hidden_state, attention_mask, image_tokens.last_hidden_state)
        return logits[:, 1] - logits[:, 0]

    @torch.no_grad()
    def itm_pair_scores(
        self,
        image_tokens: torch.Tensor,
        text_tokens: torch.Tensor,
        attention_mask: torch.Tensor,
        image_idx: torch.Tensor,
        text_idx: torch.Tensor,
        *, pruning_masks: PruningMasks | None = None,
        itm_score: str = "match_logit",
        itc: torch.Tensor | None = None,
        batch_size: int | None = None,
        progress=None,
        reuse_image_kv: bool = True,
    ) -> torch.Tensor:
        """Ranking scores (P,) of pairs (image_idx[p], text_idx[p]) of cached encoder tokens.

        Args:
            image_tokens: (N_img, 1 + N, D_vision) vision encoder outputs.
            text_tokens: (N_txt, T, D_text) text encoder outputs (right padded).
            attention_mask: (N_txt, T) text mask; each batch is trimmed to its longest text.
            image_idx / text_idx: (P,) long pair indices.
            pruning_masks: masks of a gated model (None = dense).
            itm_score: one of `ITM_SCORES`.
            itc: (P,) ITC cosines of the pairs (only "match_logit_plus_itc" reads them).
            batch_size: pairs per fusion pass (None = all at once).
            progress: optional fn(iterable) -> iterable (e.g. tqdm) over the batches.
            reuse_image_kv: group the pairs by image and project each image's tokens to the cross-attention keys
                and values once per fusion layer for all its texts (`_itm_scores_by_image`); False: the reference
                engine, one full fusion pass per pair (the two agree to float rounding).
        """
        if reuse_image_kv:
            return self._itm_scores_by_image(image_tokens, text_tokens, attention_mask, image_idx, text_idx,
                                             pruning_masks=pruning_masks, itm_score=itm_score, itc=itc,
                                             batch_size=batch_size, progress=progress)
        total = image_idx.numel()
        step = batch_size or max(total, 1)
        starts = range(0, total, step)
        scores = torch.empty(total, dtype=torch.float32, device=image_tokens.device)
        for start in progress(starts) if progress is not None else starts:
            images, texts = image_idx[start : start + step], text_idx[start : start + step]
            mask = attention_mask[texts]
            length = int(mask.sum(1).max())
            logits, _ = self.itm_logits(
                text_tokens=text_tokens[texts, :length],
                attention_mask=mask[:, :length],
                image_tokens=image_tokens[images],
                pruning_masks=pruning_masks,
            )
            pair_itc = None if itc is None else itc[start : start + step]
            scores[start : start + images.numel()] = itm_match_scores(logits, itm_score, pair_itc)
        return scores

    def _itm_scores_by_image(self, image_tokens, text_tokens, attention_mask, image_idx, text_idx, *, pruning_masks,
                             itm_score: str, itc, batch_size: int | None, progress) -> torch.Tensor:
        """`itm_pair_scores` with the image side computed once per image: pairs sorted by image; consecutive images
        whose pairs fit in `batch_size` form a group whose K/V (`image_key_value_cache`) are projected together;
        an image with more texts than `batch_size` is a group of its own, its texts scored in several passes."""
        total = image_idx.numel()
        scores = torch.empty(total, dtype=torch.float32, device=image_tokens.device)
        step = batch_size or max(total, 1)
        order = torch.argsort(image_idx, stable=True)
        images, counts = torch.unique_consecutive(image_idx[order], return_counts=True)
        ends = counts.cumsum(0).tolist()  # end of each image's pairs in `order`
        groups, first = [], 0  # (first image, stop image) of each group
        for i in range(len(ends)):
            starts_at = ends[first - 1] if first else 0
            if i + 1 == len(ends) or ends[i + 1] - starts_at > step:
                groups.append((first, i + 1))
                first = i + 1
        passes = [(g0, g1, start) for g0, g1 in groups
                  for start in range(ends[g0 - 1] if g0 else 0, ends[g1 - 1], step)]
        cache, cached = None, None
        for g0, g1, start in progress(passes) if progress is not None else passes:
            if cached != (g0, g1):  # one projection per group (= per image) and fusion layer
                cache, cached = self.image_key_value_cache(image_tokens[images[g0:g1]]), (g0, g1)
                local = torch.repeat_interleave(torch.arange(g1 - g0, device=order.device), counts[g0:g1])
                offset = ends[g0 - 1] if g0 else 0
            stop = min(start + step, ends[g1 - 1])
            pairs, texts = order[start:stop], text_idx[order[start:stop]]
            mask = attention_mask[texts]
            length = int(mask.sum(1).max())
            logits, _ = self.itm_logits(text_tokens[texts, :length], mask[:, :length],
                                        cache.select(local[start - offset : stop - offset]), pruning_masks)
            scores[pairs] = itm_match_scores(logits, itm_score, None if itc is None else itc[pairs])
        return scores

    @torch.no_grad()
    def rerank(
        self,
        sim_i2t: torch.Tensor,
        k: int,
        image_tokens: torch.Tensor,
        text_tokens: torch.Tensor,
        attention_mask: torch.Tensor,
        *, pruning_masks: PruningMasks | None = None,
        itm_score: str = "match_logit",
        batch_size: int | None = None,
        directions: tuple[str, ...] = ("i2t", "t2i"),
        progress=None,
        query_block: int | None = None,
        reuse_image_kv: bool = True,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """ITC top-k → ITM re-ranking (ALBEF / X-VLM) of a whole similarity matrix (`rerank_blocks` on its rows).

        Each query's k best ITC candidates get their ITM score; every other candidate keeps its ITC order strictly
        below them (`rerank_rows`). A pair in the top-k of both its image and its text is scored once.

        Args:
            sim_i2t: (N_img, N_txt) ITC cosine similarities.
            k: candidates per query, clamped to the gallery size (0 = ITC only: the similarities are returned).
            image_tokens / text_tokens / attention_mask: cached encoder outputs (see `itm_pair_scores`).
            pruning_masks, itm_score, batch_size, progress: as `itm_pair_scores`.
            directions: "i2t" (image queries rank texts) and / or "t2i" (text queries rank images).
            query_block: queries re-ranked per block (bounds the temporaries; see `rerank_blocks`).
            reuse_image_kv: as `itm_pair_scores` (False: the per-pair reference engine).

        Returns:
            (scores_i2t (N_img, N_txt) or None, scores_t2i (N_txt, N_img) or None), float32; None for a direction
            not asked for.
        """
        sim = sim_i2t.detach().float()
        n_img, n_txt = sim.shape
        shapes = {"i2t": (n_img, n_txt), "t2i": (n_txt, n_img)}
        out = {d: torch.empty(shapes[d], dtype=torch.float32, device=sim.device)
               for d in _rerank_directions(directions)}

        def rows(direction: str, start: int, stop: int) -> torch.Tensor:
            return sim[start:stop] if direction == "i2t" else sim[:, start:stop].t()

        for direction, start, _, scores in self.rerank_blocks(
            rows, (n_img, n_txt), k, image_tokens, text_tokens, attention_mask, pruning_masks=pruning_masks,
            itm_score=itm_score, batch_size=batch_size, directions=directions, progress=progress,
            query_block=query_block, reuse_image_kv=reuse_image_kv,
        ):
            out[direction][start : start + scores.shape[0]] = scores
        return out.get("i2t"), out.get("t2i")

    @torch.no_grad()
    def rerank_blocks(
        self,
        sim_rows: Callable[[str, int, int], torch.Tensor],
        shape: tuple[int, int],
        k: int,
        image_tokens: torch.Tensor,
        text_tokens: torch.Tensor,
        attention_mask: torch.Tensor,
        *, pruning_masks: PruningMasks | None = None,
        itm_score: str = "match_logit",
        batch_size: int | None = None,
        directions: tuple[str, ...] = ("i2t", "t2i"),
        progress=None,
        query_block: int | None = None,
        reuse_image_kv: bool = True,
    ) -> Iterator[tuple[str, int, torch.Tensor, torch.Tensor]]:
        """ITC top-k → ITM re-ranking one block of queries at a time, so no (N_img, N_txt) matrix need exist.

        Pass 1 keeps each query's top-k (indices and ITC values) from its block of similarity rows; the unique
        (image, text) pairs among them are scored once by the ITM head; pass 2 yields each block again with its
        re-ranked scores (`rerank_rows`). `sim_rows` is called twice per block.

        Args:
            sim_rows: fn(direction, start, stop) -> (stop − start, C) ITC similarities of queries start..stop − 1:
                rows of the (N_img, N_txt) matrix for "i2t", rows of its transpose for "t2i".
            shape: (N_img, N_txt).
            k, image_tokens, text_tokens, attention_mask, pruning_masks, itm_score, batch_size, directions,
                progress, reuse_image_kv: as `rerank`.
            query_block: queries per block (None = as many as keep a block under `RERANK_BLOCK_SCORES` scores).

        Yields:
            (direction, index of the block's first query, ITC block (B, C), re-ranked block (B, C)), both float32
            (with k = 0 the same tensor); all "i2t" blocks first.
        """
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        n_img, n_txt = shape
        sizes = {"i2t": (n_img, n_txt), "t2i": (n_txt, n_img)}
        blocks = {}
        for direction in _rerank_directions(directions):
            n_queries, n_candidates = sizes[direction]
            step = _query_block(query_block, n_candidates)
            blocks[direction] = [(start, min(start + step, n_queries)) for start in range(0, n_queries, step)]
        top, itm = {}, {}
        if k > 0 and n_img > 0 and n_txt > 0:
            itc = {}
            for direction, spans in blocks.items():
                best = [sim_rows(direction, start, stop).float().topk(min(k, sizes[direction][1]), dim=1)
                        for start, stop in spans]
                top[direction] = torch.cat([b.indices for b in best])  # (Q, k)
                itc[direction] = torch.cat([b.values for b in best])
            itm = self._top_pair_scores(top, itc, n_txt, image_tokens, text_tokens, attention_mask,
                                        pruning_masks=pruning_masks,
                                        itm_score=itm_score, batch_size=batch_size, progress=progress,
                                        reuse_image_kv=reuse_image_kv)
        for direction, spans in blocks.items():
            for start, stop in spans:
                sim = sim_rows(direction, start, stop).float()
                scores = rerank_rows(sim, top[direction][start:stop], itm[direction][start:stop]) if top else sim
                yield direction, start, sim, scores

    def _top_pair_scores(self, top: dict, itc: dict, n_txt: int, image_tokens, text_tokens, attention_mask,
                         *, pruning_masks, itm_score: str, batch_size: int | None, progress,
                         reuse_image_kv: bool = True) -> dict[str, torch.Tensor]:
        """ITM scores {direction: (Q, k)} of each query's top-k `top` {direction: (Q, k)}, with their ITC values
        `itc`; each unique (image, text) pair is scored once, however many queries have it in their top-k."""
        ids, values = [], []
        for direction, columns in top.items():
            queries = torch.arange(columns.shape[0], device=columns.device)[:, None].expand_as(columns)
            pair = queries * n_txt + columns if direction == "i2t" else columns * n_txt + queries  # image·N_txt + text
            ids.append(pair.reshape(-1))
            values.append(itc[direction].reshape(-1))
        unique_ids, inverse = torch.unique(torch.cat(ids), return_inverse=True)
        pair_itc = torch.empty(unique_ids.numel(), device=unique_ids.device).scatter_(0, inverse, torch.cat(values))
        scores = self.itm_pair_scores(
            image_tokens, text_tokens, attention_mask, unique_ids // n_txt, unique_ids % n_txt,
            pruning_masks=pruning_masks, itm_score=itm_score, itc=pair_itc, batch_size=batch_size, progress=progress,
            reuse_image_kv=reuse_image_kv,
        )
        out, offset = {}, 0
        for direction, columns in top.items():
            out[direction] = scores[inverse[offset : offset + columns.numel()]].view_as(columns)
            offset += columns.numel()
        return out

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pruning_masks: PruningMasks | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        interpolate_pos_encoding: bool = False,
        return_loss: bool = False,
        compute_itm: bool = False,
        **kwargs,
    ) -> EfficientVLMOutput:
        """ITC logits over the batch; with `compute_itm=True` also ITM logits of the aligned pairs (image i, text i)."""
        output = super().forward(
            pixel_values=pixel_values,
            input_ids=input_ids,
            attention_mask=attention_mask,
            pruning_masks=pruning_masks,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            interpolate_pos_encoding=interpolate_pos_encoding,
            return_loss=return_loss,
        )
        if compute_itm:
            output.itm_logits, output.fusion_model_output = self.itm_logits(
                output.text_model_output.last_hidden_state,
                attention_mask,
                output.vision_model_output.last_hidden_state,
                pruning_masks=pruning_masks,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
            )
        return output


class EfficientVLMMLMHead(nn.Module):
    """BERT MLM head: dense → GELU → LayerNorm → decoder tied to the word embeddings (+ its own bias)."""

    def __init__(self, config: EfficientVLMTextConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.LayerNorm(self.act(self.dense(hidden_states)))) + self.bias


class EfficientVLMForPreTraining(EfficientVLMForImageTextRetrieval):
    """ITC + ITM + MLM + X-VLM's box head (the MLM runs the fusion encoder on masked text against the paired image).

    `bbox_head` (X-VLM's `build_mlp`: Linear(d, 2d) → LayerNorm → GELU → Linear(2d, 4), d = text width) reads the
    fusion [CLS] of (image, phrase about one object) and `predict_boxes` squashes it by a sigmoid into the object's box
    (cx, cy, w, h) ∈ [0, 1]⁴ (L_BBOX). A checkpoint without the head loads with it freshly initialised.
    """

    _tied_weights_keys = {"mlm_head.decoder.weight": "text_model.embeddings.word_embeddings.weight"}

    def __init__(self, config: EfficientVLMConfig):
        super().__init__(config)
        self.mlm_head = EfficientVLMMLMHead(self.config.text_config)
        width, inner = self.config.text_config.hidden_size, head_width(self.config)
        # built without advancing the CPU RNG: `post_init` then draws every other weight exactly as before the box
        # head existed (seeded models and runs reproduce), and the box head's own weights last
        with torch.random.fork_rng(devices=[]):
            self.bbox_head = nn.Sequential(
                nn.Linear(width, inner), nn.LayerNorm(inner), nn.GELU(), nn.Linear(inner, 4)
            )
        self.post_init()

    def predict_boxes(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        pixel_values: torch.Tensor | None = None,
        image_tokens: torch.Tensor | None = None,
        pruning_masks: PruningMasks | None = None,
        interpolate_pos_encoding: bool = False,
    ) -> torch.Tensor:
        """Boxes (B, 4) = sigmoid(bbox_head(fusion [CLS])) as (cx, cy, w, h) in [0, 1], image-normalised.

        Args:
            input_ids: (B, T) phrases, each describing one object of its image ("the small red circle").
            attention_mask: (B, T) 1 = token / 0 = padding.
            pixel_values: (B, C, H, W) images; or give `image_tokens` already encoded.
            image_tokens: (B, 1 + N, D_vision) vision encoder outputs (what the pre-training step has cached).
            pruning_masks: masks of a gated model (None = dense).
            interpolate_pos_encoding: allow image sizes other than the config's.
        """
        if (pixel_values is None) == (image_tokens is None):
            raise ValueError("predict_boxes needs exactly one of pixel_values and image_tokens")
        if image_tokens is None:
            image_tokens = self.encode_image(
                pixel_values, pruning_masks, interpolate_pos_encoding=interpolate_pos_encoding
            ).last_hidden_state
        text = self.encode_text(input_ids, attention_mask, pruning_masks)
        fused = self.fuse(text.last_hidden_state, attention_mask, image_tokens, pruning_masks=pruning_masks)
        return self.bbox_head(fused.last_hidden_state[:, 0]).sigmoid()

    def get_output_embeddings(self) -> nn.Linear:
        return self.mlm_head.decoder

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.mlm_head.decoder = value

    def mlm_logits(
        self,
        mlm_input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        image_tokens: torch.Tensor,
        pruning_masks: PruningMasks | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, EfficientVLMEncoderOutput, EfficientVLMEncoderOutput]:
        """MLM logits (B, T, V) of masked text fused with its image; returns (logits, text output, fusion output)."""
        text = self.encode_text(
            mlm_input_ids,
            attention_mask,
            pruning_masks,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        fused = self.fuse(
            text.last_hidden_state,
            attention_mask,
            image_tokens,
            pruning_masks=pruning_masks,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        return self.mlm_head(fused.last_hidden_state), text, fused

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pruning_masks: PruningMasks | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        interpolate_pos_encoding: bool = False,
        return_loss: bool = False,
        compute_itm: bool = False,
        mlm_input_ids: torch.Tensor | None = None,
        mlm_labels: torch.Tensor | None = None,
        **kwargs,
    ) -> EfficientVLMOutput:
        """As the retrieval model, plus MLM logits when `mlm_input_ids` is given (loss added if `mlm_labels`)."""
        output = super().forward(
            pixel_values=pixel_values,
            input_ids=input_ids,
            attention_mask=attention_mask,
            pruning_masks=pruning_masks,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            interpolate_pos_encoding=interpolate_pos_encoding,
            return_loss=return_loss,
            compute_itm=compute_itm,
        )
        if mlm_input_ids is not None:
            image_tokens = output.vision_model_output.last_hidden_state
            output.mlm_logits, _, _ = self.mlm_logits(mlm_input_ids, attention_mask, image_tokens, pruning_masks)
            if mlm_labels is not None:
                mlm_loss = F.cross_entropy(output.mlm_logits.flatten(0, 1), mlm_labels.flatten(), ignore_index=-100)
                output.loss = mlm_loss if output.loss is None else output.loss + mlm_loss
        return output


@dataclass
class EfficientVLMVisualReasoningOutput(ModelOutput):
    """Output of `EfficientVLMForVisualReasoning` (NLVR2).

    Args:
        loss: cross-entropy of `logits` against `labels`, when labels are given.
        logits: (B, num_labels) classifier logits (NLVR2: statement false / true, index 1 = true).
        vision_model_output: vision encoder output for the 2B images, pair-adjacent (row 2b = image 0, 2b + 1 =
            image 1 of item b).
        text_model_output: text encoder output for the B statements.
        fusion_model_output: fusion encoder output for the B statements (2L layers: copy 2l read image 0, copy
            2l + 1 image 1).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    vision_model_output: EfficientVLMEncoderOutput | None = None
    text_model_output: EfficientVLMEncoderOutput | None = None
    fusion_model_output: EfficientVLMEncoderOutput | None = None


NLVR_ENCODER_PREFIXES = ("vision_model.", "text_model.", "fusion_model.")
"""Weights a single-fusion checkpoint gives the NLVR2 model; its other tensors (ITC projections, temperature, heads)
load by name where the NLVR2 class has them (`vision_proj`, `text_proj`, `temp`) and are dropped otherwise."""
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")


def nlvr_config(config: EfficientVLMConfig) -> EfficientVLMConfig:
    """A copy of `config` with X-VLM's NLVR2 fusion: each fusion layer l becomes the pair (2l, 2l + 1) with shared
    cross-attention keys / values (`shared_cross_kv`), per-layer sizes duplicated. A config already in that form is
    copied unchanged."""
    import copy

    config = copy.deepcopy(config)
    fusion = config.fusion_encoder_config
    if not fusion.shared_cross_kv:
        for name in fusion.per_layer_fields:
            setattr(fusion, name, [size for size in getattr(fusion, name) for _ in range(2)])
        fusion.num_hidden_layers *= 2
        fusion.shared_cross_kv = True
        fusion.validate()
    return config


def duplicate_fusion_state(state: dict[str, torch.Tensor], prefix: str = "fusion_model.") -> dict[str, torch.Tensor]:
    """A single-fusion state dict in the NLVR2 layout: every `<prefix>layers.l.*` tensor becomes `layers.2l.*` and
    `layers.2l+1.*` (the same tensor: the copies start equal; loading copies the values). Other keys unchanged."""
    out = {}
    head = prefix + "layers."
    for name, tensor in state.items():
        if not name.startswith(head):
            out[name] = tensor
            continue
        layer, rest = name[len(head) :].split(".", 1)
        for copy_index in (0, 1):
            out[f"{head}{2 * int(layer) + copy_index}.{rest}"] = tensor
    return out


class _SingleFusionEncoders(EfficientVLMModel):
    """Loads the encoders of a single-fusion (retrieval / pre-training) checkpoint for `EfficientVLMForVisualReasoning`
    (other classes' heads are dropped quietly; an `nlvr_head` is reported, see `from_pretrained`)."""

    _keys_to_ignore_on_load_unexpected = [r"^itm_head\.", r"^mlm_head\.", r"^bbox_head\.", r"^decoder_model\."]

    @classmethod
    def _mismatch_error(cls, path, missing: list[str], unexpected: list[str]) -> Exception:
        return CheckpointMismatchError(_mismatch_message(path, "EfficientVLMForVisualReasoning", missing, unexpected))

    def __init__(self, config: EfficientVLMConfig):
        super().__init__(config)
        self.post_init()


class EfficientVLMForVisualReasoning(EfficientVLMModel):
    """NLVR2 as X-VLM builds it: two images + a statement → true / false (or `config.num_labels` classes).

    One text stream; the fusion encoder is X-VLM's duplicated NLVR2 fusion (`shared_cross_kv`): fusion layer l of the
    pre-trained model becomes layers 2l (cross-attends to image 0) and 2l + 1 (image 1), the two copies sharing the
    cross-attention key / value projections. `nlvr_head` = Linear(d, 2d) → LayerNorm → GELU → Linear(2d, num_labels)
    (d = text width) reads the single fusion [CLS]. `config.num_labels` (transformers' field, default 2) sets the
    classes: 2 for NLVR2, 3 for X-VLM's text-agnostic NLVR domain pre-training.

    Building it from a retrieval / pre-training checkpoint (single fusion): `from_pretrained(path)` duplicates each
    fusion layer (both copies = layer l; `nlvr_head` new); in memory, `from_single_fusion(model)`. The constructor
    also accepts a single-fusion config (duplicated by `nlvr_config`, weights random).
    """

    def __init__(self, config: EfficientVLMConfig):
        super().__init__(nlvr_config(config))
        width, inner = self.config.text_config.hidden_size, head_width(self.config)
        labels = self.config.num_labels
        self.nlvr_head = nn.Sequential(
            nn.Linear(width, inner), nn.LayerNorm(inner), nn.GELU(), nn.Linear(inner, labels)
        )
        if type(self) is EfficientVLMForVisualReasoning:
            self.post_init()

    @classmethod
    def from_single_fusion(cls, model: EfficientVLMModel, num_labels: int | None = None):
        """The NLVR2 model of a single-fusion EfficientVLM model (any class): encoders, ITC projections and temperature
        copied, each fusion layer l copied into layers 2l and 2l + 1 (K/V shared), `nlvr_head` freshly initialised.

        Args:
            model: an EfficientVLM model whose fusion config has `shared_cross_kv` False.
            num_labels: classes of the new head (default `model.config.num_labels`, i.e. 2).

        Raises:
            ValueError: `model` already has the NLVR2 fusion, or holds an old-format NLVR2 head.
        """
        if model.config.fusion_encoder_config.shared_cross_kv:
            raise ValueError("the model already has the NLVR2 (shared_cross_kv) fusion: load it directly")
        if any(name.startswith("nlvr_head.") for name in model.state_dict()):
            raise ValueError(_old_nlvr_message(type(model).__name__))
        config = nlvr_config(model.config)
        if num_labels is not None:
            config.num_labels = num_labels
        reference = next(model.parameters())
        out = cls(config).to(device=reference.device, dtype=reference.dtype)
        own = out.state_dict()
        state = {k: v for k, v in duplicate_fusion_state(model.state_dict()).items() if k in own}
        missing, _ = out.load_state_dict(state, strict=False)
        lost = [k for k in missing if not k.startswith("nlvr_head.")]
        if lost:
            raise ValueError(f"{type(model).__name__} lacks weights the NLVR2 model needs: {lost}")
        return out.train(model.training)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`; a single-fusion (retrieval / pre-training) checkpoint is converted on
        the way in (`from_single_fusion`). An NLVR2 checkpoint of the former concatenated-[CLS] design raises.

        `num_labels=` sets the head's classes of a converted checkpoint; with `output_loading_info=True` the report
        of a conversion lists the new `nlvr_head` keys as missing and the checkpoint's unused tensors as unexpected.
        """
        config = kwargs.get("config")
        if not hasattr(config, "fusion_encoder_config"):
            hub = {key: kwargs[key] for key in _HUB_KWARGS if key in kwargs}
            config = EfficientVLMConfig.from_pretrained(config or pretrained_model_name_or_path, **hub)
        if config.fusion_encoder_config.shared_cross_kv:
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        if "EfficientVLMForVisualReasoning" in (getattr(config, "architectures", None) or []):
            raise ValueError(_old_nlvr_message(str(pretrained_model_name_or_path)))
        want_info = kwargs.pop("output_loading_info", False)
        num_labels = kwargs.pop("num_labels", None)
        base, info = _SingleFusionEncoders.from_pretrained(
            pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
        )
        if any(key.startswith("nlvr_head.") for key in info["unexpected_keys"]):
            raise ValueError(_old_nlvr_message(str(pretrained_model_name_or_path)))
        model = cls.from_single_fusion(base, num_labels).eval()
        if not want_info:
            return model
        report = dict(info)
        report["missing_keys"] = sorted(k for k in model.state_dict() if k.startswith("nlvr_head."))
        return model, report

    def pair_logits(
        self,
        text_tokens: torch.Tensor,
        attention_mask: torch.Tensor | None,
        image0_tokens: torch.Tensor,
        image1_tokens: torch.Tensor,
        pruning_masks: PruningMasks | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, EfficientVLMEncoderOutput]:
        """Classifier logits (B, num_labels) of (statement, image 0, image 1) from encoded tokens, and the fusion
        output.

        Args:
            text_tokens: (B, T, D_text) text encoder output.
            attention_mask: (B, T) 1 = token / 0 = padding.
            image0_tokens / image1_tokens: (B, 1 + N, D_vision) vision encoder outputs of the two images.
        """
        fused = self.fuse(
            text_tokens,
            attention_mask,
            (image0_tokens, image1_tokens),
            pruning_masks=pruning_masks,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        return self.nlvr_head(fused.last_hidden_state[:, 0]), fused

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        pruning_masks: PruningMasks | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        interpolate_pos_encoding: bool = False,
        **kwargs,
    ) -> EfficientVLMVisualReasoningOutput:
        """Classifies (image 0, image 1, statement) triples.

        Args:
            pixel_values: (B, 2, C, H, W), index 0 = left image.
            input_ids: (B, T) statements.
            attention_mask: (B, T) 1 = token / 0 = padding.
            labels: (B,) class indices (NLVR2: 0 = false / 1 = true); adds the cross-entropy `loss`.
            pruning_masks: masks of all three encoders (fusion: per layer of the 2L copies).
            output_attentions / output_hidden_states: per-encoder probabilities / states (for KD).
            interpolate_pos_encoding: allow image sizes other than the config's.

        Returns:
            `EfficientVLMVisualReasoningOutput` with logits (B, num_labels).
        """
        if pixel_values.ndim != 5 or pixel_values.shape[1] != 2:
            raise ValueError(
                f"pixel_values must be (B, 2, C, H, W) (left, right image), got {tuple(pixel_values.shape)}"
            )
        batch = pixel_values.shape[0]
        # one vision pass over the 2B images; flatten keeps each item's pair adjacent (2b = image 0, 2b + 1 = image 1)
        vision = self.encode_image(
            pixel_values.flatten(0, 1),
            pruning_masks,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            interpolate_pos_encoding=interpolate_pos_encoding,
        )
        text = self.encode_text(
            input_ids,
            attention_mask,
            pruning_masks,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        images = vision.last_hidden_state.unflatten(0, (batch, 2))  # (B, 2, 1 + N, D_vision)
        logits, fused = self.pair_logits(
            text.last_hidden_state, attention_mask, images[:, 0], images[:, 1], pruning_masks,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states,
        )
        loss = None if labels is None else F.cross_entropy(logits, labels.to(logits.device).long())
        return EfficientVLMVisualReasoningOutput(
            loss=loss, logits=logits, vision_model_output=vision, text_model_output=text, fusion_model_output=fused
        )


def _old_nlvr_message(source: str) -> str:
    return (
        f"{source} is an NLVR2 checkpoint of the former EfficientVLM design (one fusion encoder run once per image, "
        "nlvr_head on the concatenated [CLS] pair, width 2d). EfficientVLMForVisualReasoning now has X-VLM's structure "
        "(fusion layers duplicated per image with shared cross-attention keys / values, head on the single [CLS]), "
        "so these weights cannot be reused as they are: re-run `efficientvlm teacher --task nlvr2` / `prune --task "
        "nlvr2` from the retrieval / pre-training checkpoint it was fine-tuned from"
    )


@dataclass
class EfficientVLMCaptioningOutput(ModelOutput):
    """Output of `EfficientVLMForConditionalGeneration`.

    Args:
        loss: label-smoothed cross-entropy of the next-token predictions, mean over the non-ignored labels.
        logits: (B, T, V) next-token logits (position t predicts token t + 1).
        cache: the `Cache` of the text + fusion self-attention (text layers first), when caching; also readable as
            `output.past_key_values` (transformers 5 names the field `cache` and keeps that alias).
        image_tokens: (B, 1 + N, D_vision) the vision encoder's last_hidden_state (reused by later decoding steps).
        vision: vision encoder output (None when `image_tokens` were given).
        text: the causal text stack's output (attentions = causal self-attention probabilities).
        fusion: the causal fusion stack's output (attentions + cross_attentions).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: Cache | None = None
    image_tokens: torch.Tensor | None = None
    vision: EfficientVLMEncoderOutput | None = None
    text: EfficientVLMEncoderOutput | None = None
    fusion: EfficientVLMEncoderOutput | None = None


CAPTION_GENERATION_DEFAULTS = {"num_beams": 3, "min_length": 5, "max_length": 20}
"""The paper's decoding (X-VLM Captioning.yaml): beam search 3, max_length 20 / min_length 5 — totals that include the
prompt "[CLS] a picture of" (4 tokens), i.e. 1-16 new tokens; used where neither the call nor the generation config
sets them (a generation config value equal to transformers' default counts as unset; new-token counts set there win)."""


def shifted_lm_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Next-token cross-entropy: logits[:, t] predicts labels[:, t + 1]; -100 labels are ignored.

    loss = mean over non-ignored (b, t) of CE(logits[b, t - 1], labels[b, t]) with label smoothing ε
    (target = (1 − ε)·one-hot + ε / V), computed in float32.

    Args:
        logits: (B, T, V).
        labels: (B, T) token ids, -100 where ignored (prompt incl. [CLS], padding).
    """
    shifted = logits[:, :-1].flatten(0, 1).float()  # (B·(T − 1), V)
    targets = labels[:, 1:].flatten().to(shifted.device)
    return F.cross_entropy(shifted, targets, ignore_index=-100, label_smoothing=label_smoothing)


def _check_generation_counts(model, kwargs: dict) -> None:
    """Raises ValueError when a count `generate` needs >= 1 (num_beams, num_return_sequences, num_beam_groups) is not,
    naming where it comes from: transformers would fail inside the search (num_beams 0: a ZeroDivisionError)."""
    config = kwargs.get("generation_config") or model.generation_config
    for key in ("num_beams", "num_return_sequences", "num_beam_groups"):
        value = kwargs[key] if key in kwargs else getattr(config, key, None)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            source = "the generate call" if key in kwargs else "the generation config (generation_config.json)"
            raise ValueError(f"{key} must be an integer >= 1, got {value!r} from {source}")


def _generation_defaults(model, kwargs: dict, table: dict) -> dict:
    """Entries of `table` (+ the text pad id) for what neither `kwargs` nor the model's generation config sets (a
    value still at transformers' library default counts as unset); an explicit max_length drops max_new_tokens, and
    explicit max_new_tokens / min_new_tokens drop max_length / min_length."""
    config = kwargs.get("generation_config") or model.generation_config
    library = GenerationConfig()
    defaults = {
        key: value
        for key, value in table.items()
        if key not in kwargs and getattr(config, key, None) == getattr(library, key, None)
    }
    if "max_length" in kwargs or getattr(config, "max_length", None) != library.max_length:
        defaults.pop("max_new_tokens", None)  # an explicit max_length wins
    for new, total in (("max_new_tokens", "max_length"), ("min_new_tokens", "min_length")):
        if (kwargs[new] if new in kwargs else getattr(config, new, None)) is not None:
            defaults.pop(total, None)  # explicit new-token counts win over total lengths
    pad = model.config.text_config.pad_token_id
    if "pad_token_id" not in kwargs and getattr(config, "pad_token_id", None) is None and pad is not None:
        defaults["pad_token_id"] = pad
    return defaults


def _extend_cache(cache: Cache, num_layers: int) -> None:
    """Gives a `DynamicCache` built from a config (transformers builds it from the TEXT config's layer count during
    `generate`) a slot for every decoder layer: text layers + fusion layers."""
    if isinstance(cache, DynamicCache) and cache.layer_class_to_replicate is None:
        while len(cache.layers) < num_layers:
            cache.layers.append(DynamicLayer())


class EfficientVLMForConditionalGeneration(EfficientVLMModel, GenerationMixin):
    """Image captioning (X-VLM `EffXVLMForCaptioning`): the text and fusion stacks become ONE causal decoder.

    The text layers self-attend causally, the fusion layers self-attend causally and cross-attend to the image tokens,
    and `mlm_head` (decoder tied to the word embeddings) predicts the next token. Weight names are those of
    `EfficientVLMForPreTraining`, so a pre-training / distilled checkpoint becomes a captioner with `from_pretrained`
    (the ITM / NLVR heads are dropped; `vision_proj` / `text_proj` / `temp` load but are unused).

    KV cache: a transformers `Cache` over the self-attention of every decoder layer (index i = text layer i, then
    text layers + j = fusion layer j). Cross-attention keys / values are recomputed from the image tokens each step;
    `generate` runs the vision encoder once and passes `image_tokens` to every step (transformers repeats them for
    the beams; beams of one sample share the image, so beam reordering never touches them).
    """

    main_input_name = "input_ids"  # generate's token stream; the image enters as pixel_values / image_tokens
    _tied_weights_keys = {"mlm_head.decoder.weight": "text_model.embeddings.word_embeddings.weight"}
    _keys_to_ignore_on_load_unexpected = [r"^itm_head\.", r"^nlvr_head\.", r"^bbox_head\.", r"^decoder_model\."]

    def __init__(self, config: EfficientVLMConfig):
        super().__init__(config)
        self.mlm_head = EfficientVLMMLMHead(self.config.text_config)
        self.post_init()
        self._set_caption_generation_defaults()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, then `CAPTION_GENERATION_DEFAULTS` where the loaded generation config
        (e.g. of a pre-training checkpoint) leaves them unset, so pipelines see the paper's decoding settings."""
        loaded = super().from_pretrained(*args, **kwargs)
        (loaded[0] if isinstance(loaded, tuple) else loaded)._set_caption_generation_defaults()  # output_loading_info
        return loaded

    def _set_caption_generation_defaults(self) -> None:
        if getattr(self, "generation_config", None) is not None:
            for key, value in self._caption_generation_defaults({}).items():
                setattr(self.generation_config, key, value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.mlm_head.decoder

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.mlm_head.decoder = value

    @property
    def num_decoder_layers(self) -> int:
        """Self-attention layers of the decoder = cache slots (text layers + fusion layers)."""
        return len(self.text_model.layers) + len(self.fusion_model.layers)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        image_tokens: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        pruning_masks: PruningMasks | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        label_smoothing: float | None = None,
        return_dict: bool = True,
        interpolate_pos_encoding: bool = False,
        cache: Cache | None = None,
        **kwargs,
    ) -> EfficientVLMCaptioningOutput:
        """Teacher-forced next-token logits of `input_ids` given the image (one decoding step with a cache).

        Args:
            pixel_values: (B, C, H, W) images; not needed when `image_tokens` is given.
            input_ids: (B, T) "[CLS] a picture of <caption> [SEP] [PAD]..." (with a cache: only the new tokens).
            attention_mask: (B, S) 1 = token / 0 = padding over the cached + new tokens (S = cached + T).
            labels: (B, T) tokens to predict, -100 where ignored; shifted here (logits[:, :-1] predict labels[:, 1:]).
            image_tokens: (B, 1 + N, D_vision) precomputed vision output.
            past_key_values / cache: a `Cache` of the decoder self-attention (`cache` is transformers 5's name; the
                two are aliases); `use_cache=True` without one starts a `DynamicCache`; `use_cache=False` ignores it.
            pruning_masks: masks of all three encoders (None = dense).
            output_attentions / output_hidden_states: per-stack probabilities / states (for KD).
            label_smoothing: ε of the loss; default `config.caption_label_smoothing` (0.1 when absent).
            interpolate_pos_encoding: allow image sizes other than the config's.
        """
        if input_ids is None:
            raise ValueError("EfficientVLMForConditionalGeneration.forward needs input_ids (the prompt / caption)")
        cache = cache if cache is not None else past_key_values
        use_cache = cache is not None if use_cache is None else use_cache
        cache = (cache if cache is not None else DynamicCache()) if use_cache else None
        vision = None
        if image_tokens is None:
            if pixel_values is None:
                raise ValueError("pass pixel_values or image_tokens (the vision encoder's last_hidden_state)")
            vision = self.encode_image(
                pixel_values,
                pruning_masks,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
                interpolate_pos_encoding=interpolate_pos_encoding,
            )
            image_tokens = vision.last_hidden_state
        if cache is not None:
            _extend_cache(cache, self.num_decoder_layers)
        text = self.encode_text(
            input_ids, attention_mask, pruning_masks, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            causal=True, past_key_values=cache,
        )
        fused = self.fuse(
            text.last_hidden_state, attention_mask, image_tokens, pruning_masks, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, causal=True, past_key_values=cache,
        )
        logits = self.mlm_head(fused.last_hidden_state)
        loss = None
        if labels is not None:
            if label_smoothing is None:
                label_smoothing = getattr(self.config, "caption_label_smoothing", 0.1)
            loss = shifted_lm_loss(logits, labels, label_smoothing)
        return EfficientVLMCaptioningOutput(
            loss=loss, logits=logits, cache=cache, image_tokens=image_tokens, vision=vision, text=text,
            fusion=fused,
        )

    def caption_prompt(self, batch_size: int, device: torch.device | None = None) -> torch.Tensor:
        """(batch_size, P) long: `config.caption_prompt_ids` ("[CLS] a picture of") repeated for every image."""
        prompt_ids = getattr(self.config, "caption_prompt_ids", None)
        if not prompt_ids:
            raise ValueError(
                "config.caption_prompt_ids is not set (the tokenized caption prompt, e.g. [CLS] a picture of): set it "
                "(the captioning task's prepare_captioner does) or pass input_ids to generate"
            )
        prompt = torch.tensor(list(prompt_ids), dtype=torch.long, device=device or self.device)
        return prompt.expand(batch_size, -1).contiguous()

    def _drop_trailing_eos(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, generation_config=None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Drops the last column when every row ends in the eos id (a tokenized prompt "[CLS] a picture of [SEP]":
        the caption continues the prompt, it does not follow an end of text)."""
        eos = (generation_config or self.generation_config).eos_token_id
        eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
        last = input_ids[:, -1]
        if input_ids.shape[1] > 1 and eos and bool(torch.isin(last, torch.tensor(eos, device=last.device)).all()):
            input_ids = input_ids[:, :-1]
            attention_mask = None if attention_mask is None else attention_mask[:, :-1]
        return input_ids, attention_mask

    def _caption_generation_defaults(self, kwargs: dict) -> dict:
        """`CAPTION_GENERATION_DEFAULTS` (+ the text pad id) for what neither `kwargs` nor the generation config sets."""
        return _generation_defaults(self, kwargs, CAPTION_GENERATION_DEFAULTS)

    @torch.no_grad()
    def generate(
        self, pixel_values: torch.Tensor | None = None, input_ids: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        """Captions the images with transformers' `generate` (every decoding option works).

        Without `input_ids` the prompt is `config.caption_prompt_ids` and ONLY the new tokens come back
        (B·num_return_sequences, L), so the tokenizer decodes the caption alone. With `input_ids` (the caller's
        prompt, e.g. from the image-text-to-text pipeline) the output is prompt + new tokens, as for every transformers
        decoder; a prompt ending in the eos id ([SEP], which a tokenizer appends) in every row has it dropped first.
        With `return_dict_in_generate=True` the same applies to the returned `sequences`.

        Args:
            pixel_values: (B, C, H, W) images (or pass `image_tokens=` (B, 1 + N, D_vision)).
            input_ids: (B, P) prompt; default `config.caption_prompt_ids` for every image.
            **kwargs: `generate` arguments; num_beams 3, min_length 5, max_length 20 (with the prompt: 1-16 new
                tokens) unless set here or in the generation config (eos / bos / pad ids come from the generation
                config).
        """
        interpolate = kwargs.pop("interpolate_pos_encoding", False)
        if kwargs.get("image_tokens") is None:
            if pixel_values is None:
                raise ValueError("generate needs pixel_values or image_tokens")
            # the vision encoder runs once; transformers repeats the tokens for the beams (one image per sample)
            vision = self.encode_image(pixel_values, kwargs.get("pruning_masks"), interpolate_pos_encoding=interpolate)
            kwargs["image_tokens"] = vision.last_hidden_state
        strip_prompt = input_ids is None
        if input_ids is None:
            input_ids = self.caption_prompt(kwargs["image_tokens"].shape[0], kwargs["image_tokens"].device)
            kwargs.setdefault("attention_mask", torch.ones_like(input_ids))
        else:
            input_ids, kwargs["attention_mask"] = self._drop_trailing_eos(input_ids, kwargs.get("attention_mask"),
                                                                          kwargs.get("generation_config"))
        _check_generation_counts(self, kwargs)
        kwargs = {**self._caption_generation_defaults(kwargs), **kwargs}
        output = super().generate(input_ids=input_ids, **kwargs)
        if not strip_prompt:
            return output
        prompt_length = input_ids.shape[1]
        if isinstance(output, torch.Tensor):
            return output[:, prompt_length:]
        output.sequences = output.sequences[:, prompt_length:]
        return output


# --------------------------------------------------------------------------------------------------------------------
# Visual question answering
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class EfficientVLMQuestionAnsweringOutput(ModelOutput):
    """Output of `EfficientVLMForQuestionAnswering`.

    Args:
        loss: Σ_a weight_a · (token-summed next-token cross-entropy of answer a) / number of questions (X-VLM), when
            `labels` or `answer_weights` are given.
        logits: (A, L, V) answer-decoder logits (position t predicts answer token t + 1).
        answer_loss: (A,) each answer's token-summed cross-entropy (unweighted), when the loss is computed.
        cache: the `Cache` of the decoder self-attention when caching (decoding); also readable as
            `output.past_key_values`.
        question_states: (B, T, D) the fusion encoder's output the decoder cross-attends to.
        question_attention_mask: (B, T) the question mask over those states.
        vision_model_output / text_model_output / fusion_model_output: encoder outputs (None when `question_states`
            were given).
        decoder_model_output: the answer decoder's output: hidden_states, attentions (causal self-attention) and
            cross_attentions (to the fusion output) when asked (KD).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    answer_loss: torch.Tensor | None = None
    cache: Cache | None = None
    question_states: torch.Tensor | None = None
    question_attention_mask: torch.Tensor | None = None
    vision_model_output: EfficientVLMEncoderOutput | None = None
    text_model_output: EfficientVLMEncoderOutput | None = None
    fusion_model_output: EfficientVLMEncoderOutput | None = None
    decoder_model_output: EfficientVLMEncoderOutput | None = None


VQA_GENERATION_DEFAULTS = {"max_new_tokens": 10}
"""Free answer generation: greedy, at most 10 new tokens (VQA answers are 1-3 words), unless the call or the
generation config sets them."""


def answer_token_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """(A,) next-token cross-entropy of each answer SUMMED over its tokens (X-VLM's `reduction='none'` LM loss):
    Σ_t CE(logits[a, t − 1], labels[a, t]) over the non-ignored (≠ −100) labels, in float32.

    Args:
        logits: (A, L, V).
        labels: (A, L) token ids, -100 where ignored (the start token is never a target: it has no predecessor).
    """
    shifted = logits[:, :-1].float()  # (A, L − 1, V)
    targets = labels[:, 1:].to(shifted.device)
    loss = F.cross_entropy(
        shifted.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none", label_smoothing=label_smoothing
    )
    return loss.view(targets.shape).sum(dim=1)


class EfficientVLMAnswerDecoder(nn.Module):
    """The VQA answer decoder (X-VLM's `text_decoder`, a causal BERT LM-head model): its own BERT embeddings, post-norm
    `EfficientVLMLayer`s with causal self-attention, cross-attention to the fusion output and an FFN, and `lm_head`
    (an `EfficientVLMMLMHead` whose decoder is tied to `embeddings.word_embeddings`)."""

    def __init__(self, config: EfficientVLMDecoderConfig):
        super().__init__()
        self.config = config
        self.embeddings = EfficientVLMTextEmbeddings(config)
        self.layers = nn.ModuleList(
            EfficientVLMLayer(config, i, pre_norm=False, cross_attention=True) for i in range(config.num_hidden_layers)
        )
        self.lm_head = EfficientVLMMLMHead(config)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        *, masks: EncoderPruningMasks | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        past_key_values: Cache | None = None,
    ) -> EfficientVLMEncoderOutput:
        """Answer tokens (A, T) (with a cache: only the new ones) + question states (A, S, D_fusion) → (A, T, D).

        attention_mask (A, S_past + T) covers the cached and the new answer tokens; layer i caches at index i.
        """
        past = past_key_values.get_seq_length(0) if past_key_values is not None else 0
        hidden = self.embeddings(input_ids, None, past)
        self_mask = _causal_mask(attention_mask, input_ids.shape[1], past, hidden.dtype, hidden.device)
        return _run_layers(
            self.layers, hidden, self_mask, masks, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=_additive_mask(encoder_attention_mask, hidden.dtype),
            past_key_values=past_key_values,
        )


def _quiet_decoder_tie_warning(record: logging.LogRecord) -> bool:
    """Drops transformers' "checkpoint seem corrupted" tie warning about the answer decoder's word embeddings: a
    checkpoint without a decoder has neither tied tensor, and `init_decoder_from_encoders` fills both right after."""
    message = record.getMessage()
    return not ("seem corrupted" in message and "decoder_model.embeddings.word_embeddings" in message)


class EfficientVLMForQuestionAnswering(EfficientVLMModel, GenerationMixin):
    """VQA (X-VLM / EfficientVLM `EffXVLMForVQA`): the text and fusion encoders read (question, image) exactly as for
    retrieval, and an answer decoder (`decoder_model`, `EfficientVLMAnswerDecoder`) generates the answer while
    cross-attending to the fusion output.

    The decoder has its OWN embeddings and LM head (tied to the decoder's word embeddings), as X-VLM's
    `BertLMHeadModel` has: sharing the text encoder's embeddings would tie the question encoder's input table to the
    answer head, which X-VLM does not do, and own tensors keep an X-VLM `text_decoder.*` checkpoint a 1:1 mapping.
    It has as many layers as the fusion encoder (`config.decoder_config`, per-layer sizes like every encoder).

    A checkpoint without a decoder (`decoder_config` None: retrieval / pre-training / distilled student) gets
    `decoder_config_from_fusion(config)`, and `from_pretrained` initialises the decoder from it as X-VLM does: decoder
    embeddings ← text embeddings, decoder layer l ← fusion layer l, `lm_head` ← `mlm_head` when the checkpoint has one
    (see `init_decoder_from_encoders`). ITM / NLVR / box heads of such checkpoints are dropped silently.

    Inference: `rank_answers` (the paper's: first-token probability of every candidate → top-k → full-sequence
    log-likelihood → argmax) or `generate` (free answers, KV cache over the decoder's self-attention).
    """

    main_input_name = "input_ids"  # generate's token stream (the answer); the question enters through `generate`
    _tied_weights_keys = {"decoder_model.lm_head.decoder.weight": "decoder_model.embeddings.word_embeddings.weight"}
    _keys_to_ignore_on_load_unexpected = [r"^itm_head\.", r"^nlvr_head\.", r"^bbox_head\.", r"^mlm_head\."]
    MLM_HEAD_KEY_MAPPING = {r"^mlm_head\.": "decoder_model.lm_head."}
    """`from_pretrained` key mapping: a pre-training checkpoint's MLM head initialises the answer LM head (X-VLM)."""

    def __init__(self, config: EfficientVLMConfig):
        super().__init__(config)
        config = self.config
        # a checkpoint without a decoder: its sizes come from the fusion encoder, its weights from
        # `init_decoder_from_encoders` (called by `from_pretrained`)
        self._decoder_from_encoders = config.decoder_config is None
        if self._decoder_from_encoders:
            config.decoder_config = decoder_config_from_fusion(config)
        # the attention implementation reaches a decoder config set after the config was built (or just now)
        config._attn_implementation = config._attn_implementation
        config.validate()
        self.decoder_model = EfficientVLMAnswerDecoder(config.decoder_config)
        self.post_init()
        if self._decoder_from_encoders:  # its weights come from the encoders, not the checkpoint: no MISSING report
            self._keys_to_ignore_on_load_missing = {*(self._keys_to_ignore_on_load_missing or ()), r"^decoder_model\."}

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`; a checkpoint without decoder weights gets its decoder initialised from
        its encoders (`init_decoder_from_encoders`; `mlm_head.*` is loaded into `decoder_model.lm_head`)."""
        kwargs.setdefault("key_mapping", dict(cls.MLM_HEAD_KEY_MAPPING))
        loader_log = logging.getLogger("transformers.modeling_utils")
        loader_log.addFilter(_quiet_decoder_tie_warning)
        try:
            loaded = super().from_pretrained(*args, **kwargs)
        finally:
            loader_log.removeFilter(_quiet_decoder_tie_warning)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info
        if model._decoder_from_encoders:
            model.init_decoder_from_encoders()
        return loaded

    @torch.no_grad()
    def init_decoder_from_encoders(self) -> None:
        """X-VLM's VQA initialisation: decoder embeddings ← text embeddings, decoder layer l ← fusion layer l.

        Every tensor of a decoder layer is copied from the fusion layer's tensor of the same name and shape. The
        cross-attention keys / values read the vision width in the fusion encoder but the fusion width in the decoder:
        when the two widths differ (not in X-VLM, where both are 768) those two projections keep their initialisation.

        Raises:
            ValueError: the decoder's per-layer sizes differ from the fusion encoder's (naming the field).
        """
        decoder, fusion = self.config.decoder_config, self.config.fusion_encoder_config
        for field in ("num_hidden_layers", "hidden_size", "head_dim", *fusion.per_layer_fields):
            if getattr(decoder, field) != getattr(fusion, field):
                raise ValueError(
                    f"decoder_config.{field} ({getattr(decoder, field)}) differs from fusion_encoder_config.{field} "
                    f"({getattr(fusion, field)}): the decoder can only be initialised from a fusion encoder of its shape"
                )
        self.decoder_model.embeddings.load_state_dict(self.text_model.embeddings.state_dict())
        for target, source in zip(self.decoder_model.layers, self.fusion_model.layers):
            source_state = source.state_dict()
            for name, tensor in target.state_dict().items():
                if name in source_state and source_state[name].shape == tensor.shape:
                    tensor.copy_(source_state[name])
        self._decoder_from_encoders = False

    def get_output_embeddings(self) -> nn.Linear:
        return self.decoder_model.lm_head.decoder

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.decoder_model.lm_head.decoder = value

    def encode_question(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *, pruning_masks: PruningMasks | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        interpolate_pos_encoding: bool = False,
    ) -> tuple[EfficientVLMEncoderOutput, EfficientVLMEncoderOutput, EfficientVLMEncoderOutput]:
        """(vision, text, fusion) outputs of (image, question) pairs, as the retrieval model's ITM path computes them."""
        if pixel_values is None or input_ids is None:
            raise ValueError("pass pixel_values and input_ids (the questions), or precomputed question_states")
        vision = self.encode_image(pixel_values, pruning_masks, output_attentions=output_attentions,
                                   output_hidden_states=output_hidden_states,
                                   interpolate_pos_encoding=interpolate_pos_encoding)
        text = self.encode_text(input_ids, attention_mask, pruning_masks, output_attentions=output_attentions,
                                output_hidden_states=output_hidden_states)
        fused = self.fuse(text.last_hidden_state, attention_mask, vision.last_hidden_state, pruning_masks,
                          output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        return vision, text, fused

    def decode(
        self,
        answer_input_ids: torch.Tensor,
        answer_attention_mask: torch.Tensor | None,
        question_states: torch.Tensor,
        question_attention_mask: torch.Tensor | None,
        *, answer_question_index: torch.Tensor | None = None,
        pruning_masks: PruningMasks | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        past_key_values: Cache | None = None,
    ) -> tuple[torch.Tensor, EfficientVLMEncoderOutput]:
        """Answer logits (A, T, V) and the decoder output; answer a reads question row answer_question_index[a]
        (None: row a, so A must equal the number of questions)."""
        if answer_question_index is not None:
            index = answer_question_index.to(question_states.device).long()
            question_states = question_states.index_select(0, index)
            if question_attention_mask is not None:
                index = index.to(question_attention_mask.device)
                question_attention_mask = question_attention_mask.index_select(0, index)
        elif question_states.shape[0] != answer_input_ids.shape[0]:
            raise ValueError(
                f"{answer_input_ids.shape[0]} answers for {question_states.shape[0]} questions: pass "
                "answer_question_index (A,), the question row of each answer"
            )
        masks = pruning_masks.decoder if pruning_masks is not None else None
        if masks is not None and masks.hidden is not None:
            stream_mask(pruning_masks, "text", self.config.text_config.hidden_size)  # raises, naming decoder.hidden
        decoded = self.decoder_model(
            answer_input_ids, answer_attention_mask, question_states, question_attention_mask, masks=masks,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            past_key_values=past_key_values,
        )
        return self.decoder_model.lm_head(decoded.last_hidden_state), decoded

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        answer_input_ids: torch.Tensor | None = None,
        answer_attention_mask: torch.Tensor | None = None,
        answer_weights: torch.Tensor | None = None,
        answer_question_index: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        question_states: torch.Tensor | None = None,
        question_attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        pruning_masks: PruningMasks | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        label_smoothing: float = 0.0,
        interpolate_pos_encoding: bool = False,
        return_dict: bool = True,
        cache: Cache | None = None,
        **kwargs,
    ) -> EfficientVLMQuestionAnsweringOutput:
        """Teacher-forced answer logits given (image, question); the weighted LM loss when labels / weights are given.

        Args:
            pixel_values: (B, C, H, W) images; input_ids / attention_mask: (B, T) questions.
            answer_input_ids / answer_attention_mask: (A, L) "[CLS] answer [SEP] [PAD]..." (with a cache: only the new
                tokens, and the mask covers cached + new). None: only the encoders run.
            answer_weights: (A,) annotator weight of each answer (None = 1).
            answer_question_index: (A,) long, the question row of each answer (None: A == B, answer a ↔ question a).
            labels: (A, L) targets, -100 where ignored; default `answer_input_ids` with -100 at padding. Shifted here.
            question_states / question_attention_mask: a precomputed fusion output (B, T, D) and its mask; skips the
                encoders (decoding steps, ranking).
            past_key_values / cache: a `Cache` of the decoder self-attention (aliases); `use_cache=True` without one
                starts a `DynamicCache`.
            pruning_masks: masks of the three encoders and the decoder (None = dense).
            output_attentions / output_hidden_states: per-encoder and decoder probabilities / states (KD).
            label_smoothing: ε of the answer cross-entropy (default 0).

        The loss (when `labels` or `answer_weights` is given) is X-VLM's: Σ_a w_a · Σ_t CE_a,t / B.
        """
        vision = text = fused = None
        if question_states is None:
            vision, text, fused = self.encode_question(
                pixel_values, input_ids, attention_mask, pruning_masks=pruning_masks,
                output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                interpolate_pos_encoding=interpolate_pos_encoding,
            )
            question_states, question_attention_mask = fused.last_hidden_state, attention_mask
        output = EfficientVLMQuestionAnsweringOutput(
            question_states=question_states, question_attention_mask=question_attention_mask,
            vision_model_output=vision, text_model_output=text, fusion_model_output=fused,
        )
        if answer_input_ids is None:
            return output
        cache = cache if cache is not None else past_key_values
        use_cache = cache is not None if use_cache is None else use_cache
        cache = (cache if cache is not None else DynamicCache()) if use_cache else None
        if cache is not None:
            _extend_cache(cache, len(self.decoder_model.layers))
        output.logits, output.decoder_model_output = self.decode(
            answer_input_ids, answer_attention_mask, question_states, question_attention_mask,
            answer_question_index=answer_question_index,
            pruning_masks=pruning_masks, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, past_key_values=cache,
        )
        output.cache = cache
        if labels is not None or answer_weights is not None:
            if labels is None:
                labels = answer_input_ids if answer_attention_mask is None else answer_input_ids.masked_fill(
                    answer_attention_mask == 0, -100)
            output.answer_loss = answer_token_loss(output.logits, labels, label_smoothing)
            weights = torch.ones_like(output.answer_loss) if answer_weights is None else answer_weights
            output.loss = (weights.to(output.answer_loss) * output.answer_loss).sum() / question_states.shape[0]
        return output

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, **kwargs) -> dict:
        """transformers' preparation (cache slicing), with the generated stream renamed to the answer inputs."""
        inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        inputs["answer_input_ids"] = inputs.pop("input_ids")
        if "attention_mask" in inputs:
            inputs["answer_attention_mask"] = inputs.pop("attention_mask")
        return inputs

    @torch.no_grad()
    def answer_log_likelihood(
        self,
        question_states: torch.Tensor,
        question_attention_mask: torch.Tensor | None,
        answer_input_ids: torch.Tensor,
        answer_attention_mask: torch.Tensor,
        *, answer_question_index: torch.Tensor | None = None,
        pruning_masks: PruningMasks | None = None,
        batch_size: int | None = None,
    ) -> torch.Tensor:
        """(A,) full-sequence log-likelihood Σ_{t ≥ 1} log p(answer_t | answer_<t, question) of each answer over its
        non-padding tokens after the start token ([SEP] included), in float32; `batch_size` answers per pass."""
        total = answer_input_ids.shape[0]
        index = answer_question_index
        if index is None:
            index = torch.arange(total, device=answer_input_ids.device)
        out = torch.empty(total, dtype=torch.float32, device=question_states.device)
        step = batch_size or max(total, 1)
        for start in range(0, total, step):
            ids, mask = answer_input_ids[start : start + step], answer_attention_mask[start : start + step]
            length = max(int(mask.sum(1).max()), 1)  # right padding: trim to the longest answer of the batch
            ids, mask = ids[:, :length], mask[:, :length]
            logits, _ = self.decode(ids, mask, question_states, question_attention_mask,
                                    answer_question_index=index[start : start + step],
                                    pruning_masks=pruning_masks)
            out[start : start + ids.shape[0]] = -answer_token_loss(logits, ids.masked_fill(mask == 0, -100))
        return out

    @torch.no_grad()
    def rank_answers(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        answer_ids: torch.Tensor | None = None,
        answer_attention_mask: torch.Tensor | None = None,
        k: int = 128,
        pruning_masks: PruningMasks | None = None,
        batch_size: int | None = None,
        interpolate_pos_encoding: bool = False,
        question_states: torch.Tensor | None = None,
        question_attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The paper's answer ranking over a fixed answer list, batched over the questions.

        1. one decoder step from the start token gives every candidate's first-token probability;
        2. each question keeps its k most probable candidates;
        3. those are re-scored by their full-sequence log-likelihood (`answer_log_likelihood`) and sorted.
        X-VLM adds the first token's log-probability a second time in step 3 (it is already in the sequence
        likelihood); here every token counts once, so with k = A the result is exactly the full-likelihood argmax.

        Args:
            pixel_values / input_ids / attention_mask: images and questions (B, ...), or `question_states` /
                `question_attention_mask` (the fusion output, e.g. from `forward` without answers).
            answer_ids: (A, L) the candidates "[CLS] answer [SEP] [PAD]..." (one start token for all, L >= 2).
            answer_attention_mask: (A, L) 1 = token / 0 = padding.
            k: candidates re-scored per question (X-VLM: 128), clamped to A.
            pruning_masks: masks of a gated model (None = dense).
            batch_size: (question, answer) pairs per decoder pass in step 3 (None = all B·k at once).

        Returns:
            (scores (B, k), indices (B, k)) best first: full-sequence log-likelihoods and the candidates' rows in
            `answer_ids`; `indices[:, 0]` is the predicted answer.
        """
        if answer_ids is None or answer_attention_mask is None:
            raise ValueError("rank_answers needs answer_ids and answer_attention_mask (the candidate answer list)")
        if answer_ids.ndim != 2 or answer_ids.shape[1] < 2 or answer_ids.shape[0] == 0:
            raise ValueError(f"answer_ids must be (A >= 1, L >= 2): start token + answer, got {tuple(answer_ids.shape)}")
        if not bool((answer_ids[:, 0] == answer_ids[0, 0]).all()):
            raise ValueError("every candidate in answer_ids must begin with the same start token ([CLS])")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if question_states is None:
            _, _, fused = self.encode_question(pixel_values, input_ids, attention_mask, pruning_masks=pruning_masks,
                                               interpolate_pos_encoding=interpolate_pos_encoding)
            question_states, question_attention_mask = fused.last_hidden_state, attention_mask
        num_questions, num_answers = question_states.shape[0], answer_ids.shape[0]
        k = min(k, num_answers)
        start = answer_ids[:1, :1].expand(num_questions, 1)
        first_logits, _ = self.decode(start, torch.ones_like(start), question_states, question_attention_mask,
                                      pruning_masks=pruning_masks)
        first = first_logits[:, 0].float().log_softmax(dim=-1)[:, answer_ids[:, 1]]  # (B, A)
        top = first.topk(k, dim=1).indices  # (B, k)
        rows = torch.arange(num_questions, device=top.device).repeat_interleave(k)
        scores = self.answer_log_likelihood(
            question_states, question_attention_mask, answer_ids[top.flatten()],
            answer_attention_mask[top.flatten()], answer_question_index=rows, pruning_masks=pruning_masks,
            batch_size=batch_size,
        ).view(num_questions, k)
        scores, order = scores.sort(dim=1, descending=True)
        return scores, top.gather(1, order)

    def _vqa_generation_defaults(self, kwargs: dict) -> dict:
        """`VQA_GENERATION_DEFAULTS` (+ the text pad id) for what neither `kwargs` nor the generation config sets."""
        return _generation_defaults(self, kwargs, VQA_GENERATION_DEFAULTS)

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        answer_input_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Free-form answers with transformers' `generate` (greedy by default; every decoding option works).

        The encoders run once on (image, question); every decoding step runs only the decoder, with a KV cache over
        its self-attention (the fusion output is repeated for beams by transformers).

        Args:
            pixel_values: (B, C, H, W) images; input_ids / attention_mask: (B, T) the QUESTIONS (or pass
                `question_states=` / `question_attention_mask=`).
            answer_input_ids: (B, P) answer prefix; default the start token `generation_config.bos_token_id` ([CLS]).
            **kwargs: `generate` arguments (eos / pad from the generation config; max_new_tokens 10 unless set),
                `pruning_masks`, `interpolate_pos_encoding`, `answer_attention_mask`.

        Returns:
            (B·num_return_sequences, N) the generated tokens AFTER the prefix (or a `GenerateOutput` whose
            `sequences` are cut the same way).
        """
        interpolate = kwargs.pop("interpolate_pos_encoding", False)
        states, question_mask = kwargs.pop("question_states", None), kwargs.pop("question_attention_mask", None)
        if states is None:
            _, _, fused = self.encode_question(pixel_values, input_ids, attention_mask,
                                               pruning_masks=kwargs.get("pruning_masks"),
                                               interpolate_pos_encoding=interpolate)
            states, question_mask = fused.last_hidden_state, attention_mask
        if question_mask is None:
            question_mask = torch.ones(states.shape[:2], dtype=torch.long, device=states.device)
        if answer_input_ids is None:
            bos = (kwargs.get("generation_config") or self.generation_config).bos_token_id
            if bos is None:
                raise ValueError(
                    "generation_config.bos_token_id is not set (the answer start token, [CLS]): set it from the "
                    "tokenizer or pass answer_input_ids"
                )
            answer_input_ids = torch.full((states.shape[0], 1), int(bos), dtype=torch.long, device=states.device)
        answer_mask = kwargs.pop("answer_attention_mask", None)
        kwargs["attention_mask"] = torch.ones_like(answer_input_ids) if answer_mask is None else answer_mask
        _check_generation_counts(self, kwargs)
        kwargs = {**self._vqa_generation_defaults(kwargs), **kwargs}
        output = super().generate(
            input_ids=answer_input_ids, question_states=states, question_attention_mask=question_mask, **kwargs
        )
        prefix = answer_input_ids.shape[1]
        if isinstance(output, torch.Tensor):
            return output[:, prefix:]
        output.sequences = output.sequences[:, prefix:]
        return output


__all__ = [
    "ITM_SCORES",
    "NOT_CANDIDATE_SCORE",
    "CAPTION_GENERATION_DEFAULTS",
    "VQA_GENERATION_DEFAULTS",
    "EfficientVLMAnswerDecoder",
    "EfficientVLMAttention",
    "EfficientVLMCaptioningOutput",
    "EfficientVLMEncoderOutput",
    "EfficientVLMForConditionalGeneration",
    "EfficientVLMForImageTextRetrieval",
    "EfficientVLMForPreTraining",
    "EfficientVLMForQuestionAnswering",
    "EfficientVLMForVisualReasoning",
    "EfficientVLMLayer",
    "EfficientVLMMLP",
    "EfficientVLMModel",
    "EfficientVLMOutput",
    "EfficientVLMPreTrainedModel",
    "EfficientVLMQuestionAnsweringOutput",
    "EfficientVLMVisualReasoningOutput",
    "CrossAttentionKeyValues",
    "ImageKeyValueCache",
    "duplicate_fusion_state",
    "head_width",
    "nlvr_config",
    "shared_cross_kv_keys",
    "EncoderPruningMasks",
    "PruningMasks",
    "answer_token_loss",
    "itm_match_scores",
    "shifted_lm_loss",
]

# Hub remote code: `save_pretrained` copies these files and writes `auto_map`, so `AutoModel.from_pretrained(repo,
# trust_remote_code=True)` rebuilds the model with only torch and transformers installed.
EfficientVLMConfig.register_for_auto_class()
EfficientVLMForImageTextRetrieval.register_for_auto_class("AutoModel")
EfficientVLMForPreTraining.register_for_auto_class("AutoModelForPreTraining")
EfficientVLMForVisualReasoning.register_for_auto_class("AutoModelForSequenceClassification")
EfficientVLMForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
EfficientVLMForQuestionAnswering.register_for_auto_class("AutoModelForVisualQuestionAnswering")
