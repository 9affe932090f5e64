"""The one latency harness: timed runs of a zero-argument workload (CUDA-synchronised), alone or interleaved
round-robin across models so that drift (thermal, other processes) hits every model alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def _sync(device: torch.device | None) -> Callable[[], None]:
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def summarize(times_ms: list[float]) -> dict[str, float]:
    """{"median_ms", "min_ms", "max_ms"} of a list of timings."""
    return {"median_ms": statistics.median(times_ms), "min_ms": min(times_ms), "max_ms": max(times_ms)}


def speedup_summary(base_ms: list[float], times_ms: list[float]) -> dict[str, float]:
    """Speed-up of a workload over a base timed in the same round robin (`measure_interleaved`).

    Each repeat gives one ratio base[i] / times[i] (drift within a round hits both alike); returns
    {"median", "min", "max", "runs"} of those ratios, so a card can show the spread and not one noisy number.
    """
    if len(base_ms) != len(times_ms) or not times_ms:
        raise ValueError(f"paired timings needed: {len(base_ms)} base runs vs {len(times_ms)} runs")
    ratios = [b / t for b, t in zip(base_ms, times_ms)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "runs": len(ratios)}


def measure_interleaved(
    workloads: dict[str, Callable[[], object]], repeats: int, warmup: int = 2, device: torch.device | None = None,
    after_run: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Timings (ms) per workload; each repeat runs every workload once in turn (round robin). `after_run` is called
    after each call (warm-up or timed), outside the timed region."""
    sync = _sync(device)
    after_run = after_run or (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in workloads}
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in workloads.values():
                fn()
                after_run()
        sync()
        for _ in range(repeats):
            for name, fn in workloads.items():
                start = time.perf_counter()
                fn()
                sync()
                times[name].append((time.perf_counter() - start) * 1000)
                after_run()
    return times
