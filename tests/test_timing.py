"""The one timing harness (`training.infra.timing`): torch.utils.benchmark samples, interleaved round robin, and the
summary fields bench and the demo read (no timing threshold is asserted)."""

import pytest
import torch

from efficientvlm.training.infra.timing import measure_interleaved, speedup_summary, summarize


def test_interleaved_samples_alternate_and_summaries_have_their_fields():
    calls = []
    x = torch.randn(64, 64)
    workloads = {"teacher": lambda: calls.append("teacher") or x @ x, "model": lambda: calls.append("model") or x + x}
    ticks = []
    threads = torch.get_num_threads()
    times = measure_interleaved(workloads, 3, warmup=1, after_run=lambda: ticks.append(1))
    assert torch.get_num_threads() == threads  # Timer runs at the caller's thread count and restores it
    assert set(times) == {"teacher", "model"} and all(len(t) == 3 for t in times.values())
    assert all(t > 0 and t == t for runs in times.values() for t in runs)  # positive, not NaN
    assert len(ticks) == 2 * (1 + 3)  # one per warm-up call and per sample
    turns = [name for i, name in enumerate(calls) if i == 0 or calls[i - 1] != name]
    assert turns == ["teacher", "model"] * 4  # the warm-up round, then three timed rounds, models in turn
    summary = summarize(times["model"])
    assert set(summary) == {"median_ms", "min_ms", "max_ms"}
    assert summary["min_ms"] <= summary["median_ms"] <= summary["max_ms"]
    paired = speedup_summary(times["teacher"], times["model"])
    assert set(paired) == {"median", "min", "max", "runs"} and paired["runs"] == 3
    assert paired["min"] <= paired["median"] <= paired["max"]


def test_min_run_time_loops_calls_per_sample_and_errors():
    calls = []
    times = measure_interleaved({"f": lambda: calls.append(1)}, 2, warmup=0, min_run_time=0.001)
    assert len(times["f"]) == 2 and len(calls) > 2  # blocks of calls per sample
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        measure_interleaved({"f": lambda: None}, 0)
    with pytest.raises(ValueError, match="paired timings"):
        speedup_summary([1.0], [1.0, 2.0])
