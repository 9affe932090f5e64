"""Benchmark arithmetic and the CLI surface (no timing is asserted)."""

import json
import subprocess
import sys

import pytest

from efficientvlm.training.commands.bench import (
    BenchArguments,
    parse_split,
    run_benchmark,
    uniformly_pruned_config,
    xvlm_clip_config,
)
from efficientvlm.training.commands.cli import COMMANDS, main
from efficientvlm.training.method.structure import count_parameters, prunable_parameters
from efficientvlm.training.method.student import student_config


def test_xvlm_clip_preset_matches_the_paper_sizes():
    teacher = xvlm_clip_config(224)
    student = student_config(teacher)
    assert count_parameters(teacher)["total"] / 1e6 == pytest.approx(210.5, abs=0.1)
    assert count_parameters(student)["total"] / 1e6 == pytest.approx(118.3, abs=0.1)
    prunable = prunable_parameters(student)
    assert prunable["total"] / 1e6 == pytest.approx(92.1, abs=0.5)
    shares = {m: prunable[m] / prunable["total"] for m in ("vision", "text", "fusion")}
    assert shares == pytest.approx({"vision": 0.46, "text": 0.23, "fusion": 0.31}, abs=0.01)


def test_uniform_pruning_hits_the_requested_split():
    student = student_config(xvlm_clip_config(224))
    pruned = uniformly_pruned_config(student, parse_split("vision=0.25,text=0.5,fusion=0.25", 0.25))
    before, after = prunable_parameters(student), prunable_parameters(pruned)
    assert 1 - after["text"] / before["text"] == pytest.approx(0.5, abs=0.01)
    assert 1 - after["vision"] / before["vision"] == pytest.approx(0.25, abs=0.01)
    with pytest.raises(ValueError, match="entries must look like vision=0.2"):
        parse_split("eyes=0.3", 0.25)


def test_tiny_benchmark_reports_protocol_and_ratios(tmp_path):
    result = run_benchmark(BenchArguments(preset="tiny", repeats=2, warmup=1, eval_images=2, num_texts=2, itm_k=1))
    protocol = result["protocol"]
    for key in ("device", "dtype", "threads", "eval_images", "text_length", "itm_k", "repeats", "weights", "image_size"):
        assert key in protocol
    teacher, pruned = result["models"]["teacher"], result["models"]["pruned"]
    assert teacher["speedup"] == 1.0 and teacher["speedup_over_flops_ratio"] == 1.0
    assert pruned["gflops"] < result["models"]["student"]["gflops"] < teacher["gflops"]
    assert pruned["speedup_over_flops_ratio"] == pytest.approx(pruned["speedup"] / pruned["flops_speedup"])


def test_bench_times_the_models_round_robin(monkeypatch):
    """Every round of a workload runs each model once in turn (drift hits all alike), and the speed-up range is the
    spread of the per-round paired ratios."""
    from efficientvlm.training.commands import bench

    calls = []
    build = bench.build_models

    def hooked(args, task=None):
        models, source = build(args, task)
        for name, model in models.items():
            model.fusion_model.register_forward_pre_hook(lambda *_, name=name: calls.append(name))
        return models, source

    monkeypatch.setattr(bench, "build_models", hooked)
    args = BenchArguments(preset="tiny", repeats=3, warmup=1, eval_images=2, num_texts=2, itm_k=1)
    result = bench.run_benchmark(args)
    rounds = args.warmup + args.repeats
    # the fusion workload is timed last: its runs alternate teacher, student, pruned in every round (a timed sample
    # is a Timer's sizing call + its blocks: consecutive calls of one model)
    turns = [name for i, name in enumerate(calls) if i == 0 or calls[i - 1] != name]
    assert turns[-3 * rounds:] == ["teacher", "student", "pruned"] * rounds
    for entry in result["models"].values():
        assert len(entry["latency_runs_ms"]) == args.repeats and entry["speedup_runs"] == args.repeats
        assert entry["speedup_min"] <= entry["speedup_max"]
    teacher, pruned = result["models"]["teacher"], result["models"]["pruned"]
    paired = [t / p for t, p in zip(teacher["latency_runs_ms"], pruned["latency_runs_ms"])]
    assert (pruned["speedup_min"], pruned["speedup_max"]) == (min(paired), max(paired))
    assert "round robin" in result["protocol"]["timing"]


def test_bench_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "--preset", "tiny", "--repeats", "1", "--warmup", "0", "--eval_images", "2",
                 "--num_texts", "2", "--itm_k", "1", "--output_json", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert set(data["models"]) == {"teacher", "student", "pruned"}
    for entry in data["models"].values():
        assert {"params", "gflops", "latency_ms", "speedup", "speedup_over_flops_ratio"} <= set(entry)
    assert "Protocol:" in capsys.readouterr().out


@pytest.mark.slow
def test_cli_help_and_errors(capsys):
    assert main([]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in COMMANDS)
    assert main(["nope"]) == 2
    assert main(["bench", "--preset", "huge"]) == 2
    assert "--preset must be one of" in capsys.readouterr().err
    result = subprocess.run([sys.executable, "-m", "efficientvlm.training.commands.cli", "prune", "--help"], capture_output=True, text=True)
    assert "--target_sparsity" in result.stdout and "Global target sparsity" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("task", ["retrieval", "nlvr2", "vqa", "captioning"])
def test_bench_runs_every_task_and_writes_its_name(task, tmp_path, capsys):
    """`bench --task T` times the task's own workload (`Task.workload`) and prices its path (`Task.flops`); the JSON
    has the retrieval fields plus the task name."""
    from efficientvlm.training.tasks import get_task

    out = tmp_path / "bench.json"
    assert main(["bench", "--task", task, "--preset", "tiny", "--repeats", "1", "--warmup", "0", "--eval_images", "2",
                 "--num_texts", "2", "--itm_k", "1", "--output_json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["task"] == data["protocol"]["task"] == task
    assert set(data["models"]) == {"teacher", "student", "pruned"}
    for entry in data["models"].values():
        assert {"params", "gflops", "latency_ms", "latency_runs_ms", "speedup", "speedup_min", "speedup_max",
                "flops_speedup", "flops_ratio", "speedup_over_flops_ratio", "throughput_images_per_s"} <= set(entry)
        assert set(entry["encoders"]) == {"vision", "text", "fusion"}
    teacher, pruned = data["models"]["teacher"], data["models"]["pruned"]
    assert pruned["gflops"] < teacher["gflops"] and teacher["speedup"] == 1.0
    sizes = data["protocol"]["path_sizes"]
    assert set(sizes) == set(get_task(task).path_sizes) | {"image_tokens"}
    assert data["protocol"]["path"].startswith(f"{task}: ")
    printed = capsys.readouterr().out
    assert "Protocol:" in printed and "Per encoder" in printed


def test_bench_rejects_a_task_without_a_cost_model_and_unpaired_texts():
    with pytest.raises(ValueError, match="declares no inference-path cost model"):
        BenchArguments(task="nlvr2_domain")
    with pytest.raises(ValueError, match="must equal --eval_images"):
        BenchArguments(eval_images=4, num_texts=8)
