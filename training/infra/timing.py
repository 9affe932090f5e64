"""The one timing harness: zero-argument workloads timed with `torch.utils.benchmark.Timer`, interleaved round robin.

`Timer.blocked_autorange` does what a hand-written loop gets subtly wrong: it warms the call up while sizing its block
(enough calls per timing that the timer's own overhead is negligible), synchronises the accelerator around every
timing, and runs at a fixed torch thread count (here the caller's: `torch.get_num_threads()`, not Timer's default 1).
What it cannot do alone is compare models fairly under drift (thermal, frequency, other processes), so the models are
interleaved: every round times each workload once in turn, and each round gives one paired ratio per model
(`speedup_summary`). bench, the demo's report, compare and the latency table all time through `measure_interleaved`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable

import torch
from torch.utils.benchmark import Timer


def summarize(times_ms: list[float]) -> dict[str, float]:
    """{"median_ms", "min_ms", "max_ms"} of a list of timings."""
    return {"median_ms": statistics.median(times_ms), "min_ms": min(times_ms), "max_ms": max(times_ms)}


def speedup_summary(base_ms: list[float], times_ms: list[float]) -> dict[str, float]:
    """Speed-up of a workload over a base timed in the same round robin (`measure_interleaved`).

    Each round gives one ratio base[i] / times[i] (drift within a round hits both alike); returns
    {"median", "min", "max", "runs"} of those ratios, so a card can show the spread and not one noisy number.
    """
    if len(base_ms) != len(times_ms) or not times_ms:
        raise ValueError(f"paired timings needed: {len(base_ms)} base runs vs {len(times_ms)} runs")
    ratios = [b / t for b, t in zip(base_ms, times_ms)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "runs": len(ratios)}


def measure_interleaved(
    workloads: dict[str, Callable[[], object]], repeats: int, *, warmup: int = 2, min_run_time: float = 0.0,
    after_run: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Milliseconds per call of each workload, one sample per round; every round times each workload once in turn.

    Args:
        workloads: name → zero-argument callable (run under `torch.inference_mode`).
        repeats: timed rounds (samples per workload).
        warmup: untimed rounds first (one call of each workload per round), so lazy initialisation and allocator
            growth of any workload happen before the first round.
        min_run_time: seconds each sample lasts at least: after the warm-up, one `Timer.timeit(1)` per workload
            sizes its block (calls per sample = min_run_time / one call's time) and every sample is `Timer.timeit`
            of that block (2 untimed calls first); 0 = one timed call per sample (`Timer.blocked_autorange`, whose
            one sizing call is the warm-up), for workloads far above the timer's resolution.
        after_run: called after each warm-up call and after each sample, outside the timed region (progress bars).

    Returns:
        {name: [ms per call, one per round]} in round order, so sample i of two workloads were taken side by side.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    after_run = after_run or (lambda: None)
    threads = torch.get_num_threads()
    timers = {name: Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads, label=name)
              for name, fn in workloads.items()}
    times: dict[str, list[float]] = {name: [] for name in workloads}
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in workloads.values():
                fn()
                after_run()
        blocks = {name: _block(timer, min_run_time) for name, timer in timers.items()}
        for _ in range(repeats):
            for name, timer in timers.items():
                times[name].append(_sample(timer, blocks[name]) * 1000)
                after_run()
    return times


def _block(timer: Timer, min_run_time: float) -> int:
    """Calls per sample: enough to last `min_run_time` (1 when it is 0: a single call per sample)."""
    if min_run_time <= 0:
        return 1
    return max(1, math.ceil(min_run_time / max(timer.timeit(1).median, 1e-7)))


def _sample(timer: Timer, number: int) -> float:
    """Seconds per call of one sample of `number` calls (the Timer synchronises the accelerator around it)."""
    if number == 1:
        return timer.blocked_autorange(min_run_time=0.0).median  # one sizing (warm-up) call, then one timed call
    return timer.timeit(number).median


__all__ = ["measure_interleaved", "speedup_summary", "summarize"]
