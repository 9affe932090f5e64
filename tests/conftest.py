"""Shared fixtures: tiny configs (hidden 32, 2 layers, 4 heads, odd FFN width 37, 32-px images, 8-px patches)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from modeling_efficientvlm import EfficientVLMConfig
from tests.conftest_hub import local_hub, local_hub_server  # noqa: F401  (fixtures)



torch.set_num_threads(2)


def tiny_config(**overrides) -> EfficientVLMConfig:
    """A tiny config; vision and text widths differ (32 vs 24) so cross-attention widths are exercised."""
    vision = dict(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, head_dim=8,
        intermediate_size=37,
    )
    text = dict(
        vocab_size=99, hidden_size=24, num_hidden_layers=2, num_attention_heads=4, head_dim=6,
        intermediate_size=37, max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    fusion = dict(
        hidden_size=24, num_hidden_layers=2, num_attention_heads=4, num_cross_attention_heads=4, head_dim=6,
        intermediate_size=37, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    vision.update(overrides.pop("vision", {}))
    text.update(overrides.pop("text", {}))
    fusion.update(overrides.pop("fusion", {}))
    return EfficientVLMConfig(vision_config=vision, text_config=text, fusion_encoder_config=fusion, embed_dim=16, **overrides)


def ragged_config() -> EfficientVLMConfig:
    """Heterogeneous sizes incl. removed sub-layers in every encoder."""
    return tiny_config(
        vision=dict(num_attention_heads=[3, 0], intermediate_size=[0, 21]),
        text=dict(num_attention_heads=[0, 2], intermediate_size=[37, 5]),
        fusion=dict(num_attention_heads=[1, 4], num_cross_attention_heads=[0, 3], intermediate_size=[11, 0]),
    )


def tiny_inputs(batch: int = 3, length: int = 7, seed: int = 0, vocab: int = 99, image_size: int = 32) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, length - 2 :] = 0  # one padded caption
    return {"pixel_values": torch.randn(batch, 3, image_size, image_size, generator=g), "input_ids": ids,
            "attention_mask": mask}


def lagrangian_game(l0, steps: int, lr: float) -> dict:
    """Gates (AdamW descent) vs multipliers (ascent) on `l0`'s Lagrangian alone, clamping log α after every step as the
    trainer does; returns the last step's logs."""
    opt = torch.optim.AdamW([
        {"params": l0.gate_parameters(), "lr": lr, "weight_decay": 0.0},
        {"params": l0.lambda_parameters(), "lr": lr, "weight_decay": 0.0, "maximize": True},
    ])
    logs = {}
    for step in range(steps):
        opt.zero_grad()
        loss, logs = l0.lagrangian(step)
        loss.backward()
        opt.step()
        l0.clamp_()
    return logs


def run_clean_python(code: str, env: dict | None = None, timeout: int = 240) -> str:
    """Runs `code` in a fresh interpreter that cannot import this project's packages (as a Hub user would)."""
    prelude = textwrap.dedent(
        """
        import sys
        for _name in ("modeling_efficientvlm", "efficientvlm", "training"):
            sys.modules[_name] = None  # any import of our packages now raises ImportError
        sys.path = [p for p in sys.path if p not in ("", ".")]
        """
    )
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", **(env or {})}
    full_env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True, env=full_env,
        timeout=timeout, cwd=os.path.expanduser("~") if os.path.isdir(os.path.expanduser("~")) else "/",
    )
    if result.returncode != 0:
        raise AssertionError(f"clean subprocess failed:\nSTDOUT:\n{result.stdout}\nSTDERR:\n{result.stderr[-4000:]}")
    return result.stdout


@pytest.fixture
def config() -> EfficientVLMConfig:
    return tiny_config()
