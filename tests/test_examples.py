"""training/examples/: the Trainer scripts a user copies, run as a user runs them — a subprocess whose working
directory is not the checkout, importing only the installed package — on a few generated image-caption files: distil a
tiny teacher, prune the student, push both to a local Hub, and load the results with AutoModel (remote code)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import BertTokenizer

from modeling_efficientvlm import EfficientVLMForPreTraining
from modeling_efficientvlm.processing_efficientvlm import EfficientVLMProcessor, build_image_processor
from tests.conftest import run_clean_python, tiny_config

EXAMPLES = Path(__file__).resolve().parents[1] / "training" / "examples"
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}
SHAPES = ("circle", "square")
COMMON = ["--max_steps", "2", "--per_device_train_batch_size", "4", "--report_to", "none", "--save_strategy", "no",
          "--disable_tqdm", "true", "--logging_steps", "1", "--seed", "0"]


def _image_folder(path: Path, several_captions: bool) -> None:
    """One image per (colour, shape) and metadata.jsonl: a caption string, or a list of two captions per image."""
    path.mkdir()
    with open(path / "metadata.jsonl", "w") as f:
        for index, (colour, shape) in enumerate((c, s) for c in COLOURS for s in SHAPES):
            image = Image.new("RGB", (40, 36), "white")  # not square: the processor resizes and centre-crops
            image.paste(COLOURS[colour], (8, 8, 30, 28) if shape == "square" else (12, 6, 26, 30))
            image.save(path / f"{index}.png")
            caption = f"a {colour} {shape}"
            captions = [caption, f"one {shape} in {colour}"] if several_captions else caption
            f.write(json.dumps({"file_name": f"{index}.png", "caption": captions}) + "\n")


def _teacher(path: Path) -> None:
    """A tiny pre-training teacher (2 layers per encoder) saved with its processor, as the scripts expect."""
    words = ["a", "one", "in", *COLOURS, *SHAPES]
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    torch.manual_seed(0)
    EfficientVLMForPreTraining(tiny_config()).save_pretrained(path)
    EfficientVLMProcessor(build_image_processor(32), BertTokenizer(vocab=vocab)).save_pretrained(path)


def _run(script: str, args: list[str], cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"), HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, f"{script}\nSTDOUT:\n{result.stdout[-3000:]}\nSTDERR:\n{result.stderr[-5000:]}"
    return result.stdout + result.stderr


@pytest.mark.slow
def test_distill_then_prune_scripts_write_models_automodel_loads(local_hub, tmp_path):
    _teacher(tmp_path / "teacher")
    _image_folder(tmp_path / "pairs", several_captions=True)
    _image_folder(tmp_path / "task", several_captions=False)

    log = _run("distill_retrieval.py", ["--teacher", "teacher", "--data_dir", "pairs", "--output_dir", "student",
                                        "--push_to_hub", "true", "--hub_model_id", "tester/examples-student",
                                        "--hub_token", "test", *COMMON], tmp_path)
    assert "'loss_mlm'" in log and "'loss_attn'" in log  # VLP + KD terms were logged
    assert json.loads((tmp_path / "student" / "layer_map.json").read_text()) == {
        "vision": [1], "text": [1], "fusion": [1]}  # half depth: student layer 0 ← teacher layer 1
    log = _run("prune_retrieval.py", ["--student", "student", "--teacher", "teacher", "--data_dir", "task",
                                      "--output_dir", "pruning", "--target_sparsity", "0.5", "--push_to_hub", "true",
                                      "--hub_model_id", "tester/examples-pruned", "--hub_token", "test", *COMMON],
               tmp_path)
    assert "'loss_lagrangian'" in log and "structure frozen" in log  # gates trained, then snapped to the target
    pruned = tmp_path / "pruning" / "pruned"
    assert (tmp_path / "pruning" / "l0_gates.safetensors").is_file()  # the gated run (re-exportable)
    assert {"README.md", "structure.json", "processor_config.json"} <= set(os.listdir(pruned))

    from huggingface_hub import HfApi

    api = HfApi(endpoint=local_hub.url, token="test")
    assert {"config.json", "model.safetensors", "layer_map.json"} <= set(api.list_repo_files("tester/examples-student"))
    pushed = set(api.list_repo_files("tester/examples-pruned"))
    assert {"config.json", "model.safetensors", "modeling_efficientvlm.py", "README.md"} <= pushed

    paths = {"teacher": str(tmp_path / "teacher"), "student": str(tmp_path / "student"), "pruned": str(pruned)}
    out = run_clean_python(f"""
        import json
        from transformers import AutoModel
        sizes = {{}}
        for name, path in {paths!r}.items():
            model = AutoModel.from_pretrained(path, trust_remote_code=True)
            c = model.config
            sizes[name] = {{"params": model.num_parameters(), "class": type(model).__name__,
                           "layers": [c.vision_config.num_hidden_layers, c.text_config.num_hidden_layers,
                                      c.fusion_encoder_config.num_hidden_layers],
                           "heads": c.vision_config.num_attention_heads, "ffn": c.text_config.intermediate_size,
                           "fusion_ffn": c.fusion_encoder_config.intermediate_size}}
        print(json.dumps(sizes))
    """)
    sizes = json.loads(out.strip().splitlines()[-1])
    assert sizes["teacher"]["layers"] == [2, 2, 2] and sizes["student"]["layers"] == [1, 1, 1]
    assert sizes["pruned"]["class"] == "EfficientVLMForImageTextRetrieval"
    assert sizes["pruned"]["layers"] == [1, 1, 1]
    for key in ("heads", "ffn", "fusion_ffn"):  # per-layer sizes in the config: no mask files, no shape inference
        assert isinstance(sizes["pruned"][key], list) and len(sizes["pruned"][key]) == 1
    assert sizes["pruned"]["ffn"][0] + sizes["pruned"]["fusion_ffn"][0] < 2 * 37  # FFN neurons were removed
    assert sizes["pruned"]["params"] < sizes["student"]["params"] < sizes["teacher"]["params"]
