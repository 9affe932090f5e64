"""Measured latency per prunable unit on a task's inference path, for `prune --budget latency`.

FLOPs are a proxy: at small widths, on a CPU or with launch-bound kernels, a head does not cost its FLOPs and a sub-layer
costs something even with one unit left. Here each sub-layer kind is timed on the target device with the model's own
modules (LayerNorm + `EfficientVLMAttention` / `EfficientVLMMLP` + residual) at the shapes of every run of the path
(`cost.Run`: count sequences of `tokens` queries reading `self_keys` / `cross_keys` keys), at several unit counts, and
a line is fitted:

    seconds(u units) ≈ fixed + per_unit · u          (least squares over u = size/points, ..., size; both ≥ 0)

scaled from the timed batch to the run's `count` and summed over the runs. The table gives every prunable group (one
sub-layer of one layer) its `per_unit` seconds and its `fixed` seconds; a sub-layer with no unit left is an exact
identity in the model, so its fixed part goes too. Expected latency of a gated network = Σ_groups
[P(sub-layer runs)·fixed + Σ_units P(unit kept)·per_unit] (`training.method.l0`, budget="latency").

Measure once on the device the model will serve on (`efficientvlm latency-table`), keep the JSON, prune with
`--latency_table FILE`; the table is stored in the gate file, so the run records what it was pruned against.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import statistics

import torch
from torch import nn
from tqdm.auto import tqdm

from modeling_efficientvlm.modeling_efficientvlm import EfficientVLMAttention, EfficientVLMMLP

from ..infra.runs import write_json_atomic
from ..infra.timing import measure_interleaved
from .cost import Path, Run, inference_path, path_from_json, path_to_json
from .structure import ENCODER_CONFIG_KEYS, UnitGroup, unit_groups

logger = logging.getLogger(__name__)

TABLE_VERSION = 1
LATENCY_TABLE_FILE = "latency_table.json"
"""Where a `--budget latency` run that measured its own table writes it (beside the gates, which also hold it)."""
TABLE_KEYS = ("version", "device", "cost_path", "per_unit", "fixed")
"""Fields every latency table has (more are informative: protocol, fits)."""


class _PrefixCache:
    """Stands in for a KV cache in a timed decoding step: this step's keys / values are appended to a fixed prefix
    (the `self_keys - tokens` earlier tokens) and nothing is stored, so every repeat costs the same."""

    def __init__(self, key: torch.Tensor, value: torch.Tensor):
        self.key, self.value = key, value

    def update(self, key, value, layer_idx):  # the `Cache.update` signature `EfficientVLMAttention` calls
        return torch.cat((self.key, key), dim=2), torch.cat((self.value, value), dim=2)


def _sublayer(group: UnitGroup, units: int, encoder_config) -> tuple[nn.Module, nn.LayerNorm]:
    """The model's own module for `units` units of `group` (random weights: latency depends on shapes only)."""
    if group.kind == "ffn":
        module = EfficientVLMMLP(group.hidden_size, units, encoder_config.hidden_act)
    else:
        module = EfficientVLMAttention(encoder_config, group.hidden_size, units, group.head_dim, group.kv_size, 0.0)
    return module.eval(), nn.LayerNorm(group.hidden_size)


def _workload(group: UnitGroup, units: int, encoder_config, run: Run, batch: int, device, dtype):
    """A zero-argument call of one sub-layer (LayerNorm, units, residual) on `batch` sequences shaped like `run`."""
    module, norm = _sublayer(group, units, encoder_config)
    module, norm = module.to(device, dtype), norm.to(device, dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, run.tokens, group.hidden_size, generator=g).to(device, dtype)
    if group.kind == "ffn":
        return lambda: x + module(norm(x))
    kv = cache = None
    if group.kind == "cross_head":
        kv = torch.randn(batch, run.cross_keys, group.kv_size, generator=g).to(device, dtype)
    elif run.self_keys > run.tokens:  # decoding with a KV cache: earlier tokens' keys / values are read, not projected
        prefix = (batch, units, run.self_keys - run.tokens, group.head_dim)
        cache = _PrefixCache(torch.randn(*prefix, generator=g).to(device, dtype),
                             torch.randn(*prefix, generator=g).to(device, dtype))
    return lambda: x + module(norm(x), key_value_states=kv, past_key_values=cache)[0]


def _median_seconds(fns: list, warmup: int, repeats: int, min_seconds: float) -> list[float]:
    """Median seconds of one call of each of `fns`, timed round robin by the one harness (drift hits every unit count
    alike); each sample loops calls for at least `min_seconds` (single calls of a small sub-layer are below timer
    noise)."""
    workloads = {str(i): fn for i, fn in enumerate(fns)}
    times = measure_interleaved(workloads, repeats, warmup=warmup, min_run_time=min_seconds)
    return [statistics.median(times[str(i)]) / 1000 for i in range(len(fns))]


def fit_line(units: list[int], seconds: list[float]) -> tuple[float, float]:
    """Least-squares (fixed, per_unit) of seconds ≈ fixed + per_unit·units with both ≥ 0 (a negative intercept is
    refitted through the origin; a negative slope — timing noise on a flat curve — becomes 0 around the mean)."""
    n = len(units)
    if n == 1:
        return 0.0, max(seconds[0], 0.0) / max(units[0], 1)
    mean_u, mean_t = sum(units) / n, sum(seconds) / n
    var = sum((u - mean_u) ** 2 for u in units)
    slope = sum((u - mean_u) * (t - mean_t) for u, t in zip(units, seconds)) / var if var else 0.0
    intercept = mean_t - slope * mean_u
    if slope < 0:
        return max(mean_t, 0.0), 0.0
    if intercept < 0:
        return 0.0, max(sum(u * t for u, t in zip(units, seconds)) / sum(u * u for u in units), 0.0)
    return intercept, slope


def _unit_counts(size: int, points: int) -> list[int]:
    return sorted({max(1, round(size * i / points)) for i in range(1, points + 1)})


def _signature(group: UnitGroup, runs: list[Run]) -> tuple:
    """Groups with the same shapes on the same runs time alike (every layer of a dense student): measured once."""
    return (group.modality, group.kind, group.size, group.hidden_size, group.kv_size, group.head_dim, tuple(runs))


def measure_latency_table(
    config, path: Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32, batch: int = 16, points: int = 4,
    warmup: int = 2, repeats: int = 7, min_seconds: float = 0.005, progress: bool = True,
) -> dict:
    """Times every prunable group's sub-layer of `config` on `path` and fits (fixed, per_unit) seconds per group.

    Args:
        config: the (student) EfficientVLMConfig to be pruned.
        path: the task's inference path (`cost.inference_path`); the table prices the units on it.
        device / dtype: where and in what precision the model will serve.
        batch: sequences per timed call (a run of `count` sequences costs seconds·count / min(count, batch)).
        points: unit counts timed per group (size/points, 2·size/points, ..., size).
        warmup / repeats / min_seconds: per timing, untimed calls, timed samples (median), minimum sample length.

    Returns:
        {"version", "device", "cost_path", "per_unit": {group: s}, "fixed": {group: s}, "protocol", "fits"}.
    """
    if batch < 1 or points < 1 or repeats < 1:
        raise ValueError(f"batch, points and repeats must be >= 1, got {batch}, {points}, {repeats}")
    groups = [g for g in unit_groups(config) if g.size > 0]
    fits: dict[tuple, dict] = {}
    per_unit, fixed = {}, {}
    todo = {_signature(g, path.get(g.modality, [])): g for g in groups}
    bar = tqdm(total=len(todo), desc="latency table", unit="sub-layer", disable=not progress)
    for signature, group in todo.items():
        runs = path.get(group.modality, [])
        encoder_config = getattr(config, ENCODER_CONFIG_KEYS[group.modality])
        counts = _unit_counts(group.size, points)
        seconds = [0.0] * len(counts)
        for run in runs:
            if run.count == 0:
                continue
            timed = min(run.count, batch)
            fns = [_workload(group, units, encoder_config, run, timed, device, dtype) for units in counts]
            for i, value in enumerate(_median_seconds(fns, warmup, repeats, min_seconds)):
                seconds[i] += value * run.count / timed
        intercept, slope = fit_line(counts, seconds)
        fits[signature] = {"group": group.name, "units": counts, "seconds": seconds, "fixed": intercept,
                           "per_unit": slope}
        bar.update(1)
    bar.close()
    for group in groups:
        fit = fits[_signature(group, path.get(group.modality, []))]
        per_unit[group.name], fixed[group.name] = fit["per_unit"], fit["fixed"]
    return {
        "version": TABLE_VERSION,
        "device": _device_name(device),
        "cost_path": path_to_json(path),
        "per_unit": per_unit,
        "fixed": fixed,
        "protocol": f"{str(dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads, torch "
                    f"{torch.__version__}; per group: LayerNorm + sub-layer + residual timed at unit counts "
                    f"{points} points up to the group's size, batch ≤ {batch} sequences per run scaled to the run's "
                    f"count, median of {repeats} round-robin samples ≥ {min_seconds * 1000:g} ms (torch.utils.benchmark "
                    f"blocked_autorange) after {warmup} warm-ups; "
                    "seconds = fixed + per_unit·units, least squares",
        "fits": list(fits.values()),
    }


def transfer_table(table: dict, source_config, target_config, path: Path, priced_at: str) -> dict:
    """Re-expresses `table` (measured for `source_config`, e.g. the deployment model) per unit of `target_config`
    (a narrower proxy with the same encoders that is pruned in its place): each target group reads the source group
    of its kind at the same relative depth (layer i of n reads source layer ⌊i·n_src/n⌋), a target unit costs
    `source per_unit · source size / target size` (a fraction of a group costs what that fraction costs at the source
    shapes) and a sub-layer keeps the source's fixed seconds. `path` (the target's path) is recorded as its cost path.

    Raises:
        ValueError: a target group whose kind the source encoder lacks (e.g. no cross-attention).
    """
    source = {(g.modality, g.kind, g.layer): g for g in unit_groups(source_config) if g.size > 0}
    depth = {m: getattr(source_config, ENCODER_CONFIG_KEYS[m]).num_hidden_layers for m in ENCODER_CONFIG_KEYS
             if getattr(source_config, ENCODER_CONFIG_KEYS[m], None) is not None}
    per_unit, fixed = {}, {}
    for group in unit_groups(target_config):
        if group.size == 0:
            continue
        n = getattr(target_config, ENCODER_CONFIG_KEYS[group.modality]).num_hidden_layers
        key = (group.modality, group.kind, group.layer * depth.get(group.modality, 0) // n)
        if key not in source:
            raise ValueError(f"cannot price {group.name} at {priced_at}: its {group.modality} layer {key[2]} has no "
                             f"{group.kind} units")
        ref = source[key]
        per_unit[group.name] = table["per_unit"][ref.name] * ref.size / group.size
        fixed[group.name] = table["fixed"][ref.name]
    return {**table, "cost_path": path_to_json(path), "per_unit": per_unit, "fixed": fixed,
            "priced_at": f"{priced_at}: measured there, mapped by relative depth, per unit × size ratio",
            "fits": table.get("fits", [])}


def _device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(torch.device(device))}"
    return f"cpu: {platform.processor() or platform.machine()}"


def check_latency_table(table, config, source: str = "latency table") -> dict:
    """Validates a table (read from `source`) against `config`: its fields, one finite ≥ 0 entry per prunable group
    for both `per_unit` and `fixed`, a readable `cost_path`. Returns the table; raises ValueError naming the field."""
    if not isinstance(table, dict):
        raise ValueError(f"{source}: a latency table must be a JSON object, got {type(table).__name__}")
    missing = [key for key in TABLE_KEYS if key not in table]
    if missing:
        raise ValueError(f"{source}: missing field(s) {missing}; a table has {list(TABLE_KEYS)} "
                         "(write one with `efficientvlm latency-table`)")
    if table["version"] != TABLE_VERSION:
        raise ValueError(f"{source}: version {table['version']!r} is not supported (expected {TABLE_VERSION})")
    try:
        path_from_json(table["cost_path"])
    except (ValueError, AttributeError) as error:
        raise ValueError(f"{source}: field 'cost_path': {error}") from error
    names = sorted(g.name for g in unit_groups(config) if g.size > 0)
    for field in ("per_unit", "fixed"):
        entries = table[field]
        if not isinstance(entries, dict):
            raise ValueError(f"{source}: field {field!r} must map group names to seconds")
        lacking, extra = sorted(set(names) - set(entries)), sorted(set(entries) - set(names))
        if lacking or extra:
            raise ValueError(
                f"{source}: field {field!r} does not match the model's prunable groups: missing {lacking or 'none'}, "
                f"unexpected {extra or 'none'} (the table was measured for another config)"
            )
        for name, value in entries.items():
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or value < 0:
                raise ValueError(f"{source}: {field}[{name!r}] must be a finite number of seconds >= 0, got {value!r}")
    if not any(table["per_unit"][n] for n in names):
        raise ValueError(f"{source}: every per_unit latency is 0: a latency budget would be 0 / 0")
    return table


def load_latency_table(path: str, config) -> dict:
    """Reads and checks a table written by `save_latency_table` (JSON, never pickle)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no latency table at {path} (write one with `efficientvlm latency-table`)")
    try:
        with open(path) as f:
            table = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not a JSON latency table: {error}") from error
    return check_latency_table(table, config, path)


def save_latency_table(table: dict, path: str) -> None:
    """Writes atomically (temp file + rename): a reader never sees half a table."""
    write_json_atomic(path, table)


def latency_table_for(config, task, table_file: str = "", budget_path: str = "",
                      output_dir: str | None = None) -> tuple[dict, str | None]:
    """The table a latency budget prices `config`'s units by, and the file holding it: `table_file` (checked against
    `config`), else measured now on the training device (CUDA when there is one) on `task`'s path at `budget_path` and
    written to `output_dir`/latency_table.json (not written without an `output_dir`). `task`: a `training.tasks.Task`
    (see `cost.inference_path`), resolved by the caller."""
    if table_file:
        return load_latency_table(table_file, config), table_file
    device = "cuda" if torch.cuda.is_available() else "cpu"
    logger.info("no latency table given: measuring the student's sub-layers on %s", device)
    table = measure_latency_table(config, inference_path(task, config, budget_path), device=device)
    if not output_dir:
        return table, None
    file = os.path.join(output_dir, LATENCY_TABLE_FILE)
    save_latency_table(table, file)
    return table, file


def latency_share(table: dict, config, reference_config) -> float:
    """The share of `reference_config`'s predicted seconds (the student) that `config` (a structure pruned from it)
    keeps by `table`."""
    return predicted_latency(table, config)["total"] / predicted_latency(table, reference_config)["total"]


def predicted_latency(table: dict, config) -> dict[str, float]:
    """Seconds the table predicts for the prunable sub-layers of `config` (the student it was measured for or a
    structure materialized from it: groups by name, kept units × per_unit + fixed when any unit is left), per
    modality and "total"."""
    out: dict[str, float] = {}
    for group in unit_groups(config):
        if group.size == 0:
            continue
        seconds = group.size * table["per_unit"][group.name] + table["fixed"][group.name]
        out[group.modality] = out.get(group.modality, 0.0) + seconds
    out["total"] = sum(out.values())
    return out


def format_latency_table(table: dict, config) -> str:
    """A Markdown summary: per encoder and unit kind, ms per unit, fixed ms per sub-layer, share of the path."""
    rows: dict[tuple[str, str], list[float]] = {}
    for group in unit_groups(config):
        if group.size == 0:
            continue
        row = rows.setdefault((group.modality, group.kind), [0, 0.0, 0.0, 0.0])
        unit, fix = table["per_unit"][group.name], table["fixed"][group.name]
        row[0] += 1
        row[1] += unit
        row[2] += fix
        row[3] += unit * group.size + fix
    total = sum(row[3] for row in rows.values())
    priced = f"; priced at {table['priced_at']}" if table.get("priced_at") else ""
    lines = [f"latency table: {table['device']}; {table.get('protocol', '')}{priced}", "",
             "| encoder | unit | sub-layers | ms per unit (mean) | fixed ms per sub-layer (mean) | share of path |",
             "|---|---|---|---|---|---|"]
    for (modality, kind), (n, unit, fix, whole) in rows.items():
        lines.append(f"| {modality} | {kind} | {n} | {unit / n * 1000:.4g} | {fix / n * 1000:.4g} | "
                     f"{whole / total:.3f} |")
    lines.append(f"\npredicted: {total * 1000:.4g} ms for the prunable sub-layers on the path")
    return "\n".join(lines)
