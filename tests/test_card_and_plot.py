"""What the published card, the structure plot, bench and the demo's help say (issue #21 items 3-6)."""

import json

import pytest
import torch

from modeling_efficientvlm import EfficientVLMForImageTextRetrieval, EfficientVLMForPreTraining
from tests.conftest import ragged_config, tiny_config
from tests.conftest import tiny_processor
from efficientvlm.training.infra import timing as latency
from efficientvlm.training.commands.cli import main
from efficientvlm.training.commands.export import (
    LOCAL_REPO,
    STRUCTURE_KINDS,
    render_card,
    save_hub_ready,
    sparsity_report,
    structure_figure,
)

SPREAD = {"speedup": 1.8, "speedup_min": 1.55, "speedup_max": 2.1, "speedup_runs": 3}


def _card(tmp_path, extra: dict) -> str:
    report = sparsity_report(ragged_config(), tiny_config())
    render_card(str(tmp_path), "tiny-pruned", report, None, extra)
    return (tmp_path / "README.md").read_text()


def test_compression_row_names_the_reference_and_the_speedup_spread(tmp_path):
    card = _card(tmp_path, {"reference_name": "the teacher (tiny-teacher)", "speedup_baseline": "the teacher",
                            **SPREAD})
    report = sparsity_report(ragged_config(), tiny_config())
    row = next(line for line in card.splitlines() if line.startswith("| tiny-pruned |"))
    assert f"of the teacher (tiny-teacher): {report['reference_params'] / 1e6:.2f}M)" in row
    assert "1.80x (median; range 1.55–2.10x, 3 runs)" in row
    assert "speed-up over the teacher |" in card
    assert "of reference)" not in card


def test_speedup_without_spread_says_so(tmp_path):
    card = _card(tmp_path, {"speedup": 1.8})
    assert "1.80x (one figure, no spread recorded)" in card
    assert "not measured" in _card(tmp_path, {})


def test_speedup_summary_pairs_the_interleaved_runs():
    summary = latency.speedup_summary([10.0, 20.0, 30.0], [5.0, 10.0, 10.0])
    assert summary == {"median": 2.0, "min": 2.0, "max": 3.0, "runs": 3}
    with pytest.raises(ValueError, match="paired timings"):
        latency.speedup_summary([1.0], [1.0, 2.0])


def test_demo_latency_carries_the_speedup_spread(monkeypatch):
    from efficientvlm.training.commands.demo import _latency
    from efficientvlm.training.commands.stages import DataArguments, eval_set

    fake = {"teacher": [10.0, 20.0, 30.0], "pruned": [5.0, 10.0, 10.0]}
    monkeypatch.setattr(latency, "measure_interleaved", lambda workloads, *a, **k: {n: fake[n] for n in workloads})
    data = DataArguments(image_size=32, eval_images=2, itm_k=1)
    models = {"teacher": EfficientVLMForImageTextRetrieval(tiny_config()),
              "pruned": EfficientVLMForImageTextRetrieval(ragged_config())}
    out = _latency(models, tiny_processor(), data, eval_set(data), repeats=3)
    assert out["pruned"]["speedup"] == 2.0 and out["pruned"]["latency_runs"] == 3
    assert (out["pruned"]["speedup_min"], out["pruned"]["speedup_max"]) == (2.0, 3.0)
    assert out["teacher"]["speedup"] == out["teacher"]["speedup_min"] == out["teacher"]["speedup_max"] == 1.0


def test_push_writes_the_repo_id_into_the_published_card(local_hub, tmp_path):
    from huggingface_hub import hf_hub_download

    torch.manual_seed(0)
    folder = tmp_path / "export"
    save_hub_ready(EfficientVLMForImageTextRetrieval(ragged_config()).eval(), tiny_processor(), str(folder),
                   model_name="tiny-pruned", reference_config=tiny_config())
    local = (folder / "README.md").read_text()
    assert f'"{LOCAL_REPO}"' in local
    assert main(["push", "--model", str(folder), "--repo_id", "tester/card-repo", "--endpoint", local_hub.url,
                 "--token", "test"]) == 0
    published = open(hf_hub_download("tester/card-repo", "README.md", token="test")).read()
    assert 'from_pretrained("tester/card-repo"' in published and 'model="tester/card-repo"' in published
    assert LOCAL_REPO not in published
    assert (folder / "README.md").read_text() == local  # the local folder is left as exported
    config = json.load(open(hf_hub_download("tester/card-repo", "config.json", token="test")))
    assert config["vision_config"]["num_attention_heads"] == [3, 0]


def _bar_colours(fig) -> list[dict[str, tuple]]:
    """Per panel: legend label of each bar series → its face colour."""
    return [{c.get_label(): tuple(c.patches[0].get_facecolor()) for c in ax.containers} for ax in fig.axes]


def test_structure_plot_one_colour_per_kind_integer_ticks_one_outside_legend():
    import matplotlib.pyplot as plt

    fig = structure_figure(ragged_config(), tiny_config(), reference_name="tiny-teacher")
    try:
        panels = _bar_colours(fig)
        assert [set(p) for p in panels] == [{"self-attn heads", "FFN width"}] * 2 + [
            {"self-attn heads", "cross-attn heads", "FFN width"}]
        for label, _ in STRUCTURE_KINDS.values():
            assert len({p[label] for p in panels if label in p}) == 1, label  # the same colour in every panel
        assert len(set(panels[2].values())) == 3
        for ax in fig.axes:
            layers = len(ax.containers[0].patches)
            assert list(ax.get_xticks()) == list(range(layers))
            for i in range(layers):  # each layer's bar group is centred on its integer tick
                centres = [c.patches[i].get_x() + c.patches[i].get_width() / 2 for c in ax.containers]
                assert sum(centres) / len(centres) == pytest.approx(i)
            assert ax.get_legend() is None
        assert len(fig.legends) == 1
        assert "tiny-teacher" in fig.get_suptitle() and "kept fraction" in fig.get_suptitle().lower()
    finally:
        plt.close(fig)


def test_bench_with_checkpoints_prints_them_loads_their_class_and_shows_progress(tmp_path, capsys):
    from efficientvlm.training.commands.bench import BenchArguments, build_models

    torch.manual_seed(0)
    teacher, pruned = tmp_path / "teacher", tmp_path / "pruned"
    EfficientVLMForPreTraining(tiny_config()).save_pretrained(teacher)
    EfficientVLMForImageTextRetrieval(ragged_config()).save_pretrained(pruned)
    models, _ = build_models(BenchArguments(model=[f"teacher={teacher}"]))
    assert type(models["teacher"]) is EfficientVLMForPreTraining  # its own class: no UNEXPECTED mlm_head
    capsys.readouterr()
    assert main(["bench", "--model", f"teacher={teacher}", f"pruned={pruned}", "--repeats", "1", "--warmup", "1",
                 "--eval_images", "2", "--num_texts", "2", "--text_length", "8", "--itm_k", "1",
                 "--output_json", str(tmp_path / "bench.json")]) == 0
    out, err = capsys.readouterr()
    assert f"teacher={teacher}" in out and f"pruned={pruned}" in out and "preset=" not in out
    # the progress bar: 2 models × 5 workloads (the path on both re-rank engines + 3 encoders) × (1 warm-up + 1 timed)
    assert "20/20" in err
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["protocol"]["models"] == {"teacher": str(teacher), "pruned": str(pruned)}
    entry = result["models"]["pruned"]
    assert entry["speedup_min"] <= entry["speedup"] <= entry["speedup_max"]


def test_bench_rejects_a_checkpoint_without_a_retrieval_path(tmp_path):
    from modeling_efficientvlm import EfficientVLMForVisualReasoning
    from efficientvlm.training.commands.bench import load_checkpoint

    EfficientVLMForVisualReasoning(tiny_config()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="EfficientVLMForVisualReasoning checkpoint"):
        load_checkpoint(str(tmp_path))


def test_demo_quick_help_says_exactly_what_changes():
    from dataclasses import fields

    from efficientvlm.training.commands.demo import PROFILES, DemoArguments

    text = next(f for f in fields(DemoArguments) if f.name == "quick").metadata["help"]
    default, quick = PROFILES["default"], PROFILES["quick"]
    for key in default:
        if default[key] != quick[key]:
            assert f"{default[key]} → {quick[key]}" in text, key
        else:
            assert f"{key} {default[key]}" in text, key


def test_pin_memory_only_with_an_accelerator(tmp_path, monkeypatch):
    from efficientvlm.training.method import arguments

    assert not arguments.DistillationArguments(output_dir=str(tmp_path), use_cpu=True).dataloader_pin_memory
    monkeypatch.setattr(arguments, "_accelerator_available", lambda: False)
    assert not arguments.PruningArguments(output_dir=str(tmp_path)).dataloader_pin_memory
    monkeypatch.setattr(arguments, "_accelerator_available", lambda: True)
    assert arguments.DistillationArguments(output_dir=str(tmp_path)).dataloader_pin_memory
