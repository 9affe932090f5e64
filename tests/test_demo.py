"""`efficientvlm demo --quick` end to end, then the outputs used as a Hub user would (clean interpreter)."""

import json
import re

import pytest

from tests.conftest import run_clean_python
from efficientvlm.training.commands.cli import main

pytestmark = pytest.mark.slow  # runs the demo, then its snippets in fresh interpreters


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    # the quick profile with shorter stages: this checks the chain, the report and the folders, not the numbers
    assert main(["demo", "--quick", "--distill_steps", "12", "--prune_steps", "24", "--output_dir", str(out)]) == 0
    return out


def test_report_has_every_model_and_field(demo_dir):
    report = json.loads((demo_dir / "report.json").read_text())
    models = report["models"]
    assert set(models) == {"teacher", "student", "pruned", "student_no_kd", "pruned_no_kd", "pruned_uniform"}
    for entry in models.values():
        for key in ("params", "r_mean", "r_mean_itc", "latency_ms", "speedup", "txt_r1", "img_r1",
                    "sparsity_vs_teacher", "r_mean_fraction_of_teacher", "r_mean_ci95", "twin_accuracy"):
            assert key in entry
        assert 0 <= entry["r_mean_ci95"][0] <= entry["r_mean"] <= entry["r_mean_ci95"][1] <= 100
        assert 0 <= entry["twin_accuracy"] <= 100
    # the hard protocol: 5 captions per image, 3 twins per image (quick: 64 images = 16 whole groups)
    assert report["eval_protocol"] == {"name": "twins", "images": 64, "captions_per_image": 5, "twins_per_image": 3}
    assert set(report["paired"]) == {"student_kd_minus_no_kd", "pruned_kd_minus_no_kd", "pruned_learned_minus_uniform"}
    for difference in report["paired"].values():
        assert difference["ci95"][0] <= difference["mean"] <= difference["ci95"][1]
    uniform = models["pruned_uniform"]["sparsity_vs_student"]  # the same share off every encoder
    assert max(uniform[m] for m in ("vision", "text", "fusion")) - min(uniform[m] for m in ("vision", "text",
                                                                                          "fusion")) < 0.02
    assert models["teacher"]["speedup"] == 1.0
    assert models["pruned"]["params"] < models["student"]["params"] < models["teacher"]["params"]
    assert models["student_no_kd"]["params"] == models["student"]["params"]  # same student, trained without KD
    for name in ("pruned", "pruned_no_kd", "pruned_uniform"):
        assert set(models[name]["sparsity_vs_student"]) == {"vision", "text", "fusion", "total"}
    assert "threads" in report["protocol"]["latency"]
    # the teacher is the shipped, converged one, and the report says where it came from
    provenance = report["teacher_provenance"]
    assert provenance["source"].endswith("demo_teacher") and provenance["learning_curve"]["converged"]
    assert {"teacher_eval", "student", "pruned", "student_no_kd", "pruned_no_kd", "latency"} <= set(
        report["stage_seconds"])
    for name in models:
        folder = demo_dir / name
        for file in ("model.safetensors", "config.json", "README.md", "structure.png", "processor_config.json",
                     "modeling_efficientvlm.py", "pipeline_efficientvlm.py"):
            assert (folder / file).exists(), f"{name}/{file}"


def test_pruned_folder_loads_and_ranks_without_our_package(demo_dir):
    out = run_clean_python(
        f"""
        import json
        from transformers import AutoModel, AutoProcessor, pipeline
        from PIL import Image
        path = {str(demo_dir / "pruned")!r}
        model = AutoModel.from_pretrained(path, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
        pipe = pipeline("image-text-retrieval", model=path, trust_remote_code=True)
        gallery = [Image.new("RGB", (48, 48), c) for c in ("red", "green", "blue")]
        ranked = pipe("a big red circle", gallery, top_k=3, rerank_k=2)
        print(json.dumps({{"n": len(ranked), "indices": sorted(r["index"] for r in ranked),
                          "heads": model.config.vision_config.num_attention_heads}}))
        """
    )
    result = json.loads(out.strip().splitlines()[-1])
    assert result["n"] == 3 and result["indices"] == [0, 1, 2]
    config = json.loads((demo_dir / "pruned" / "config.json").read_text())
    assert result["heads"] == config["vision_config"]["num_attention_heads"]


def test_model_card_usage_snippets_run(demo_dir):
    card = (demo_dir / "pruned" / "README.md").read_text()
    assert "model-index" in card and "image-text-retrieval" in card
    blocks = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    assert len(blocks) == 2
    for block in blocks:
        run_clean_python(block.replace("path/to/this/folder", str(demo_dir / "pruned")))


def test_readme_usage_snippet_runs_on_the_demo_output(demo_dir):
    readme = (__import__("pathlib").Path(__file__).parent.parent / "README.md").read_text()
    block = re.search(r"## Usage.*?```python\n(.*?)```", readme, flags=re.S).group(1)
    assert "demo_output/pruned" in block
    run_clean_python(block.replace("demo_output/pruned", str(demo_dir / "pruned")))
