"""Push to a Hub-compatible server on 127.0.0.1 through the real huggingface_hub client, then load by repo id."""

import json

import pytest
import torch

from modeling_efficientvlm import EfficientVLMForImageTextRetrieval
from modeling_efficientvlm.pipeline_efficientvlm import save_pipeline_files
from tests.conftest import run_clean_python, tiny_config, tiny_inputs
from tests.conftest import tiny_processor
from efficientvlm.training.commands.cli import main


def _folder(tmp_path):
    torch.manual_seed(0)
    model = EfficientVLMForImageTextRetrieval(tiny_config()).eval()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tiny_processor().save_pretrained(folder)
    save_pipeline_files(folder)
    return model, folder


def _load_by_repo_id(hub_url: str, repo_id: str, inputs_path: str) -> dict:
    out = run_clean_python(
        f"""
        import json, torch
        from PIL import Image
        from transformers import AutoModel, pipeline
        model = AutoModel.from_pretrained({repo_id!r}, trust_remote_code=True).eval()
        inputs = torch.load({inputs_path!r}, weights_only=True)
        with torch.no_grad():
            itm = model(**inputs, compute_itm=True).itm_logits
        pipe = pipeline("image-text-retrieval", model={repo_id!r}, trust_remote_code=True)
        ranked = pipe("a red circle", [Image.new("RGB", (32, 32), c) for c in ("red", "blue")], top_k=2)
        print(json.dumps({{"itm": itm.tolist(), "n": len(ranked)}}))
        """,
        env={"HF_ENDPOINT": hub_url, "HF_HUB_OFFLINE": "0"},
    )
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_cli_push_then_load_by_repo_id(local_hub, tmp_path):
    model, folder = _folder(tmp_path)
    inputs = tiny_inputs()
    torch.save(inputs, tmp_path / "inputs.pt")
    assert main(["push", "--model", str(folder), "--repo_id", "tester/efficientvlm-tiny",
                 "--endpoint", local_hub.url, "--token", "test"]) == 0
    result = _load_by_repo_id(local_hub.url, "tester/efficientvlm-tiny", str(tmp_path / "inputs.pt"))
    torch.testing.assert_close(torch.tensor(result["itm"]), model(**inputs, compute_itm=True).itm_logits,
                               atol=1e-5, rtol=1e-5)
    assert result["n"] == 2


def test_model_push_to_hub_carries_remote_code(local_hub, tmp_path):
    from huggingface_hub import HfApi

    model, _ = _folder(tmp_path)
    model.push_to_hub("tester/pushed-directly", token="test")
    files = set(HfApi(endpoint=local_hub.url, token="test").list_repo_files("tester/pushed-directly"))
    assert {"config.json", "model.safetensors", "modeling_efficientvlm.py", "configuration_efficientvlm.py"} <= files
