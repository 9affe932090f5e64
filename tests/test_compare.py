"""NLVR2 stages in the CLI, the uniform / manual / learned split comparison and the analysis' recovery fine-tune."""

import json
import re

import pytest
import torch

from modeling_efficientvlm import EfficientVLMForImageTextRetrieval, EfficientVLMForVisualReasoning
from tests.conftest import tiny_config
from tests.conftest import CLI_COMMON, cli_teacher_and_student
from efficientvlm.training.commands.cli import main
from efficientvlm.training.commands.compare import default_manual_split, resolve_split, strategy_targets
from efficientvlm.training.method.structure import prunable_parameters

TINY_PRUNE = ["--max_steps", "3", "--reg_learning_rate", "0.5", "--latency_repeats", "2", "--latency_batch", "4"]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """tiny teacher → student (general distillation) → NLVR2 teacher fine-tuned from the teacher (2 steps each)."""
    root = tmp_path_factory.mktemp("nlvr2_chain")
    cli_teacher_and_student(root)
    assert main(["teacher", "--task", "nlvr2", "--init_from", str(root / "teacher"), "--output_dir",
                 str(root / "nlvr2_teacher"), "--max_steps", "2", *CLI_COMMON]) == 0
    return root


def test_resolve_split_solves_auto_entries_for_the_total():
    config = tiny_config()
    params = prunable_parameters(config)
    split = resolve_split("vision=0.1,text=auto,fusion=auto", config, 0.4)
    assert split["vision"] == 0.1 and split["text"] == split["fusion"]
    total = sum(split[m] * params[m] for m in ("vision", "text", "fusion")) / params["total"]
    assert total == pytest.approx(0.4)
    by_hand = (0.4 * params["total"] - 0.1 * params["vision"]) / (params["text"] + params["fusion"])
    assert split["text"] == pytest.approx(by_hand)
    assert resolve_split("vision=0.4,text=0.4,fusion=0.4", config, 0.4) == pytest.approx(
        {"vision": 0.4, "text": 0.4, "fusion": 0.4})


@pytest.mark.parametrize("split, message", [
    ("vision=0.1,text=0.2", "does not name ['fusion']"),
    ("vision=0.1,text=0.2,fusion=0.2", "totals"),
    ("vision=0.0,text=0.0,fusion=auto", "would need sparsity"),
    ("vision=1.5,text=auto,fusion=auto", "must lie in [0, 1)"),
    ("vision=0.1,vision=0.2,fusion=auto", "once"),
    ("image=0.1,text=auto,fusion=auto", "once"),
    ("vision=x,text=auto,fusion=auto", "expected a number"),
])
def test_resolve_split_errors_name_the_cause(split, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        resolve_split(split, tiny_config(), 0.4)


def test_strategy_targets_and_default_manual_splits():
    config = tiny_config()
    assert strategy_targets("learned", {}, 0.4, config) == {
        "vision_target": None, "text_target": None, "fusion_target": None}
    assert strategy_targets("uniform", {}, 0.4, config) == {
        "vision_target": 0.4, "text_target": 0.4, "fusion_target": 0.4}
    split = {"vision": 0.2, "text": 0.5, "fusion": 0.5}
    assert strategy_targets("manual", split, 0.4, config) == {
        "vision_target": 0.2, "text_target": 0.5, "fusion_target": 0.5}


def test_vqa_splits_name_the_answer_decoder():
    """A VQA model's answer decoder is a fourth stack: manual splits must name it, uniform holds it to the target."""
    from modeling_efficientvlm.configuration_efficientvlm import decoder_config_from_fusion

    config = tiny_config()
    config.decoder_config = decoder_config_from_fusion(config)
    assert strategy_targets("uniform", {}, 0.4, config)["decoder_target"] == 0.4
    split = resolve_split("vision=0.1,text=auto,fusion=auto,decoder=auto", config, 0.4)
    assert set(split) == {"vision", "text", "fusion", "decoder"}
    with pytest.raises(ValueError, match=r"does not name \['decoder'\]"):
        resolve_split("vision=0.1,text=auto,fusion=auto", config, 0.4)
    assert default_manual_split("retrieval", 0.4) == "vision=0.2,text=auto,fusion=auto"
    assert default_manual_split("nlvr2", 0.4) == "vision=auto,text=auto,fusion=0.6"


def test_nlvr2_teacher_and_prune_stages(chain, capsys):
    capsys.readouterr()  # the chain's own output
    teacher = EfficientVLMForVisualReasoning.from_pretrained(chain / "nlvr2_teacher")
    assert teacher.config.architectures == ["EfficientVLMForVisualReasoning"]
    assert 0 <= json.loads((chain / "nlvr2_teacher" / "eval_results.json").read_text())["accuracy"] <= 100
    out = chain / "nlvr2_pruned"
    assert main(["prune", "--task", "nlvr2", "--student", str(chain / "student"), "--teacher",
                 str(chain / "nlvr2_teacher"), "--output_dir", str(out), "--max_steps", "3", "--lambda_vlp", "0.8",
                 "--target_sparsity", "0.3", *CLI_COMMON]) == 0
    assert '"expected_sparsity"' in capsys.readouterr().out
    assert 0 <= json.loads((out / "eval_results.json").read_text())["accuracy"] <= 100
    from efficientvlm.training.commands.export import load_pruned

    pruned, expected = load_pruned(str(out))
    assert isinstance(pruned, EfficientVLMForVisualReasoning) and set(expected) >= {"vision", "text", "fusion"}
    assert main(["evaluate", "--task", "nlvr2", "--model", str(out), "--image_size", "32", "--eval_images", "8"]) == 0
    assert 0 <= json.loads(capsys.readouterr().out)["accuracy"] <= 100
    assert main(["distill", "--task", "nlvr2", "--teacher", str(chain / "teacher"), "--output_dir",
                 str(chain / "x")]) == 2
    assert "general (task-agnostic) distillation" in capsys.readouterr().err


@pytest.mark.parametrize("task", ["retrieval", "nlvr2"])
def test_compare_splits_runs_three_strategies_at_equal_total(chain, tmp_path, capsys, task):
    teacher = chain / ("nlvr2_teacher" if task == "nlvr2" else "teacher")
    out = tmp_path / "compare"
    assert main(["compare-splits", "--task", task, "--student", str(chain / "student"), "--teacher", str(teacher),
                 "--output_dir", str(out), "--target_sparsity", "0.4", "--manual_split",
                 "vision=0.2,text=auto,fusion=auto", *TINY_PRUNE, *CLI_COMMON]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "comparison.json").read_text())
    assert report["task"] == task and report["metric"] == ("accuracy" if task == "nlvr2" else "r_mean")
    assert list(report["strategies"]) == ["uniform", "manual", "learned"]
    manual = report["strategies"]["manual"]["targets"]
    assert manual["vision"] == 0.2 and manual["text"] == pytest.approx(manual["fusion"])
    assert report["strategies"]["uniform"]["targets"] == {"vision": 0.4, "text": 0.4, "fusion": 0.4}
    for name, entry in report["strategies"].items():
        # the materialized checkpoint really is that size, and its structure matches the reported split
        assert 0 < entry["params"] <= report["student"]["params"]
        assert entry["latency"]["median_ms"] > 0 and entry["speedup_vs_student"] > 0
        assert set(entry["sparsity"]) == {"vision", "text", "fusion", "total"}
        assert (out / name / "l0_gates.safetensors").exists()
        assert name in printed
    assert (out / "comparison.png").stat().st_size > 0 and (out / "comparison.md").exists()


def test_compare_splits_flops_strategies_run_at_the_learned_splits_flops(chain, tmp_path, capsys):
    """`flops` / `flops+layers` prune with a FLOPs budget matched to what the params-budget learned split kept on
    the same path, and report the kept FLOPs of every strategy."""
    out = tmp_path / "compare_flops"
    assert main(["compare-splits", "--student", str(chain / "student"), "--teacher", str(chain / "teacher"),
                 "--output_dir", str(out), "--target_sparsity", "0.4", "--strategies", "learned,flops,flops+layers",
                 "--flops_path", "images=8,texts=40,k=2,text_length=12", *TINY_PRUNE, *CLI_COMMON]) == 0
    report = json.loads((out / "comparison.json").read_text())
    learned, flops, layers = (report["strategies"][name] for name in ("learned", "flops", "flops+layers"))
    assert learned["budget"] == "params" and flops["budget"] == "flops" and layers["layer_gates"] is True
    assert flops["targets"] == {"total": round(1 - learned["flops_kept"], 4)} == layers["targets"]
    for entry in (learned, flops, layers):
        assert 0 < entry["flops_kept"] <= 1
    assert "FLOPs kept" in capsys.readouterr().out


def test_latency_table_cli_then_compare_splits_latency_strategy_and_its_export(chain, tmp_path, capsys):
    """`efficientvlm latency-table` writes a table for the student; `compare-splits --strategies learned,latency+layers
    --latency_table` prunes at the latency the learned split kept (by that table) and reports it; the export of the
    latency run records its budget kind, the device and the achieved latency share in structure.json."""
    table = tmp_path / "table.json"
    assert main(["latency-table", "--student", str(chain / "student"), "--output_json", str(table), "--budget_path",
                 "images=4,texts=8,k=2,text_length=12", "--points", "2", "--repeats", "2"]) == 0
    printed = capsys.readouterr().out
    assert "ms per unit" in printed and f"written: {table}" in printed
    priced = tmp_path / "priced.json"  # the same student priced at the tiny bench preset's (wider, deeper) shapes
    assert main(["latency-table", "--student", str(chain / "student"), "--output_json", str(priced),
                 "--price_at", "tiny", "--image_size", "64", "--points", "2", "--repeats", "1"]) == 0
    assert "priced at tiny student, 64 px" in capsys.readouterr().out
    assert json.loads(priced.read_text())["cost_path"]["vision"][0][1] == 1 + (64 // 8) ** 2
    out = tmp_path / "compare_latency"
    assert main(["compare-splits", "--student", str(chain / "student"), "--teacher", str(chain / "teacher"),
                 "--output_dir", str(out), "--target_sparsity", "0.4", "--strategies", "learned,latency+layers",
                 "--latency_table", str(table), *TINY_PRUNE, *CLI_COMMON]) == 0
    assert "table latency kept" in capsys.readouterr().out
    report = json.loads((out / "comparison.json").read_text())
    learned, latency = report["strategies"]["learned"], report["strategies"]["latency+layers"]
    assert latency["budget"] == "latency" and latency["layer_gates"] is True
    assert latency["targets"] == {"total": round(1 - learned["latency_kept"], 4)}
    assert 0 < latency["latency_kept"] <= 1 and str(table) in report["protocol"]["latency_table"]
    assert main(["export", "--model", str(out / "latency+layers"), "--output_dir", str(tmp_path / "e")]) == 0
    budget = json.loads((tmp_path / "e" / "structure.json").read_text())["budget"]
    assert budget["kind"] == "latency" and budget["latency_device"].startswith("cpu")
    assert budget["achieved"]["latency"] == pytest.approx(latency["latency_kept"])
    assert budget["path"] == json.loads(table.read_text())["cost_path"]
    card = (tmp_path / "e" / "README.md").read_text()
    assert "- **budget**: measured latency on the task's path (cpu" in card and "(+ layer gates)" in card


def test_compare_splits_rejects_a_bad_manual_split_before_training(chain, tmp_path, capsys):
    out = tmp_path / "bad"
    assert main(["compare-splits", "--student", str(chain / "student"), "--teacher", str(chain / "teacher"),
                 "--output_dir", str(out), "--manual_split", "vision=0.9,text=0.9,fusion=0.9", *CLI_COMMON]) == 2
    assert "totals" in capsys.readouterr().err and not out.exists()


def test_recovery_fine_tune_trains_a_copy(chain):
    from efficientvlm.training.commands.analysis import recovery_fine_tune
    from efficientvlm.training.commands.stages import DataArguments, load_processor

    model = EfficientVLMForImageTextRetrieval.from_pretrained(chain / "student").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = DataArguments(image_size=32)
    tuned = recovery_fine_tune(model, load_processor(data, str(chain / "student")), data, steps=2,
                               learning_rate=1e-3, batch_size=4, seed=0)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the original is untouched
    assert any(not torch.equal(v, tuned.state_dict()[k]) for k, v in before.items())
    assert not tuned.training


def test_analyze_modules_with_recovery_on_nlvr2(chain, tmp_path, capsys):
    out = tmp_path / "analysis"
    assert main(["analyze-modules", "--task", "nlvr2", "--model", str(chain / "nlvr2_teacher"), "--ratios", "0.3",
                 "--recovery_steps", "1", "--recovery_batch_size", "4", "--output_dir", str(out), "--image_size",
                 "32", "--eval_images", "8"]) == 0
    result = json.loads((out / "analysis.json").read_text())
    assert result["task"] == "nlvr2" and result["metric"] == "accuracy" and result["recovery_steps"] == 1
    assert set(result["recovered_curves"]) == {"vision", "text", "fusion"}
    assert 0 <= result["baseline_recovered"] <= 100
    assert "+ fine-tune" in capsys.readouterr().out


@pytest.mark.slow
def test_nlvr2_export_card_and_its_usage_snippet_run_without_our_package(chain, tmp_path):
    from tests.conftest import run_clean_python
    from efficientvlm.training.tasks.nlvr2 import USAGE as USAGE_NLVR2

    pruned = chain / "nlvr2_pruned"
    if not pruned.exists():  # this test may run alone
        assert main(["prune", "--task", "nlvr2", "--student", str(chain / "student"), "--teacher",
                     str(chain / "nlvr2_teacher"), "--output_dir", str(pruned), "--max_steps", "2", *CLI_COMMON]) == 0
    out = tmp_path / "hub"
    assert main(["export", "--model", str(pruned), "--output_dir", str(out)]) == 0
    card = (out / "README.md").read_text()
    assert "NLVR2" in card and "accuracy" in card and "pipeline_tag" not in card and "- nlvr2" in card
    assert "AutoModelForSequenceClassification" in card and 'pipeline("image-text-retrieval"' not in card
    printed = run_clean_python(USAGE_NLVR2.format(repo=str(out)))
    assert 0 <= float(printed.strip().strip("tensor([])")) <= 1
