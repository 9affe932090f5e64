"""Configuration of EfficientVLM: a ViT image encoder, a BERT text encoder and a BERT fusion encoder.

Every encoder sub-config accepts ``num_attention_heads`` and ``intermediate_size`` as an int (uniform) or a per-layer
list, so the config can describe a heterogeneously pruned network. A 0 means that sub-layer was removed: the layer
passes its input through it unchanged. Lists are the single source of shapes for the model, the size model and the
benchmark.
"""

from __future__ import annotations

import math
from typing import ClassVar

from transformers import PretrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.activations import ACT2FN

__all__ = [
    "EfficientVLMConfig",
    "EfficientVLMDecoderConfig",
    "EfficientVLMFusionConfig",
    "EfficientVLMTextConfig",
    "EfficientVLMVisionConfig",
    "decoder_config_from_fusion",
]


# Sanity bounds, checked before anything is allocated: a config.json is untrusted input, and a typo such as
# num_hidden_layers = 10**7 must fail in milliseconds naming the field, not after minutes and gigabytes. Each bound is
# at least twice the largest published transformer of its kind, so every real checkpoint fits (X-VLM base/large,
# BERT-large, BEiT-L and ViT-L: 24 layers, width 1024, FFN 4096; ViT-22B: 48 layers, width 6144, FFN 24576;
# LLaMA-3 405B: 126 layers, width 16384 = 128 heads x 128, FFN 53248, 128k positions; Gemma: 256k-token vocabulary).
MAX_LAYERS = 256  # num_hidden_layers of one encoder
MAX_WIDTH = 32768  # hidden_size, head_dim, encoder_hidden_size, embed_dim and heads x head_dim of one layer
MAX_INTERMEDIATE_SIZE = 131072  # FFN width of one layer
MAX_VOCAB_SIZE = 2**21  # ~2.1M: vocab_size and type_vocab_size
MAX_POSITIONS = 2**17  # 131072: max_position_embeddings, and the vision position table (patches + 1)
MAX_IMAGE_SIZE = 16384  # pixels a side (ViT inputs are 224-1024)
MAX_PATCH_SIZE = 256  # pixels a side (ViTs use 8-32); the patch conv holds channels x width x patch^2 weights
MAX_CHANNELS = 1024  # image channels (RGB 3; hyperspectral sensors ~200 bands)
MAX_TEMPERATURE = 100.0  # ITC temperatures divide cosine similarities in [-1, 1]; above ~1 the softmax is flat


def _field_name(config: PretrainedConfig, field: str) -> str:
    """``text_config.num_hidden_layers`` (or ``embed_dim``): where the field sits in the composite config.json."""
    prefix = getattr(config, "base_config_key", None)
    return f"{prefix}.{field}" if prefix else field


def _check_int(config: PretrainedConfig, field: str, low: int, high: int, bound: str) -> int:
    """Checks that `field` is an int (not a bool, not a float such as 99.0) in [low, high]; `bound` names `high`."""
    value = getattr(config, field)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        lower = "> 0" if low == 1 else f">= {low}"
        raise ValueError(
            f"{_field_name(config, field)} must be {lower} and <= {high} ({bound}), an int; got {value!r}"
        )
    return value


def _check_float(
    config: PretrainedConfig, field: str, low: float, high: float, low_open: bool = False, high_open: bool = False
) -> float:
    """Checks that `field` is a finite real number (int or float, not a bool) in the given interval."""
    value = getattr(config, field)
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{_field_name(config, field)} must be a finite number in {interval}, got {value!r}")
    return float(value)


def _per_layer(config: PretrainedConfig, field: str, num_layers: int, high: int, bound: str) -> list[int]:
    """Normalises an int-or-list field to a list of ``num_layers`` ints in [0, high] (raises naming the field)."""
    value = getattr(config, field)
    name = _field_name(config, field)
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int or a list of ints, got a bool")
    if isinstance(value, int):
        value = [value] * num_layers
    elif isinstance(value, (list, tuple)):
        value = list(value)
        if len(value) != num_layers:
            raise ValueError(
                f"{name} has {len(value)} entries but num_hidden_layers is {num_layers}: give one entry per layer"
            )
    else:
        raise ValueError(f"{name} must be an int or a list of ints, got {type(value).__name__}")
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= high:
            raise ValueError(
                f"{name}[{i}] must be an int >= 0 (0 = sub-layer removed) and <= {high} ({bound}), got {v!r}"
            )
    return value


class _EncoderConfig(PretrainedConfig):
    """Shared per-layer normalisation and validation for the three encoder sub-configs.

    The tables below are the single place where field types and sane ranges are declared; `_normalise` checks them
    in order (depth first, so a huge `num_hidden_layers` fails before any per-layer list is expanded).
    """

    # field -> (low, high, name of the high bound): ints only (a bool or a float such as 64.0 is rejected)
    int_fields: ClassVar[dict[str, tuple[int, int, str]]] = {
        "num_hidden_layers": (0, MAX_LAYERS, "MAX_LAYERS"),
        "hidden_size": (1, MAX_WIDTH, "MAX_WIDTH"),
        "head_dim": (1, MAX_WIDTH, "MAX_WIDTH"),
    }
    # field -> (low, high, low_open, high_open): finite reals
    float_fields: ClassVar[dict[str, tuple[float, float, bool, bool]]] = {
        # eps 0 divides by zero on a constant token; eps >> 1 dwarfs unit-variance activations (output ~ constant)
        "layer_norm_eps": (0.0, 1.0, True, False),
        "initializer_range": (0.0, 1.0, True, False),  # std 0 gives all-equal weights, > 1 explodes at init
    }
    per_layer_fields: ClassVar[tuple[str, ...]] = ("num_attention_heads", "intermediate_size")

    def _normalise(self) -> None:
        """Checks every declared field's type and range, then expands the per-layer fields to lists."""
        for field, (low, high, bound) in self.int_fields.items():
            _check_int(self, field, low, high, bound)
        for field, (low, high, low_open, high_open) in self.float_fields.items():
            _check_float(self, field, low, high, low_open, high_open)
        if not isinstance(self.hidden_act, str) or self.hidden_act not in ACT2FN:
            raise ValueError(
                f"{_field_name(self, 'hidden_act')} must name an activation of transformers' ACT2FN "
                f"(e.g. 'gelu', 'quick_gelu'), got {self.hidden_act!r}"
            )
        for field in self.per_layer_fields:
            if field == "intermediate_size":
                high, bound = MAX_INTERMEDIATE_SIZE, "MAX_INTERMEDIATE_SIZE"
            else:  # attention width heads x head_dim of one layer is bounded like any other width
                high, bound = MAX_WIDTH // self.head_dim, f"MAX_WIDTH // head_dim: heads x head_dim <= {MAX_WIDTH}"
            setattr(self, field, _per_layer(self, field, self.num_hidden_layers, high, bound))


class EfficientVLMVisionConfig(_EncoderConfig):
    r"""CLIP-style ViT image encoder (pre-LayerNorm layers, pre- and post-LayerNorm around the stack).

    Args:
        image_size: input resolution in pixels (square).
        patch_size: patch side in pixels; ``image_size`` must be a multiple of it.
        num_channels: image channels.
        hidden_size: token width.
        num_hidden_layers: number of transformer layers.
        num_attention_heads: heads per layer (int or per-layer list; 0 removes the attention sub-layer).
        head_dim: width of one head (explicit, so pruned layers keep their head width).
        intermediate_size: FFN width per layer (int or per-layer list; 0 removes the FFN sub-layer).
        hidden_act: FFN activation (CLIP uses ``quick_gelu``).
        layer_norm_eps: LayerNorm epsilon.
        attention_dropout: dropout on attention probabilities.
        initializer_range: std of the normal init.
        use_pre_layernorm: CLIP's LayerNorm before the first layer (False for ViT-style towers, which have none).
    """

    model_type = "efficientvlm_vision_model"
    base_config_key = "vision_config"
    int_fields: ClassVar[dict[str, tuple[int, int, str]]] = {
        **_EncoderConfig.int_fields,
        "image_size": (1, MAX_IMAGE_SIZE, "MAX_IMAGE_SIZE"),
        "patch_size": (1, MAX_PATCH_SIZE, "MAX_PATCH_SIZE"),
        "num_channels": (1, MAX_CHANNELS, "MAX_CHANNELS"),
    }
    float_fields: ClassVar[dict[str, tuple[float, float, bool, bool]]] = {
        **_EncoderConfig.float_fields,
        "attention_dropout": (0.0, 1.0, False, True),  # p = 1 zeroes every attention map
    }

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        num_channels: int = 3,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int | list[int] = 12,
        head_dim: int = 64,
        intermediate_size: int | list[int] = 3072,
        hidden_act: str = "quick_gelu",
        layer_norm_eps: float = 1e-5,
        attention_dropout: float = 0.0,
        initializer_range: float = 0.02,
        use_pre_layernorm: bool = True,
        **kwargs,
    ):
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.head_dim = head_dim
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.use_pre_layernorm = use_pre_layernorm
        super().__init__(**kwargs)
        self.validate()

    def validate(self) -> None:
        """Normalises per-layer fields and checks every field; raises ValueError naming the field."""
        self._normalise()
        if self.image_size % self.patch_size:
            raise ValueError(
                f"vision_config.image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})"
            )
        if self.num_patches + 1 > MAX_POSITIONS:
            raise ValueError(
                f"vision_config.image_size / patch_size = {self.image_size // self.patch_size} patches a side needs "
                f"{self.num_patches + 1} position embeddings, more than {MAX_POSITIONS} (MAX_POSITIONS)"
            )
        if not isinstance(self.use_pre_layernorm, bool):
            raise ValueError(f"vision_config.use_pre_layernorm must be a bool, got {self.use_pre_layernorm!r}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class EfficientVLMTextConfig(_EncoderConfig):
    r"""BERT text encoder (post-LayerNorm layers with self-attention only).

    Args:
        vocab_size: tokenizer vocabulary size.
        max_position_embeddings: longest text the position table covers.
        type_vocab_size: token-type (segment) vocabulary size.
        hidden_size: token width.
        num_hidden_layers: number of layers.
        num_attention_heads: heads per layer (int or per-layer list; 0 removes the attention sub-layer).
        head_dim: width of one head.
        intermediate_size: FFN width per layer (int or list; 0 removes the FFN sub-layer).
        hidden_act: FFN activation.
        layer_norm_eps: LayerNorm epsilon.
        hidden_dropout_prob: dropout on sub-layer outputs and embeddings.
        attention_probs_dropout_prob: dropout on attention probabilities.
        initializer_range: std of the normal init.
        pad_token_id: id of the padding token.
    """

    model_type = "efficientvlm_text_model"
    base_config_key = "text_config"
    int_fields: ClassVar[dict[str, tuple[int, int, str]]] = {
        **_EncoderConfig.int_fields,
        "vocab_size": (1, MAX_VOCAB_SIZE, "MAX_VOCAB_SIZE"),
        "max_position_embeddings": (1, MAX_POSITIONS, "MAX_POSITIONS"),
        "type_vocab_size": (1, MAX_VOCAB_SIZE, "MAX_VOCAB_SIZE"),
    }
    float_fields: ClassVar[dict[str, tuple[float, float, bool, bool]]] = {
        **_EncoderConfig.float_fields,
        "hidden_dropout_prob": (0.0, 1.0, False, True),  # p = 1 zeroes every sub-layer output
        "attention_probs_dropout_prob": (0.0, 1.0, False, True),
    }

    def __init__(
        self,
        vocab_size: int = 30522,
        max_position_embeddings: int = 512,
        type_vocab_size: int = 2,
        hidden_size: int = 768,
        num_hidden_layers: int = 6,
        num_attention_heads: int | list[int] = 12,
        head_dim: int = 64,
        intermediate_size: int | list[int] = 3072,
        hidden_act: str = "gelu",
        layer_norm_eps: float = 1e-12,
        hidden_dropout_prob: float = 0.1,
        attention_probs_dropout_prob: float = 0.1,
        initializer_range: float = 0.02,
        pad_token_id: int = 0,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.type_vocab_size = type_vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.head_dim = head_dim
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.initializer_range = initializer_range
        super().__init__(pad_token_id=pad_token_id, **kwargs)
        self.validate()

    def validate(self) -> None:
        """Normalises per-layer fields and checks every field; raises ValueError naming the field."""
        self._normalise()
        pad = self.pad_token_id
        if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or not 0 <= pad < self.vocab_size):
            raise ValueError(
                f"{_field_name(self, 'pad_token_id')} must be None or an int in [0, vocab_size = {self.vocab_size}), "
                f"got {pad!r}"
            )


class EfficientVLMFusionConfig(EfficientVLMTextConfig):
    r"""BERT fusion encoder: each layer has self-attention, cross-attention over image tokens, and an FFN.

    Adds to the text config:
        num_cross_attention_heads: cross-attention heads per layer (int or list; 0 removes that sub-layer). Queries
            come from text tokens, keys/values from image tokens of width ``encoder_hidden_size``.
        encoder_hidden_size: width of the image tokens the cross-attention reads (the vision hidden size; the parent
            config keeps it in sync).
        shared_cross_kv: X-VLM's NLVR2 structure. The layers come in pairs (2l, 2l+1), two copies of one original
            fusion layer: copy 2l cross-attends to image 0, copy 2l+1 to image 1, and the pair SHARES its
            cross-attention key / value projections (one module, one tensor); self-attention, cross q / out, FFN and
            LayerNorms are separate, so the two copies may be pruned differently. Needs an even
            ``num_hidden_layers`` and equal ``num_cross_attention_heads`` within each pair. Pruning: the cross heads of
            a pair have ONE gate (tied), because head h of both copies reads the same K/V rows — untied gates could
            keep head h in one copy only, and the shared K/V rows could then be neither removed nor sliced to one
            common shape; self heads and FFN neurons of the two copies have their own gates.
    The fusion encoder has no embeddings: it reads the text encoder's output, so ``vocab_size`` and the position
    fields are unused here.
    """

    model_type = "efficientvlm_fusion_model"
    base_config_key = "fusion_encoder_config"
    int_fields: ClassVar[dict[str, tuple[int, int, str]]] = {
        **EfficientVLMTextConfig.int_fields,
        "encoder_hidden_size": (1, MAX_WIDTH, "MAX_WIDTH"),
    }
    per_layer_fields: ClassVar[tuple[str, ...]] = (
        "num_attention_heads",
        "num_cross_attention_heads",
        "intermediate_size",
    )

    def __init__(
        self,
        num_cross_attention_heads: int | list[int] = 12,
        encoder_hidden_size: int = 768,
        num_hidden_layers: int = 6,
        shared_cross_kv: bool = False,
        **kwargs,
    ):
        self.num_cross_attention_heads = num_cross_attention_heads
        self.encoder_hidden_size = encoder_hidden_size
        self.shared_cross_kv = shared_cross_kv
        super().__init__(num_hidden_layers=num_hidden_layers, **kwargs)

    def validate(self) -> None:
        """The text-config checks, plus the pair structure of `shared_cross_kv`."""
        super().validate()
        name = _field_name(self, "shared_cross_kv")
        if not isinstance(self.shared_cross_kv, bool):
            raise ValueError(f"{name} must be a bool, got {self.shared_cross_kv!r}")
        if not self.shared_cross_kv:
            return
        if self.num_hidden_layers % 2:
            raise ValueError(
                f"{name} = True needs an even {_field_name(self, 'num_hidden_layers')} (pairs of copies), got "
                f"{self.num_hidden_layers}"
            )
        heads = self.num_cross_attention_heads
        for even in range(0, self.num_hidden_layers, 2):
            if heads[even] != heads[even + 1]:
                raise ValueError(
                    f"{_field_name(self, 'num_cross_attention_heads')}[{even}] = {heads[even]} and [{even + 1}] = "
                    f"{heads[even + 1]} differ, but layers {even} and {even + 1} are one pair sharing its "
                    f"cross-attention keys / values ({name} = True): a pair needs equal cross-attention heads"
                )


class EfficientVLMDecoderConfig(EfficientVLMFusionConfig):
    r"""VQA answer decoder (X-VLM's ``text_decoder``, a causal BERT LM-head model): its own word / position / type
    embeddings, then post-LayerNorm layers with CAUSAL self-attention, cross-attention to the fusion encoder's output
    and an FFN; an MLM-style head tied to its own word embeddings predicts the next answer token.

    Same fields as the fusion config, read differently: ``vocab_size``, ``max_position_embeddings``,
    ``type_vocab_size`` and ``pad_token_id`` size the decoder's embeddings (the text tokenizer's), and
    ``encoder_hidden_size`` is the width the cross-attention reads, i.e. the FUSION encoder's hidden size (the parent
    config checks both). Per-layer heads / cross heads / FFN sizes are lists like every encoder's, so a pruned decoder
    round-trips through ``from_pretrained``. `decoder_config_from_fusion` builds the default one.
    """

    model_type = "efficientvlm_decoder_model"
    base_config_key = "decoder_config"

    def __init__(self, **kwargs):
        # an explicit __init__: transformers replaces a config subclass without one by a plain dataclass __init__,
        # which would skip the parent's normalisation and validation
        super().__init__(**kwargs)


def decoder_config_from_fusion(config: "EfficientVLMConfig") -> EfficientVLMDecoderConfig:
    """The answer decoder a VQA model gets when its config has none (X-VLM: as many layers as the fusion encoder,
    initialised from it): the fusion encoder's per-layer sizes and widths, the text encoder's vocabulary / positions,
    cross-attention over the fusion output (``encoder_hidden_size`` = fusion hidden size)."""
    fusion, text = config.fusion_encoder_config, config.text_config
    values = {k: v for k, v in fusion.to_dict().items() if k not in ("model_type", "transformers_version")}
    values.pop("shared_cross_kv", None)  # NLVR2's paired fusion layers; a decoder layer owns its cross K/V
    values.update(
        vocab_size=text.vocab_size,
        max_position_embeddings=text.max_position_embeddings,
        type_vocab_size=text.type_vocab_size,
        pad_token_id=text.pad_token_id,
        encoder_hidden_size=fusion.hidden_size,
    )
    return EfficientVLMDecoderConfig(**values)


class EfficientVLMConfig(PretrainedConfig):
    r"""EfficientVLM: vision, text and fusion sub-configs plus the contrastive (ITC) head.

    Args:
        vision_config: dict or EfficientVLMVisionConfig.
        text_config: dict or EfficientVLMTextConfig.
        fusion_encoder_config: dict or EfficientVLMFusionConfig (its ``encoder_hidden_size`` is set to the vision width
            and its ``hidden_size`` must equal the text width). Not named ``fusion_config``: transformers reserves
            that attribute for kernel fusion.
        embed_dim: width of the ITC projections.
        temperature_init: initial ITC temperature (X-VLM: 0.07).
        temperature_min / temperature_max: clamp range applied to the learnable temperature in every forward.
        tie_word_embeddings: tie the MLM decoder to the text word embeddings (BERT default).
        decoder_config: dict, EfficientVLMDecoderConfig or None: the VQA answer decoder (None for every other model;
            `EfficientVLMForQuestionAnswering` fills it in from the fusion config). Its ``encoder_hidden_size`` must
            equal the fusion hidden size and its vocabulary the text vocabulary.
        head_hidden_size: inner width w of the ITM / NLVR2 / box heads (Linear(d, w) → LayerNorm(w) → GELU → ...);
            None = 2 x text hidden size (X-VLM). A hidden-dimension pruned model sets it to its original head width,
            which stays unpruned while the text width shrinks.

    Example:
        >>> config = EfficientVLMConfig(vision_config={"num_attention_heads": [12, 8, 0]}, ...)  # doctest: +SKIP
    """

    model_type = "efficientvlm"
    sub_configs_defaults = {
        "vision_config": EfficientVLMVisionConfig,
        "text_config": EfficientVLMTextConfig,
        "fusion_encoder_config": EfficientVLMFusionConfig,
        # optional (None for every non-VQA model); listed so the attention implementation reaches it like the others
        "decoder_config": SubConfigSpec(EfficientVLMDecoderConfig, optional=True),
    }

    def __init__(
        self,
        vision_config: dict | EfficientVLMVisionConfig | None = None,
        text_config: dict | EfficientVLMTextConfig | None = None,
        fusion_encoder_config: dict | EfficientVLMFusionConfig | None = None,
        embed_dim: int = 256,
        temperature_init: float = 0.07,
        temperature_min: float = 0.001,
        temperature_max: float = 0.5,
        tie_word_embeddings: bool = True,
        decoder_config: dict | EfficientVLMDecoderConfig | None = None,
        head_hidden_size: int | None = None,
        **kwargs,
    ):
        self.decoder_config = None if decoder_config is None else _as_config(EfficientVLMDecoderConfig, decoder_config)
        self.vision_config = _as_config(EfficientVLMVisionConfig, vision_config)
        self.text_config = _as_config(EfficientVLMTextConfig, text_config)
        fusion = _as_config(EfficientVLMFusionConfig, fusion_encoder_config)
        if fusion_encoder_config is None or "encoder_hidden_size" not in _as_dict(fusion_encoder_config):
            fusion.encoder_hidden_size = self.vision_config.hidden_size
        self.fusion_encoder_config = fusion
        self.embed_dim = embed_dim
        self.temperature_init = temperature_init
        self.temperature_min = temperature_min
        self.temperature_max = temperature_max
        self.tie_word_embeddings = tie_word_embeddings
        self.head_hidden_size = head_hidden_size
        super().__init__(**kwargs)
        self.validate()

    def validate(self) -> None:
        """Checks the cross-encoder contracts; each sub-config validated itself on construction."""
        for sub in (self.vision_config, self.text_config, self.fusion_encoder_config):
            sub.validate()
        if self.decoder_config is not None:
            self._validate_decoder()
        _check_int(self, "embed_dim", 1, MAX_WIDTH, "MAX_WIDTH")
        if self.head_hidden_size is not None:
            _check_int(self, "head_hidden_size", 1, MAX_WIDTH, "MAX_WIDTH; or None = 2 x text hidden size")
        for field in ("temperature_init", "temperature_min", "temperature_max"):
            _check_float(self, field, 0.0, MAX_TEMPERATURE, low_open=True)
        if not self.temperature_min <= self.temperature_init <= self.temperature_max:
            raise ValueError(
                f"EfficientVLMConfig.temperature_init ({self.temperature_init}) must lie in "
                f"[temperature_min, temperature_max] = [{self.temperature_min}, {self.temperature_max}]"
            )
        if self.fusion_encoder_config.hidden_size != self.text_config.hidden_size:
            raise ValueError(
                f"fusion_encoder_config.hidden_size ({self.fusion_encoder_config.hidden_size}) must equal text_config.hidden_size "
                f"({self.text_config.hidden_size}): the fusion encoder reads the text encoder's tokens"
            )
        if self.fusion_encoder_config.encoder_hidden_size != self.vision_config.hidden_size:
            raise ValueError(
                f"fusion_encoder_config.encoder_hidden_size ({self.fusion_encoder_config.encoder_hidden_size}) must equal "
                f"vision_config.hidden_size ({self.vision_config.hidden_size}): cross-attention reads image tokens"
            )

    def _validate_decoder(self) -> None:
        """The answer decoder reads the fusion output and predicts the text tokenizer's ids."""
        decoder, fusion = self.decoder_config, self.fusion_encoder_config
        if not isinstance(decoder, PretrainedConfig):
            raise ValueError(f"decoder_config must be None, a dict or a config object, got {type(decoder).__name__}")
        decoder.validate()
        if decoder.encoder_hidden_size != fusion.hidden_size:
            raise ValueError(
                f"decoder_config.encoder_hidden_size ({decoder.encoder_hidden_size}) must equal "
                f"fusion_encoder_config.hidden_size ({fusion.hidden_size}): the decoder cross-attends to the fusion output"
            )
        if decoder.vocab_size != self.text_config.vocab_size:
            raise ValueError(
                f"decoder_config.vocab_size ({decoder.vocab_size}) must equal text_config.vocab_size "
                f"({self.text_config.vocab_size}): questions and answers share one tokenizer"
            )

    def to_dict(self) -> dict:
        output = super().to_dict()
        for key in self.sub_configs_defaults:
            value = getattr(self, key)
            output[key] = value.to_dict() if isinstance(value, PretrainedConfig) else value
        return output


def _as_dict(value) -> dict:
    return value.to_dict() if isinstance(value, PretrainedConfig) else dict(value)


def _as_config(cls: type[PretrainedConfig], value) -> PretrainedConfig:
    """Builds a sub-config from None / dict / a config object (objects are copied via their dict)."""
    if value is None:
        return cls()
    if isinstance(value, PretrainedConfig) or hasattr(value, "to_dict"):
        value = value.to_dict()
    if not isinstance(value, dict):
        raise ValueError(f"{cls.__name__} must be given as a dict or a config object, got {type(value).__name__}")
    value = {k: v for k, v in value.items() if k not in ("model_type", "transformers_version")}
    return cls(**value)
