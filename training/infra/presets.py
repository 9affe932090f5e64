"""Config presets: X-VLM_clip shapes (the paper), the demo teacher, and a tiny config for tests and quick benchmarks."""

from __future__ import annotations

from modeling_efficientvlm import EfficientVLMConfig


def xvlm_clip_config(image_size: int = 224, vocab_size: int = 30522) -> EfficientVLMConfig:
    """X-VLM_clip teacher shapes: CLIP ViT-B/16 + BERT-base split 6 text / 6 fusion layers (BERT's vocabulary)."""
    bert = dict(hidden_size=768, num_attention_heads=12, head_dim=64, intermediate_size=3072, vocab_size=vocab_size)
    return EfficientVLMConfig(
        vision_config=dict(image_size=image_size, patch_size=16, hidden_size=768, num_hidden_layers=12,
                           num_attention_heads=12, head_dim=64, intermediate_size=3072),
        text_config=dict(num_hidden_layers=6, **bert),
        fusion_encoder_config=dict(num_hidden_layers=6, num_cross_attention_heads=12, **bert),
        embed_dim=256,
    )


def demo_config(
    image_size: int = 32, vocab_size: int = 128, *, hidden: int = 64, ffn: int = 256, heads: int = 4, patch_size: int = 4
) -> EfficientVLMConfig:
    """The demo teacher: 12/6/6 layers like X-VLM, small widths (defaults: the default demo's sizes).

    No dropout: training sees fresh scenes every step, and BERT's 0.1 dropout drowns the tiny initial text signal
    so that ITC collapses to constant features when training from scratch.
    """
    common = dict(hidden_size=hidden, num_attention_heads=heads, head_dim=hidden // heads, intermediate_size=ffn)
    text = dict(common, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return EfficientVLMConfig(
        vision_config=dict(image_size=image_size, patch_size=patch_size, num_hidden_layers=12, **common),
        text_config=dict(num_hidden_layers=6, vocab_size=vocab_size, max_position_embeddings=64, **text),
        fusion_encoder_config=dict(num_hidden_layers=6, num_cross_attention_heads=heads, **text),
        embed_dim=64,
    )


def tiny_bench_config(image_size: int = 32, vocab_size: int = 99) -> EfficientVLMConfig:
    """Tests and quick benchmarks: hidden 32, 4 vision / 2 text / 2 fusion layers, 8-px patches."""
    common = dict(hidden_size=32, num_attention_heads=4, head_dim=8, intermediate_size=64)
    return EfficientVLMConfig(
        vision_config=dict(image_size=image_size, patch_size=8, num_hidden_layers=4, **common),
        text_config=dict(num_hidden_layers=2, vocab_size=vocab_size, max_position_embeddings=64, **common),
        fusion_encoder_config=dict(num_hidden_layers=2, num_cross_attention_heads=4, **common),
        embed_dim=16,
    )


PRESETS = {"xvlm-clip": xvlm_clip_config, "demo": demo_config, "tiny": tiny_bench_config}
"""Every preset is fn(image_size=..., vocab_size=...) -> config (defaults: the preset's own sizes)."""


def preset_config(name: str, image_size: int, vocab_size: int) -> EfficientVLMConfig:
    """The preset `name` at `image_size` pixels with a `vocab_size`-token embedding (the tokenizer it trains with).

    Raises:
        ValueError: naming the allowed presets, or the preset's patch size when it does not divide `image_size`.
    """
    if name not in PRESETS:
        raise ValueError(f"--preset must be one of {sorted(PRESETS)}, got {name!r}")
    patch = PRESETS[name]().vision_config.patch_size  # a config object only: no weights are built
    if image_size < patch or image_size % patch:
        raise ValueError(f"--image_size {image_size} does not fit --preset {name}: it must be a multiple of the "
                         f"preset's {patch}-pixel patch size (e.g. {max(patch, image_size // patch * patch)})")
    return PRESETS[name](image_size=image_size, vocab_size=vocab_size)
