"""Benchmark: parameters, analytic FLOPs and measured latency of teacher vs student vs pruned student.

Protocol (printed with every run): one process, one device, the same inputs for every model; for each workload the
models run round robin, once each per round: `warmup` untimed rounds, then `repeats` timed ones (synchronised on GPU),
so drift hits every model alike; we report the median and the min / max, and the speed-up's range over the rounds'
paired ratios; throughput = images per second on the retrieval path. The retrieval path is the ALBEF/X-VLM inference:
encode `eval_images` images and as many texts, ITC scores for all pairs, ITM re-scoring of the top-k candidates of
every image query and every text query (2·eval_images·itm_k fusion passes, cached tokens). Latency depends on
shapes only, so random weights are used unless `--model` checkpoints are given.

The preset's pruned student removes `--target_sparsity` of the student's prunable parameters: uniformly, by an explicit
per-encoder split, or with the per-layer structure a pruning run learned (`--split structure.json`: keep fractions
structure / reference_structure, mapped onto the preset's layers by relative depth, f -> f**c rescaled to the target
unless `--split_as_learned`). Every workload reports `flops_ratio` = speed-up / FLOPs speed-up over the teacher.

Where the task's path has two engines with the same outputs (`Task.engines`; retrieval: ITM re-ranking with each
image's cross-attention keys / values projected once for all its candidate texts, or per pair as the official X-VLM
code runs it), every model's path is also timed on the reference engine, in the same rounds, and the speed-up is
decomposed: `speedup` (over the teacher on the same engine: the model), `engine_gain` (the model per pair / the model
cached: the engine) and `speedup_vs_reference_engine` (over the teacher run per pair = speedup × the teacher's
engine_gain); `gflops` prices the engine used, `gflops_reference_engine` the reference one.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import platform
from collections import UserDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

import modeling_efficientvlm
from modeling_efficientvlm import EfficientVLMConfig

from ..infra.presets import PRESETS, xvlm_clip_config
from ..infra.runs import write_json_atomic
from ..infra.timing import measure_interleaved, speedup_summary, summarize
from ..method.cost import Path, encoder_flops, parse_sizes
from ..method.l0 import HIDDEN_MULTIPLE
from ..method.materialize import set_stream_width
from ..method.structure import (
    CROSS_ATTENTION_MODALITIES,
    ENCODER_CONFIG_KEYS,
    MODALITIES,
    count_parameters,
    prunable_parameters,
)
from ..method.student import student_config
from ..tasks import TASKS, Task, get_task


@dataclass
class BenchArguments:
    """Arguments of `efficientvlm bench`."""

    task: str = field(
        default="retrieval",
        metadata={"help": f"Whose inference path to time (`Task.workload`) and price (`Task.flops`): one of "
                          f"{sorted(n for n, t in TASKS.items() if t.flops is not None)}."},
    )
    preset: str = field(default="xvlm-clip", metadata={"help": "Shapes: 'xvlm-clip' (paper), 'demo', or 'tiny'."})
    model: list[str] = field(
        default_factory=list,
        metadata={"help": "Checkpoint dirs as NAME=DIR (teacher=..., student=..., pruned=...); overrides the preset."},
    )
    image_size: int = field(default=224, metadata={"help": "Image size for the xvlm-clip preset (224 or 384)."})
    target_sparsity: float = field(
        default=0.25,
        metadata={"help": "Share of the student's prunable parameters the preset's pruned student removes (paper: "
                          "0.25); a structure.json --split is rescaled to it."},
    )
    split: str = field(
        default="",
        metadata={"help": "Per-modality sparsity of the pruned student, e.g. 'vision=0.2,text=0.3,fusion=0.35' "
                          "(default: the same ratio in every encoder); or a pruning run's structure.json: its "
                          "per-layer keep fractions (vs its reference_structure), mapped by relative depth and "
                          "rescaled to --target_sparsity."},
    )
    split_as_learned: bool = field(
        default=False,
        metadata={"help": "With a structure.json --split: apply its keep fractions as learned (no rescale to "
                          "--target_sparsity)."},
    )
    device: str = field(default="cpu", metadata={"help": "cpu or cuda."})
    dtype: str = field(default="float32", metadata={"help": "float32, float16 or bfloat16."})
    eval_images: int = field(
        default=8, metadata={"help": "Held-out items in the timed batch (retrieval: images; NLVR2: image pairs; VQA: "
                                     "questions; captioning: images).", "aliases": ["--num_images"]})
    num_texts: int = field(
        default=8, metadata={"help": "Texts in the retrieval workload: each held-out image with its caption, so it "
                                     "must equal --eval_images (kept for existing command lines)."})
    text_length: int = field(default=40, metadata={"help": "Tokens per text (X-VLM: 40); texts are padded to it."})
    itm_k: int = field(default=4, metadata={"help": "ITM re-ranking candidates per query (retrieval).",
                                            "aliases": ["--k"]})
    path_sizes: str = field(
        default="",
        metadata={"help": "Sizes of the task's path for the FLOPs, as prune --budget_path (e.g. 'k=128' for VQA's "
                          "re-scored answers); default: the batch and lengths above, the rest at the task's protocol."},
    )
    warmup: int = field(default=2, metadata={"help": "Untimed runs per measurement."})
    repeats: int = field(default=5, metadata={"help": "Timed runs per measurement."})
    threads: int = field(default=0, metadata={"help": "torch threads (0 = leave as is)."})
    pad_multiple: int = field(default=1, metadata={"help": "Round pruned head counts / FFN widths up to a multiple."})
    output_json: str | None = field(default=None, metadata={"help": "Write the results as JSON to this file.",
                                                             "aliases": ["--json"]})

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"--preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"--dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        if not 0 <= self.target_sparsity < 1:
            raise ValueError(f"--target_sparsity must lie in [0, 1), got {self.target_sparsity}")
        if self.split_as_learned and not self.split.endswith(".json"):
            raise ValueError(f"--split_as_learned applies to a structure.json --split, got --split {self.split!r}")
        for name in ("eval_images", "num_texts", "text_length", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.num_texts != self.eval_images:
            raise ValueError(f"--num_texts ({self.num_texts}) must equal --eval_images ({self.eval_images}): the task's "
                             "workload pairs each held-out image with its text")
        task = get_task(self.task)
        if task.flops is None:
            raise ValueError(f"--task {self.task}: the task declares no inference-path cost model (Task.flops); "
                             f"bench knows {sorted(n for n, t in TASKS.items() if t.flops is not None)}")


def parse_split(split: str, default: float) -> dict[str, float]:
    """'vision=0.2,text=0.3' → {"vision": 0.2, "text": 0.3, "fusion": default} (.json: `load_learned_split`)."""
    ratios = {m: default for m in MODALITIES}
    if not split:
        return ratios
    for item in split.split(","):
        name, _, value = item.partition("=")
        if name.strip() not in MODALITIES or not value:
            raise ValueError(f"--split entries must look like vision=0.2 (encoders: {list(MODALITIES)}), got {item!r}")
        ratios[name.strip()] = float(value)
        if not 0 <= ratios[name.strip()] < 1:
            raise ValueError(f"--split {name}={value}: a sparsity must lie in [0, 1)")
    return ratios


def uniformly_pruned_config(config: EfficientVLMConfig, ratios: dict[str, float], pad_multiple: int = 1):
    """Removes the given fraction of heads and FFN neurons in every layer of each encoder (shapes only)."""
    config = copy.deepcopy(config)
    for modality in MODALITIES:
        sub = getattr(config, ENCODER_CONFIG_KEYS[modality])
        keep = 1.0 - ratios[modality]
        for field_name in sub.per_layer_fields:
            sizes = [_round_up(max(1, round(n * keep)), pad_multiple, n) if n else 0 for n in getattr(sub, field_name)]
            setattr(sub, field_name, sizes)
        sub.validate()
    return config


STRUCTURE_FIELDS = {
    "heads": "num_attention_heads", "ffn": "intermediate_size", "cross_heads": "num_cross_attention_heads",
}
"""structure.json kinds (`structure_table`) → the per-layer config field they size."""


@dataclass
class LearnedSplit:
    """A pruning run's structure as keep fractions of its reference.

    Attributes:
        layers: {encoder: {kind: [keep fraction per source layer]}} (kinds of `STRUCTURE_FIELDS`; 0 = removed).
        hidden: kept share of each residual stream's width: {"vision": f, "text": f} (text and fusion share one
            stream); empty when the run kept the widths.
        source: how the fractions were read (per-layer, or the per-encoder sparsity of an older file).
    """

    layers: dict[str, dict[str, list[float]]]
    hidden: dict[str, float]
    source: str


def _require(mapping, key: str, path: str, where: str):
    """mapping[key], or a ValueError naming the file and the missing field."""
    if not isinstance(mapping, dict) or key not in mapping:
        raise ValueError(f"--split {path}: missing field {where}{key!r} (a structure.json as `efficientvlm export` "
                         "writes it: 'structure' and 'reference_structure' per encoder, or an older file's 'sparsity')")
    return mapping[key]


def map_layers(values: list, n_target: int) -> list:
    """Relative-depth layer map: target layer i of n_target reads source layer floor(i * n_src / n_target)."""
    return [values[i * len(values) // n_target] for i in range(n_target)]


def _kinds(modality: str) -> tuple[str, ...]:
    """The structure.json kinds of an encoder: cross-attention heads only where the encoder has cross-attention."""
    return ("heads", "ffn", "cross_heads") if modality in CROSS_ATTENTION_MODALITIES else ("heads", "ffn")


def _layer_list(mapping, key: str, path: str, where: str) -> list:
    """A non-empty per-layer list of sizes, or a ValueError naming the file and the field."""
    values = _require(mapping, key, path, where)
    if not isinstance(values, list) or not values:
        raise ValueError(f"--split {path}: {where}{key} must be a non-empty per-layer list of sizes, got {values!r}")
    return values


def _fraction(kept: int, ref: int, path: str, where: str) -> float:
    """kept / ref (0 for a sub-layer the reference has removed), or a ValueError naming the field and its range."""
    if not 0 <= kept <= ref:
        raise ValueError(f"--split {path}: {where} keeps {kept} of the reference's {ref}; it must lie in [0, {ref}]")
    return kept / ref if ref else 0.0


def load_learned_split(path: str) -> LearnedSplit:
    """Reads a structure.json: keep fraction = structure[m][kind][l] / reference_structure[m][kind][l] (a reference of
    another depth is read at the same relative depth); "hidden" widths likewise. A file without reference_structure
    (older exports) falls back to its per-encoder "sparsity": keep 1 - sparsity in every layer.

    Raises:
        ValueError: naming the file and the missing or out-of-range field.
    """
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--split {path}: cannot read it as JSON ({e})") from e
    if not isinstance(data, dict) or "reference_structure" not in data:
        sparsity = _require(data, "sparsity", path, "")
        keep = {m: 1.0 - float(_require(sparsity, m, path, "sparsity.")) for m in MODALITIES}
        layers = {m: {kind: [keep[m]] for kind in _kinds(m)} for m in MODALITIES}
        return LearnedSplit(layers, {}, "per-encoder sparsity (file has no reference_structure: every layer alike)")
    structure, reference = _require(data, "structure", path, ""), data["reference_structure"]
    layers, hidden = {}, {}
    for m in MODALITIES:
        ours, ref = _require(structure, m, path, "structure."), _require(reference, m, path, "reference_structure.")
        layers[m] = {}
        for kind in _kinds(m):
            kept = _layer_list(ours, kind, path, f"structure.{m}.")
            full = map_layers(_layer_list(ref, kind, path, f"reference_structure.{m}."), len(kept))
            layers[m][kind] = [_fraction(int(k), int(r), path, f"structure.{m}.{kind}[{i}]")
                               for i, (k, r) in enumerate(zip(kept, full))]
        stream = "text" if m == "fusion" else m  # the fusion encoder continues the text stream
        if "hidden" in ours and stream not in hidden:
            ref_width = int(_require(ref, "hidden", path, f"reference_structure.{m}."))
            hidden[stream] = _fraction(int(ours["hidden"]), ref_width, path, f"structure.{m}.hidden")
    return LearnedSplit(layers, hidden, "per-layer keep fractions (structure / reference_structure)")


UNREACHABLE_TOLERANCE = 0.01
"""A rescaled --split whose achieved parameter sparsity misses --target_sparsity by more than this says so."""


def _kept(n: int, fraction: float, exponent: float, pad_multiple: int) -> int:
    """Units kept of n at keep fraction**exponent: a removed sub-layer (n = 0 or fraction 0) stays removed, any other
    keeps at least one unit."""
    if n == 0 or fraction == 0:
        return 0
    return _round_up(max(1, round(n * fraction ** exponent)), pad_multiple, n)


def structured_pruned_config(config: EfficientVLMConfig, split: LearnedSplit, exponent: float = 1.0,
                             pad_multiple: int = 1) -> EfficientVLMConfig:
    """`config` (shapes only) pruned to `split`'s keep fractions raised to `exponent`, layers mapped by relative depth;
    residual widths scaled by split.hidden (text fraction for text AND fusion; fusion reads the vision width) and
    rounded to a multiple of `HIDDEN_MULTIPLE`; the heads keep their inner width."""
    config = copy.deepcopy(config)
    for modality in MODALITIES:
        sub = getattr(config, ENCODER_CONFIG_KEYS[modality])
        for kind, fractions in split.layers[modality].items():
            sizes = getattr(sub, STRUCTURE_FIELDS[kind])
            mapped = map_layers(fractions, len(sizes))
            setattr(sub, STRUCTURE_FIELDS[kind], [_kept(n, f, exponent, pad_multiple) for n, f in zip(sizes, mapped)])
    for stream, fraction in split.hidden.items():  # widths as materialize sets them (the heads keep theirs)
        width = getattr(config, ENCODER_CONFIG_KEYS[stream]).hidden_size
        fraction = 0.0 if fraction == 0 else fraction ** exponent
        new = min(width, max(HIDDEN_MULTIPLE, round(width * fraction / HIDDEN_MULTIPLE) * HIDDEN_MULTIPLE))
        set_stream_width(config, stream, new)
    for modality in MODALITIES:
        getattr(config, ENCODER_CONFIG_KEYS[modality]).validate()
    config.validate()
    return config


def rescale_to_target(config: EfficientVLMConfig, split: LearnedSplit, target: float, pad_multiple: int = 1,
                      steps: int = 40) -> tuple[EfficientVLMConfig, float, float]:
    """Finds c (bisection) so that keep fractions f**c remove `target` of `config`'s prunable parameters
    (`prunable_parameters`); f = 0 and f = 1 are fixed points. Returns (pruned config, c, achieved sparsity); when the
    target lies outside what the fixed points allow, the nearest reachable end."""
    total = prunable_parameters(config)["total"]

    def sparsity(c: float) -> float:
        pruned = structured_pruned_config(config, split, c, pad_multiple)
        return 1 - prunable_parameters(pruned)["total"] / total

    lo, hi = 0.0, 1.0
    while sparsity(hi) < target and hi < 2.0 ** 12:  # sparsity grows with c: bracket the target
        hi *= 2
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sparsity(mid) < target else (lo, mid)
    c = min((lo, hi), key=lambda x: abs(sparsity(x) - target))
    return structured_pruned_config(config, split, c, pad_multiple), c, sparsity(c)


def pruned_student_config(args: BenchArguments, student_cfg: EfficientVLMConfig) -> tuple[EfficientVLMConfig, dict]:
    """The preset's pruned student from --split and how it was made (for the protocol)."""
    if not args.split.endswith(".json"):
        ratios = parse_split(args.split, args.target_sparsity)
        pruned = uniformly_pruned_config(student_cfg, ratios, args.pad_multiple)
        info = {"kind": "uniform per encoder", "sparsity": ratios}
    else:
        split = load_learned_split(args.split)
        if args.split_as_learned:
            pruned, c = structured_pruned_config(student_cfg, split, 1.0, args.pad_multiple), 1.0
            rescale = "none (--split_as_learned)"
        else:
            pruned, c, achieved = rescale_to_target(student_cfg, split, args.target_sparsity, args.pad_multiple)
            rescale = f"keep fractions f -> f**c, c = {c:.4g}, bisected to target_sparsity {args.target_sparsity}"
            if abs(achieved - args.target_sparsity) > UNREACHABLE_TOLERANCE:
                why = ("its removed sub-layers (keep fraction 0) alone remove more" if achieved > args.target_sparsity
                       else "its kept-whole units cannot remove that much")
                rescale += (f"; target NOT reachable: {why}, achieved {achieved:.3f} (compare it at that sparsity, "
                            "or use --split_as_learned)")
        info = {"kind": "learned structure", "file": args.split, "read_as": split.source, "layer_map":
                "relative depth: layer i of n reads source layer floor(i * n_src / n)", "rescale": rescale,
                "exponent": c, "hidden_scaled": sorted(split.hidden)}
    before, after = prunable_parameters(student_cfg), prunable_parameters(pruned)
    info["achieved_sparsity"] = {m: 1 - after[m] / before[m] for m in (*MODALITIES, "total")}
    return pruned, info


def parse_models(items: list[str]) -> dict[str, str]:
    """['teacher=DIR', ...] → {"teacher": "DIR", ...}; each DIR must exist."""
    models = {}
    for item in items:
        name, _, path = item.partition("=")
        if not name or not path or not os.path.isdir(path):
            raise ValueError(f"--model expects NAME=DIR with an existing directory, got {item!r}")
        models[name] = path
    return models


def _round_up(n: int, multiple: int, cap: int) -> int:
    return min(cap, -(-n // multiple) * multiple) if multiple > 1 else n


ENCODERS = ("vision", "text", "fusion")
"""Encoders timed alone (after the task's whole path), each on its first run of the task's path."""
WORKLOADS = ("path", *ENCODERS)
COUNT_SIZES = ("images", "items", "questions")
"""Path sizes (`Task.path_sizes`) that count the items of the timed batch (--eval_images)."""
BENCH_SIZES = {"texts": "num_texts", "text_length": "text_length", "question_length": "text_length", "k": "itm_k"}
"""Other path sizes set from bench arguments; sizes named neither here nor in COUNT_SIZES keep the task's protocol
values (e.g. VQA's answer_length, captioning's beams), and --path_sizes overrides any."""


def path_sizes(task: Task, args: BenchArguments) -> dict[str, int]:
    """The sizes of `task`'s inference path at the bench workload: its protocol sizes (`Task.path_sizes`) with the
    batch and lengths of the bench arguments, then --path_sizes."""
    sizes = {name: args.eval_images if name in COUNT_SIZES else getattr(args, BENCH_SIZES[name], value)
             if name in BENCH_SIZES else value for name, value in task.path_sizes.items()}
    text = ",".join(f"{name}={value}" for name, value in sizes.items())
    return parse_sizes(task.name, task.path_sizes, ",".join(filter(None, [text, args.path_sizes])))


def bench_path(task: Task, config, args: BenchArguments) -> Path:
    """`task`'s inference path (`Task.cost_path`) at `path_sizes`."""
    return task.cost_path(config, **path_sizes(task, args))


def bench_flops(task: Task, config, args: BenchArguments, engine: dict | None = None) -> dict[str, int]:
    """FLOPs of the timed workloads (`training.method.cost`, the one FLOPs model): "path" = the task's whole path
    with its heads (`Task.flops`) on `engine` (keywords of one of `Task.engines`; None: the cost model's default),
    and each encoder on its first run of the path (what the encoder workloads time)."""
    path = bench_path(task, config, args)
    out = {"path": task.flops(config, **path_sizes(task, args), **(engine or {}))["total"]}
    for modality in ENCODERS:
        out[modality] = encoder_flops(config, modality, path[modality][:1]) if path.get(modality) else 0
    return out


def _encoder_workloads(model, path: Path, device: torch.device, dtype: torch.dtype) -> dict[str, Callable]:
    """Each encoder alone on its first run of the path (random inputs of the run's shapes, seed 0): vision on `count`
    images, text on `count` sequences of `tokens`, fusion on `count` sequences reading `cross_keys` image tokens."""
    config = model.config
    g = torch.Generator().manual_seed(0)
    out = {}
    if path.get("vision"):
        size = config.vision_config.image_size
        pixels = torch.randn(path["vision"][0].count, 3, size, size, generator=g).to(device, dtype)
        out["vision"] = lambda: model.encode_image(pixels)
    if path.get("text"):
        run = path["text"][0]
        ids = torch.randint(5, config.text_config.vocab_size, (run.count, run.tokens), generator=g).to(device)
        out["text"] = lambda: model.encode_text(ids, torch.ones_like(ids))
    if path.get("fusion"):
        run = path["fusion"][0]
        text = torch.randn(run.count, run.tokens, config.text_config.hidden_size, generator=g).to(device, dtype)
        image = torch.randn(run.count, run.cross_keys, config.vision_config.hidden_size, generator=g).to(device, dtype)
        mask = torch.ones(run.count, run.tokens, dtype=torch.long, device=device)
        if getattr(config.fusion_encoder_config, "shared_cross_kv", False):  # NLVR2 pairs: one tensor per image
            image = (image, image.clone())
        out["fusion"] = lambda: model.fuse(text, mask, image)
    return out


def bench_data(task: Task, args: BenchArguments, image_size: int):
    """(data arguments, processor, held-out set) of the task's workload: `--eval_images` built-in synthetic held-out
    items at the models' image size, texts padded to --text_length, ITM re-ranking --itm_k; the task's own engine
    (`Task.engines`' first) where it has two."""
    from .stages import DataArguments, load_processor

    data = DataArguments(task=task.name, image_size=image_size, max_length=args.text_length, itm_k=args.itm_k,
                         eval_images=args.eval_images)
    if task.engines:
        data = dataclasses.replace(data, **task.engines[0])
    return data, load_processor(data), task.eval_data(data)


REFERENCE_PATH = "path_reference_engine"
"""The workload of the task's path on its reference engine (`Task.engines`' second), timed in the path's rounds."""


def workloads(task: Task, model, inputs: tuple, args: BenchArguments, device: torch.device,
              dtype: torch.dtype) -> dict[str, Callable]:
    """One model's timed workloads: the task's inference path (`Task.workload` on `--eval_images` held-out items),
    on the reference engine too where the task has one (`REFERENCE_PATH`), and each encoder alone."""
    data, processor, held_out = inputs
    paths = {"path": data}
    if task.engines:
        paths[REFERENCE_PATH] = dataclasses.replace(data, **task.engines[1])
    out = {}
    for name, engine_data in paths.items():
        out[name] = task.workload(model, processor, engine_data, held_out, args.eval_images)
        _move_inputs(out[name], device, dtype)
    return {**out, **_encoder_workloads(model, bench_path(task, model.config, args), device, dtype)}


def _moved(value, device: torch.device, dtype: torch.dtype):
    """`value` with its tensors on `device` (floating ones in `dtype`), through dicts, UserDicts (a processor's
    BatchFeature) and lists / tuples; anything else (the model) as it is."""
    if isinstance(value, torch.Tensor):
        return value.to(device, dtype) if value.is_floating_point() else value.to(device)
    if isinstance(value, dict):
        return {key: _moved(item, device, dtype) for key, item in value.items()}
    if isinstance(value, UserDict):
        value.data = _moved(value.data, device, dtype)
        return value
    if isinstance(value, (list, tuple)) and any(isinstance(item, torch.Tensor) for item in value):
        return type(value)(_moved(item, device, dtype) for item in value)
    return value


def _move_inputs(fn: Callable, device: torch.device, dtype: torch.dtype) -> None:
    """Moves the inputs a task's workload closed over (built by the processor on the CPU in float32) to the models'
    device and dtype, in place, so the timed call transfers nothing."""
    for cell in fn.__closure__ or ():
        cell.cell_contents = _moved(cell.cell_contents, device, dtype)


def measure(task: Task, models: dict, inputs: tuple, args: BenchArguments, device: torch.device,
            dtype: torch.dtype, progress=None, after_run=None) -> dict[str, dict[str, list[float]]]:
    """Timings (ms) per model and workload. Every round of a workload times all models once in turn (round robin,
    `measure_interleaved`), so drift — thermal, frequency, other processes — hits every model alike and each round
    gives one paired speed-up; `progress(workload)` is called before each workload, `after_run` after each run."""
    runs = {name: workloads(task, model, inputs, args, device, dtype) for name, model in models.items()}
    times: dict[str, dict[str, list[float]]] = {name: {} for name in models}
    for workload in WORKLOADS:
        if not all(workload in run for run in runs.values()):
            continue
        if progress:
            progress(workload)
        # the path on both engines in the same rounds: teacher, teacher per pair, student, student per pair, ...
        members = [w for w in (workload, REFERENCE_PATH if workload == "path" else None) if w in runs[next(iter(runs))]]
        timed = measure_interleaved({f"{name}/{w}": runs[name][w] for name in models for w in members}, args.repeats,
                                    warmup=args.warmup, after_run=after_run)
        for name in models:
            for w in members:
                times[name][w] = timed[f"{name}/{w}"]
    return times


def load_checkpoint(path: str, task: Task | str = "retrieval"):
    """Loads a checkpoint as the class it was saved from (config.json "architectures"), so a pre-training checkpoint
    keeps its MLM head and nothing is reported UNEXPECTED; it must be a `task.model_class` (the timed path uses only
    the parts that class has)."""
    task = get_task(task)
    config = EfficientVLMConfig.from_pretrained(path)
    names = [n for n in (config.architectures or []) if hasattr(modeling_efficientvlm, n)]
    cls = getattr(modeling_efficientvlm, names[0]) if names else task.model_class
    if not issubclass(cls, task.model_class):
        raise ValueError(f"--model {path}: a {cls.__name__} checkpoint (config.json architectures) has no "
                         f"{task.card.speed_name} path ({task.model_class.__name__}), which is what bench --task "
                         f"{task.name} times")
    return cls.from_pretrained(path, config=config)


def preset_models_configs(args: BenchArguments) -> dict[str, EfficientVLMConfig]:
    """The preset's teacher, its student and the pruned student (`pruned_student_config`), by name (shapes only)."""
    teacher_cfg = xvlm_clip_config(args.image_size) if args.preset == "xvlm-clip" else PRESETS[args.preset]()
    student_cfg = student_config(teacher_cfg)
    return {"teacher": teacher_cfg, "student": student_cfg, "pruned": pruned_student_config(args, student_cfg)[0]}


def build_models(args: BenchArguments, task: Task | str | None = None) -> tuple[dict[str, torch.nn.Module], dict]:
    """teacher / student / pruned of `task`'s model class (default: --task) from checkpoints (`--model NAME=DIR`) or
    from the preset (random weights); returns the models and {"weights": ..., "split": how the preset's pruned student
    was made (`pruned_student_config`)}."""
    task = get_task(task or args.task)
    if args.model:
        models = {}
        for name, path in parse_models(args.model).items():
            models[name] = load_checkpoint(path, task)
        return models, {"weights": "checkpoints"}
    configs = preset_models_configs(args)
    split = pruned_student_config(args, configs["student"])[1]
    torch.manual_seed(0)
    models = {name: task.model_class._from_config(cfg, attn_implementation="sdpa") for name, cfg in configs.items()}
    return models, {"weights": "random weights (latency depends on shapes only)", "split": split}


def _parameters(model) -> int:
    """The model's parameters: `count_parameters` with the retrieval heads for a retrieval model (a pre-training
    checkpoint's MLM / box heads are not on the timed path), else every parameter the model holds."""
    if isinstance(model, modeling_efficientvlm.EfficientVLMForImageTextRetrieval):
        return count_parameters(model.config, ("itm",))["total"]
    return sum(p.numel() for p in model.parameters())


def run_benchmark(args: BenchArguments, progress=None) -> dict:
    """Runs the benchmark of --task; returns {"task", "protocol": {...}, "models": {...}} (the task's path at the top
    level per model, each encoder alone under "encoders")."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked but no CUDA device is available")
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    task = get_task(args.task)
    models, source = build_models(args, task)
    image_size = next(iter(models.values())).config.vision_config.image_size
    inputs = bench_data(task, args, image_size)
    for model in models.values():
        task.prepare_model(model, inputs[1])
    models = {name: model.to(device, dtype).eval() for name, model in models.items()}
    # one tick per run (warm-up call or timed sample) of every workload of every model, on stderr
    paths = len(WORKLOADS) + (1 if task.engines else 0)  # the path on the reference engine too
    bar = tqdm(total=len(models) * paths * (args.warmup + args.repeats), desc="bench", unit="run")

    def announce(workload: str) -> None:
        bar.set_postfix_str(workload)
        if progress:
            progress(workload)

    timings = measure(task, models, inputs, args, device, dtype, progress=announce, after_run=bar.update)
    results = {}
    engine = task.engines[0] if task.engines else None
    for name, model in models.items():
        flops = bench_flops(task, model.config, args, engine)
        path = summarize(timings[name]["path"])
        results[name] = {
            "params": _parameters(model),
            "prunable_params": prunable_parameters(model.config)["total"],
            "gflops": flops["path"] / 1e9,
            "latency_ms": path["median_ms"],
            "latency_min_ms": path["min_ms"],
            "latency_max_ms": path["max_ms"],
            "latency_runs_ms": timings[name]["path"],
            "throughput_images_per_s": args.eval_images / (path["median_ms"] / 1000),
            "encoders": {m: {**summarize(timings[name][m]), "gflops": flops[m] / 1e9}
                         for m in ENCODERS if m in timings[name]},
        }
        if REFERENCE_PATH in timings[name]:
            reference = summarize(timings[name][REFERENCE_PATH])
            results[name].update({
                "gflops_reference_engine": bench_flops(task, model.config, args, task.engines[1])["path"] / 1e9,
                "latency_reference_engine_ms": reference["median_ms"],
                "latency_reference_engine_min_ms": reference["min_ms"],
                "latency_reference_engine_max_ms": reference["max_ms"],
                "latency_reference_engine_runs_ms": timings[name][REFERENCE_PATH],
            })
    bar.close()
    base = _add_ratios(results)
    info = protocol(args, source, task, inputs[0])
    info["speedup_baseline"] = base
    info["image_size"] = image_size
    info["path_sizes"] = path_sizes(task, args)
    if task.engines:
        info["engine"] = task.engines[0]
        info["reference_engine"] = task.engines[1]
        info["reference_path"] = (f"{task.name}: "
                                  f"{task.workload_text(dataclasses.replace(inputs[0], **task.engines[1]), args.eval_images)}")
    return {"task": task.name, "protocol": info, "models": results}


def _add_ratios(results: dict) -> str:
    """Speed-up, FLOPs and parameter ratios over the teacher (or the first model); returns the baseline's name."""
    base_name = "teacher" if "teacher" in results else next(iter(results))
    base = results[base_name]
    for entry in results.values():
        entry["speedup"] = base["latency_ms"] / entry["latency_ms"]
        # models are timed round robin: each round gives one paired ratio; the range is theirs
        paired = speedup_summary(base["latency_runs_ms"], entry["latency_runs_ms"])
        entry["speedup_min"], entry["speedup_max"], entry["speedup_runs"] = paired["min"], paired["max"], paired["runs"]
        entry["flops_speedup"] = base["gflops"] / entry["gflops"]
        # speed-up ÷ FLOPs speed-up: 1 = latency falls as fast as FLOPs (per workload: the path here, encoders below)
        entry["flops_ratio"] = entry["speedup"] / entry["flops_speedup"]
        entry["speedup_over_flops_ratio"] = entry["flops_ratio"]  # older name, kept for existing readers
        entry["params_fraction"] = entry["params"] / base["params"]
        for name, enc in entry["encoders"].items():
            ref = base["encoders"][name]
            enc["speedup"] = ref["median_ms"] / enc["median_ms"]
            enc["flops_speedup"] = ref["gflops"] / enc["gflops"] if enc["gflops"] else float("inf")
            enc["flops_ratio"] = enc["speedup"] / enc["flops_speedup"]
        if "latency_reference_engine_ms" in entry:
            _add_engine_ratios(entry, base)
    return base_name


def _add_engine_ratios(entry: dict, base: dict) -> None:
    """The speed-up's decomposition: `engine_gain` (this model per pair / cached, paired per round),
    `speedup_vs_reference_engine` (the baseline per pair / this model cached = speedup × the baseline's engine_gain)
    and their FLOPs counterparts."""
    for key, reference in (("engine_gain", entry), ("speedup_vs_reference_engine", base)):
        entry[key] = reference["latency_reference_engine_ms"] / entry["latency_ms"]  # ratio of medians
        paired = speedup_summary(reference["latency_reference_engine_runs_ms"], entry["latency_runs_ms"])
        entry[f"{key}_min"], entry[f"{key}_max"] = paired["min"], paired["max"]
    entry["flops_engine_gain"] = entry["gflops_reference_engine"] / entry["gflops"]
    entry["flops_speedup_vs_reference_engine"] = base["gflops_reference_engine"] / entry["gflops"]


def protocol(args: BenchArguments, source: dict, task: Task, data) -> dict:
    """What was measured and how (`source`: `build_models`' weights and split record; `data`: the workload's data
    arguments)."""
    info = {
        "task": task.name,
        "device": args.device if args.device != "cuda" else torch.cuda.get_device_name(),
        "cpu": platform.processor() or platform.machine(),
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "attention": "sdpa",
        "weights": source["weights"],
        "path": f"{task.name}: {task.workload_text(data, args.eval_images)} (built-in synthetic held-out items)",
    }
    info.update({k: v for k, v in asdict(args).items() if k in (
        "image_size", "eval_images", "num_texts", "text_length", "itm_k", "warmup", "repeats")})
    if args.model:  # what was benchmarked: the checkpoints, not the (unused) preset
        info["models"] = parse_models(args.model)
    else:
        info.update(preset=args.preset, pad_multiple=args.pad_multiple, target_sparsity=args.target_sparsity,
                    split=source["split"])
    info["timing"] = ("models interleaved: every round times each model once in turn (round robin), `warmup` untimed "
                      "rounds first, then `repeats` timed ones, each sample a torch.utils.benchmark Timer "
                      "(blocked_autorange: one sizing / warm-up call, accelerator synchronised, the current thread "
                      "count); median, min / max per model; speed-up range = the per-round paired ratios")
    return info


def format_table(result: dict) -> str:
    """A readable table of the benchmark result (protocol first)."""
    p = result["protocol"]
    keys = ("device", "dtype", "threads", "preset", "image_size", "eval_images", "num_texts", "text_length", "itm_k",
            "warmup", "repeats")
    source = ("Models: " + ", ".join(f"{name}={path}" for name, path in p["models"].items()) + ". ") if "models" in p \
        else ""
    lines = [
        "Protocol: " + ", ".join(f"{k}={p[k]}" for k in keys if k in p),
        f"{source}Weights: {p['weights']}. Path: {p['path']}.",
        *([_split_line(p["split"])] if "split" in p else []),
        "",
        f"{'model':<9}{'params(M)':>10}{'GFLOPs':>9}{'latency ms':>12}{'[min-max]':>17}{'img/s':>8}"
        f"{'speedup':>9}{'[min-max]':>13}{'FLOPs x':>9}{'ratio':>7}",
    ]
    for name, r in result["models"].items():
        lines.append(
            f"{name:<9}{r['params'] / 1e6:>10.2f}{r['gflops']:>9.2f}{r['latency_ms']:>12.1f}"
            f"{'[' + format(r['latency_min_ms'], '.1f') + '-' + format(r['latency_max_ms'], '.1f') + ']':>17}"
            f"{r['throughput_images_per_s']:>8.1f}{r['speedup']:>9.2f}"
            f"{'[' + format(r['speedup_min'], '.2f') + '-' + format(r['speedup_max'], '.2f') + ']':>13}"
            f"{r['flops_speedup']:>9.2f}"
            f"{r['flops_ratio']:>7.2f}"
        )
    lines.append(f"Speed-ups are over {p['speedup_baseline']}: ratio of medians; [min-max] = range of the per-round "
                 "ratios (models timed round robin, one run each per round); ratio = speed-up / FLOPs speed-up (flops_ratio).")
    if "reference_engine" in p:
        lines += ["", *_engine_lines(result)]
    lines.append("")
    lines.append(f"Per encoder (median ms, speed-up vs {p['speedup_baseline']} / FLOPs speed-up = flops_ratio):")
    for name, r in result["models"].items():
        cells = [f"{m} {e['median_ms']:.1f} ({e['speedup']:.2f}x/{e['flops_speedup']:.2f}x={e['flops_ratio']:.2f})"
                 for m, e in r["encoders"].items()]
        lines.append(f"  {name:<8} " + "  ".join(cells))
    return "\n".join(lines)


def _engine_lines(result: dict) -> list[str]:
    """The speed-up's decomposition into model and engine (`_add_engine_ratios`), one row per model."""
    p, base = result["protocol"], result["protocol"]["speedup_baseline"]
    rng = lambda r, key: f"[{r[key + '_min']:.2f}-{r[key + '_max']:.2f}]"  # noqa: E731
    setting = lambda engine: ", ".join(f"{k}={v}" for k, v in engine.items())  # noqa: E731
    lines = [
        f"Engines: {setting(p['engine'])} (timed above) vs the reference engine {setting(p['reference_engine'])}: "
        f"{p['reference_path']}.",
        f"{'model':<9}{'ref ms':>10}{'ref GFLOPs':>11}{'engine gain':>12}{'[min-max]':>13}{'FLOPs x':>8}"
        f"{'model x':>9}{'vs ' + base + ' ref':>16}{'[min-max]':>13}{'FLOPs x':>8}",
    ]
    for name, r in result["models"].items():
        lines.append(
            f"{name:<9}{r['latency_reference_engine_ms']:>10.1f}{r['gflops_reference_engine']:>11.2f}"
            f"{r['engine_gain']:>12.2f}{rng(r, 'engine_gain'):>13}{r['flops_engine_gain']:>8.2f}"
            f"{r['speedup']:>9.2f}{r['speedup_vs_reference_engine']:>16.2f}{rng(r, 'speedup_vs_reference_engine'):>13}"
            f"{r['flops_speedup_vs_reference_engine']:>8.2f}"
        )
    lines.append(f"engine gain = the model on the reference engine / on the engine above (same model); model x = "
                 f"speedup over {base} (same engine); vs {base} ref = {base} on the reference engine / the model = "
                 f"model x × {base}'s engine gain (speedup_vs_reference_engine); FLOPs x: the same ratios of GFLOPs.")
    return lines


def _split_line(split: dict) -> str:
    """One protocol line: how the preset's pruned student was made and the parameter sparsity it reached."""
    achieved = ", ".join(f"{m} {v:.3f}" for m, v in split["achieved_sparsity"].items())
    if split["kind"] == "learned structure":
        how = f"learned structure {split['file']} read as {split['read_as']}; {split['layer_map']}; " \
              f"rescale: {split['rescale']}"
    else:
        how = "uniform per encoder " + ", ".join(f"{m}={v}" for m, v in split["sparsity"].items())
    return f"Pruned student: {how}. Achieved prunable-parameter sparsity vs student: {achieved}."


def write_json(result: dict, path: str) -> None:
    """Writes atomically (temp file + rename)."""
    write_json_atomic(path, result)
