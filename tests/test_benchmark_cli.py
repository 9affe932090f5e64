"""Benchmark arithmetic and the CLI surface (no timing is asserted)."""

import json
import subprocess
import sys

import pytest
import torch

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
    for key in ("device", "dtype", "threads", "eval_images", "text_length", "itm_k", "repeats", "weights",
                "image_size"):
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
    result = subprocess.run([sys.executable, "-m", "efficientvlm.training.commands.cli", "prune", "--help"],
                            capture_output=True, text=True)
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


def test_bench_decomposes_the_speedup_into_model_and_engine(tmp_path, capsys):
    """The retrieval path is timed on both re-rank engines (cached image K/V, and per pair as the official X-VLM
    code), in the same rounds: speedup (same engine), engine_gain (same model), speedup_vs_reference_engine (over the
    teacher run per pair) = speedup × the teacher's engine gain; FLOPs for both engines."""
    out = tmp_path / "bench.json"
    assert main(["bench", "--preset", "tiny", "--repeats", "2", "--warmup", "0", "--eval_images", "2",
                 "--num_texts", "2", "--itm_k", "1", "--output_json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["protocol"]["engine"] == {"reuse_image_kv": True}
    assert data["protocol"]["reference_engine"] == {"reuse_image_kv": False}
    assert "one fusion pass per pair" in data["protocol"]["reference_path"]
    teacher = data["models"]["teacher"]
    for entry in data["models"].values():
        assert len(entry["latency_reference_engine_runs_ms"]) == 2
        assert entry["engine_gain"] > 0 and entry["speedup_vs_reference_engine"] > 0
        assert entry["engine_gain_min"] <= entry["engine_gain_max"]
        assert entry["engine_gain"] == pytest.approx(entry["latency_reference_engine_ms"] / entry["latency_ms"])
        assert entry["speedup_vs_reference_engine"] == pytest.approx(entry["speedup"] * teacher["engine_gain"])
        # 2 images in (2 + 2) * 1 pairs: the cached engine projects the image K/V twice, the reference four times
        assert entry["gflops_reference_engine"] > entry["gflops"]
        assert entry["flops_speedup_vs_reference_engine"] == pytest.approx(
            teacher["gflops_reference_engine"] / entry["gflops"])
    printed = capsys.readouterr().out
    assert "Engines: reuse_image_kv=True" in printed and "engine gain" in printed


def test_retrieval_workload_runs_the_engine_its_data_names(monkeypatch):
    """`Task.workload` reads the engine from the data arguments: the cached engine builds image K/V caches, the
    reference engine (reuse_image_kv=False, what bench times as the official code's) never does."""
    import dataclasses

    from efficientvlm.training.commands.bench import bench_data, build_models
    from efficientvlm.training.tasks import get_task
    from modeling_efficientvlm import EfficientVLMForImageTextRetrieval

    task = get_task("retrieval")
    args = BenchArguments(preset="tiny", eval_images=2, num_texts=2, itm_k=1)
    model = build_models(args, task)[0]["pruned"].eval()
    data, processor, held_out = bench_data(task, args, model.config.vision_config.image_size)
    calls = []
    build = EfficientVLMForImageTextRetrieval.image_key_value_cache
    monkeypatch.setattr(EfficientVLMForImageTextRetrieval, "image_key_value_cache",
                        lambda self, *a, **kw: calls.append(1) or build(self, *a, **kw))
    cached = task.workload(model, processor, data, held_out, 2)()
    assert calls
    calls.clear()
    reference = task.workload(model, processor, dataclasses.replace(data, **task.engines[1]), held_out, 2)()
    assert not calls
    for a, b in zip(cached, reference):
        assert torch.allclose(a, b, atol=1e-5)
