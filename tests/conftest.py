"""Shared fixtures and helpers: tiny configs (hidden 32, 2 layers, 4 heads, odd FFN width 37, 32-px images, 8-px
patches), tiny batches / teacher / Trainer arguments, a tiny processor, the CLI's tiny-run flags, an own-data folder,
synthetic X-VLM checkpoints with the official key names."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from transformers import BertTokenizer

from modeling_efficientvlm import EfficientVLMConfig, EfficientVLMForPreTraining, EncoderPruningMasks, PruningMasks
from modeling_efficientvlm.processing_efficientvlm import EfficientVLMProcessor, build_image_processor
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
    return EfficientVLMConfig(vision_config=vision, text_config=text, fusion_encoder_config=fusion, embed_dim=16,
                              **overrides)


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


# ------------------------------------------------------------------------------------------ Trainer-level helpers
def tiny_batches(n=8, batch=4, seed=0, vocab=99):
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n * batch):
        ids = torch.randint(5, vocab, (7,), generator=g)
        labels = torch.full((7,), -100)
        mlm_ids = ids.clone()
        labels[2], mlm_ids[2] = ids[2], 4
        items.append({"pixel_values": torch.randn(3, 32, 32, generator=g), "input_ids": ids,
                      "attention_mask": torch.ones(7, dtype=torch.long), "mlm_input_ids": mlm_ids,
                      "mlm_labels": labels})
    return items


def stack_batch(items):
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def training_args(cls, tmp_path, **kw):
    defaults = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=1e-3, report_to=[],
                    save_strategy="no", logging_steps=1, use_cpu=True, seed=0, disable_tqdm=True,
                    dataloader_num_workers=0)
    defaults.update(kw)
    return cls(**defaults)


def tiny_teacher():
    torch.manual_seed(0)
    return EfficientVLMForPreTraining._from_config(tiny_config(), attn_implementation="sdpa")


TINY_TEXTS = ["a red circle", "a blue square left of a red circle", "blue", "a square", "red square"]


TINY_WORDS = ["a", "red", "blue", "circle", "square", "left", "of"]


def tiny_processor() -> EfficientVLMProcessor:
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *TINY_WORDS])}
    return EfficientVLMProcessor(build_image_processor(32), BertTokenizer(vocab=vocab))


CLI_COMMON = ["--image_size", "32", "--eval_images", "8", "--itm_k", "2", "--per_device_train_batch_size", "4",
              "--report_to", "none", "--save_strategy", "no", "--use_cpu", "true", "--disable_tqdm", "true"]


def cli_teacher_and_student(root):
    """Runs the tiny `teacher` and `distill` stages (2 steps each) into root/teacher and root/student."""
    from efficientvlm.training.commands.cli import main

    assert main(["teacher", "--preset", "tiny", "--output_dir", str(root / "teacher"), "--max_steps", "2",
                 *CLI_COMMON]) == 0
    assert main(["distill", "--teacher", str(root / "teacher"), "--output_dir", str(root / "student"),
                 "--max_steps", "2", *CLI_COMMON]) == 0


OWN_DATA_COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 180, 30), "yellow": (230, 210, 20)}


def write_own_dataset(root: Path, n_train: int = 8, n_test: int = 4) -> None:
    """root/data/{train,test}.json (ALBEF format, two captions per image) and the PNGs under root/data/img."""
    (root / "data" / "img").mkdir(parents=True)
    records = []
    for index in range(n_train + n_test):
        color = list(OWN_DATA_COLORS)[index % len(OWN_DATA_COLORS)]
        shape = "circle" if index % 2 else "square"
        image = Image.new("RGB", (40, 40), "white")
        box = (6 + index % 5, 6, 30 + index % 5, 30)
        (ImageDraw.Draw(image).ellipse if shape == "circle" else ImageDraw.Draw(image).rectangle)(box, OWN_DATA_COLORS[color])
        image.save(root / "data" / "img" / f"{index}.png")
        records.append({"image": f"img/{index}.png", "caption": [f"a {color} {shape}", f"one {color} {shape} "
                                                                                        f"number {index}"]})
    (root / "data" / "train.json").write_text(json.dumps(records[:n_train]))
    (root / "data" / "test.json").write_text(json.dumps(records[n_train:]))


XVLM_KEYS_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference" / "xvlm_checkpoint_keys"
if not XVLM_KEYS_DIR.is_dir():
    XVLM_KEYS_DIR = Path("/work/shared/reference/xvlm_checkpoint_keys")


XVLM_SHRINK = {768: 32, 3072: 37, 30522: 99, 256: 16, 1536: 64}


XVLM_HEAD_DIM = 8  # 32 / 4 heads


def xvlm_reference_keys(name: str) -> list[tuple[str, list[int], str]]:
    """(key, shape, dtype) rows of a reference key list."""
    rows = []
    for line in (XVLM_KEYS_DIR / f"{name}.txt").read_text().splitlines():
        if line.strip():
            key, shape, dtype = line.split("\t")
            rows.append((key, [int(d) for d in re.findall(r"\d+", shape)], dtype))
    return rows


def synthetic_xvlm_checkpoint(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict with exactly the reference key names and shrunk widths (tied MLM tensors kept tied)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape, dtype in xvlm_reference_keys(name):
        shape = [XVLM_SHRINK.get(d, d) for d in shape]
        if dtype == "int64":  # position_ids buffers
            state[key] = torch.arange(shape[-1]).expand(shape).clone()
        else:
            state[key] = torch.randn(shape, generator=g) * 0.1
    if "text_encoder.cls.predictions.decoder.weight" in state:
        state["text_encoder.cls.predictions.decoder.weight"] = state["text_encoder.bert.embeddings.word_embeddings.weight"]
        state["text_encoder.cls.predictions.decoder.bias"] = state["text_encoder.cls.predictions.bias"]
    return state


def expected_xvlm_target(key: str, num_text_layers: int) -> str | None:
    """Independent statement of where each X-VLM key must land (None = ignored)."""
    if key.endswith("position_ids") or key.startswith("l0_module.") or key.endswith("decoder.bias"):
        return None
    vision = {
        "vision_encoder.class_embedding": "vision_model.embeddings.class_embedding",
        "vision_encoder.patch_embed.weight": "vision_model.embeddings.patch_embedding.weight",
        "vision_encoder.pos_embed.weight": "vision_model.embeddings.position_embedding.weight",
    }
    if key in vision:
        return vision[key]
    if key.startswith("vision_encoder."):
        return "vision_model." + key[len("vision_encoder.") :].replace("encoder.layers.", "layers.")
    key = key.replace("text_encoder.bert.", "text_encoder.")
    if key.startswith("text_encoder.embeddings."):
        return "text_model." + key[len("text_encoder.") :]
    if key.startswith("text_encoder.cls.predictions."):
        rest = key[len("text_encoder.cls.predictions.") :].replace("transform.", "")
        return "mlm_head." + rest
    if m := re.match(r"text_encoder\.encoder\.layer\.(\d+)\.(.+)$", key):
        index, rest = int(m.group(1)), m.group(2)
        for old, new in (
            ("crossattention.self.query", "cross_attn.q_proj"), ("crossattention.self.key", "cross_attn.k_proj"),
            ("crossattention.self.value", "cross_attn.v_proj"), ("crossattention.output.dense", "cross_attn.out_proj"),
            ("crossattention.output.LayerNorm", "layer_norm_cross"), ("attention.self.query", "self_attn.q_proj"),
            ("attention.self.key", "self_attn.k_proj"), ("attention.self.value", "self_attn.v_proj"),
            ("attention.output.dense", "self_attn.out_proj"), ("attention.output.LayerNorm", "layer_norm1"),
            ("intermediate.dense", "mlp.fc1"), ("output.dense", "mlp.fc2"), ("output.LayerNorm", "layer_norm2"),
        ):
            if rest.startswith(old + "."):
                rest = new + rest[len(old) :]
                break
        if index < num_text_layers:
            return f"text_model.layers.{index}.{rest}"
        return f"fusion_model.layers.{index - num_text_layers}.{rest}"
    return key  # temp, vision_proj, text_proj, itm_head, bbox_head (X-VLM's box head: same names)


def random_pruning_masks(config, seed: int = 0, scaled: bool = False, hidden: bool = False) -> PruningMasks:
    """Random head / cross-head / FFN masks (a whole fusion cross-attention removed); `hidden`: also binary hidden
    masks on both residual streams (CoFi); `scaled`: kept units scaled in [0.5, 1.5] (a gated model's masks)."""
    g = torch.Generator().manual_seed(seed)

    def rand(n):
        keep = (torch.rand(n, generator=g) > 0.4).float()
        keep[torch.randint(0, n, (1,), generator=g)] = 1.0
        return keep * (0.5 + torch.rand(n, generator=g)) if scaled else keep

    def enc(sub, cross=False):
        return EncoderPruningMasks(
            head=[rand(h) if h else None for h in sub.num_attention_heads],
            cross_head=[rand(h) if h else None for h in sub.num_cross_attention_heads] if cross else None,
            ffn=[rand(i) if i else None for i in sub.intermediate_size],
        )

    masks = PruningMasks(enc(config.vision_config), enc(config.text_config), enc(config.fusion_encoder_config, True))
    masks.fusion.cross_head[1] = torch.zeros(config.fusion_encoder_config.num_cross_attention_heads[1])
    if hidden:
        masks.vision.hidden = (rand(config.vision_config.hidden_size) != 0).float()
        masks.text.hidden = (rand(config.text_config.hidden_size) != 0).float()
    return masks


def save_tiny_teacher_and_student(root: Path) -> Path:
    """An untrained tiny teacher (the `tiny` bench preset) and its half-depth student, saved under root/teacher and
    root/student with the synthetic-vocabulary processor; returns root."""
    from efficientvlm.training.commands.stages import DataArguments, load_processor
    from efficientvlm.training.infra.presets import tiny_bench_config
    from efficientvlm.training.method.student import init_student_from_teacher

    torch.manual_seed(0)
    teacher = EfficientVLMForPreTraining(tiny_bench_config())
    processor = load_processor(DataArguments(image_size=32))
    for name, model in (("teacher", teacher), ("student", init_student_from_teacher(teacher))):
        model.save_pretrained(root / name)
        processor.save_pretrained(root / name)
    return root
