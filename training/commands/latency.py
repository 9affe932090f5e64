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


def time_runs(fn: Callable[[], object], warmup: int, repeats: int, device: torch.device | None = None) -> list[float]:
    """`warmup` untimed calls, then `repeats` timed ones (ms each), under inference mode, synchronised on CUDA."""
    return measure_interleaved({"run": fn}, repeats, warmup, device)["run"]


def measure_interleaved(
    workloads: dict[str, Callable[[], object]], repeats: int, warmup: int = 2, device: torch.device | None = None
) -> dict[str, list[float]]:
    """Timings (ms) per workload; each repeat runs every workload once in turn (round robin)."""
    sync = _sync(device)
    times: dict[str, list[float]] = {name: [] for name in workloads}
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in workloads.values():
                fn()
        sync()
        for _ in range(repeats):
            for name, fn in workloads.items():
                start = time.perf_counter()
                fn()
                sync()
                times[name].append((time.perf_counter() - start) * 1000)
    return times
