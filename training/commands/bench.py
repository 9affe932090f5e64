"""Benchmark: parameters, analytic FLOPs and measured latency of teacher vs student vs pruned student.

Protocol (printed with every run): one process, one device, the same inputs for every model; for each model and each
workload: `warmup` untimed runs, then `repeats` timed runs (synchronised on GPU); we report the median and the
min / max; throughput = images per second on the retrieval path. The retrieval path is the ALBEF/X-VLM inference:
encode `num_images` images and `num_texts` texts, ITC scores for all pairs, ITM re-scoring of the top-k candidates of
every image query and every text query ((num_images + num_texts)·k fusion passes, cached tokens). Latency depends on
shapes only, so random weights are used unless `--model` checkpoints are given.
"""

from __future__ import annotations

import copy
import json
import os
import platform
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

import modeling_efficientvlm
from modeling_efficientvlm import EfficientVLMConfig, EfficientVLMForImageTextRetrieval

from ..method.structure import (
    ENCODER_CONFIG_KEYS,
    MODALITIES,
    count_parameters,
    encoder_flops,
    prunable_parameters,
    retrieval_flops,
)
from ..method.student import student_config
from ..tasks.retrieval import retrieval_step
from .latency import summarize, time_runs
from .presets import PRESETS, xvlm_clip_config


@dataclass
class BenchArguments:
    """Arguments of `efficientvlm bench`."""

    preset: str = field(default="xvlm-clip", metadata={"help": "Shapes: 'xvlm-clip' (paper), 'demo', or 'tiny'."})
    model: list[str] = field(
        default_factory=list,
        metadata={"help": "Checkpoint dirs as NAME=DIR (teacher=..., student=..., pruned=...); overrides the preset."},
    )
    image_size: int = field(default=224, metadata={"help": "Image size for the xvlm-clip preset (224 or 384)."})
    target_sparsity: float = field(default=0.25, metadata={"help": "Sparsity of the preset's pruned student."})
    split: str = field(
        default="",
        metadata={"help": "Per-modality sparsity of the pruned student, e.g. 'vision=0.2,text=0.3,fusion=0.35' "
                          "(default: the same ratio in every encoder); or a structure.json from a pruning run."},
    )
    device: str = field(default="cpu", metadata={"help": "cpu or cuda."})
    dtype: str = field(default="float32", metadata={"help": "float32, float16 or bfloat16."})
    num_images: int = field(default=8, metadata={"help": "Images in the retrieval workload."})
    num_texts: int = field(default=8, metadata={"help": "Texts in the retrieval workload."})
    text_length: int = field(default=40, metadata={"help": "Tokens per text (X-VLM: 40)."})
    k: int = field(default=4, metadata={"help": "ITM re-ranking candidates per query."})
    warmup: int = field(default=2, metadata={"help": "Untimed runs per measurement."})
    repeats: int = field(default=5, metadata={"help": "Timed runs per measurement."})
    threads: int = field(default=0, metadata={"help": "torch threads (0 = leave as is)."})
    pad_multiple: int = field(default=1, metadata={"help": "Round pruned head counts / FFN widths up to a multiple."})
    json: str | None = field(default=None, metadata={"help": "Write the results as JSON to this file."})

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"--preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"--dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        if not 0 <= self.target_sparsity < 1:
            raise ValueError(f"--target_sparsity must lie in [0, 1), got {self.target_sparsity}")
        for name in ("num_images", "num_texts", "text_length", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")


def parse_split(split: str, default: float) -> dict[str, float]:
    """'vision=0.2,text=0.3' → {"vision": 0.2, "text": 0.3, "fusion": default}; a .json file: its "sparsity" entry."""
    ratios = {m: default for m in MODALITIES}
    if not split:
        return ratios
    if split.endswith(".json"):
        with open(split) as f:
            data = json.load(f)
        return {m: float(data["sparsity"][m]) for m in MODALITIES}
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


WORKLOADS = ("retrieval", "vision", "text", "fusion")


def measure(model, args: BenchArguments, device: torch.device, dtype: torch.dtype, after_run=None) -> dict:
    """Latency of the retrieval path and of each encoder alone for one model (`after_run`: called after each run)."""
    config = model.config
    g = torch.Generator().manual_seed(0)
    size = config.vision_config.image_size
    pixels = torch.randn(args.num_images, 3, size, size, generator=g).to(device, dtype)
    ids = torch.randint(5, config.text_config.vocab_size, (args.num_texts, args.text_length), generator=g).to(device)
    mask = torch.ones_like(ids)
    image_tokens = model.encode_image(pixels).last_hidden_state
    text_tokens = model.encode_text(ids, mask).last_hidden_state
    pairs = (args.num_images + args.num_texts) * args.k
    pair_image = torch.arange(pairs, device=device) % args.num_images
    pair_text = torch.arange(pairs, device=device) % args.num_texts
    workloads = {
        "retrieval": lambda: retrieval_step(model, pixels, ids, mask, args.k),
        "vision": lambda: model.encode_image(pixels),
        "text": lambda: model.encode_text(ids, mask),
        "fusion": lambda: model.fuse(text_tokens[pair_text], mask[pair_text], image_tokens[pair_image]),
    }
    return {name: summarize(time_runs(workloads[name], args.warmup, args.repeats, device, after_run))
            for name in WORKLOADS}


def _flops(config, args: BenchArguments) -> dict[str, float]:
    size = config.vision_config.image_size
    tokens = 1 + (size // config.vision_config.patch_size) ** 2
    pairs = (args.num_images + args.num_texts) * args.k
    return {
        "retrieval": retrieval_flops(config, args.num_images, args.num_texts, args.text_length, args.k)["total"],
        "vision": args.num_images * encoder_flops(config, "vision", tokens),
        "text": args.num_texts * encoder_flops(config, "text", args.text_length),
        "fusion": pairs * encoder_flops(config, "fusion", args.text_length, tokens),
    }


def load_checkpoint(path: str) -> EfficientVLMForImageTextRetrieval:
    """Loads a checkpoint as the class it was saved from (config.json "architectures"), so a pre-training checkpoint
    keeps its MLM head and nothing is reported UNEXPECTED; the timed path uses only the ITC / ITM parts that every
    image-text class shares."""
    config = EfficientVLMConfig.from_pretrained(path)
    names = [n for n in (config.architectures or []) if hasattr(modeling_efficientvlm, n)]
    cls = getattr(modeling_efficientvlm, names[0]) if names else EfficientVLMForImageTextRetrieval
    if not issubclass(cls, EfficientVLMForImageTextRetrieval):
        raise ValueError(f"--model {path}: a {cls.__name__} checkpoint (config.json architectures) has no image-text "
                         "retrieval path (ITC + ITM heads), which is what bench times")
    return cls.from_pretrained(path, config=config)


def build_models(args: BenchArguments) -> tuple[dict[str, torch.nn.Module], str]:
    """teacher / student / pruned from checkpoints (`--model NAME=DIR`) or from the preset (random weights)."""
    if args.model:
        models = {}
        for name, path in parse_models(args.model).items():
            models[name] = load_checkpoint(path)
        return models, "checkpoints"
    teacher_cfg = xvlm_clip_config(args.image_size) if args.preset == "xvlm-clip" else PRESETS[args.preset]()
    student_cfg = student_config(teacher_cfg)
    ratios = parse_split(args.split, args.target_sparsity)
    pruned_cfg = uniformly_pruned_config(student_cfg, ratios, args.pad_multiple)
    torch.manual_seed(0)
    models = {
        name: EfficientVLMForImageTextRetrieval._from_config(cfg, attn_implementation="sdpa")
        for name, cfg in (("teacher", teacher_cfg), ("student", student_cfg), ("pruned", pruned_cfg))
    }
    return models, "random weights (latency depends on shapes only)"


def run_benchmark(args: BenchArguments, progress=None) -> dict:
    """Runs the benchmark; returns {"protocol": {...}, "models": {...}} (retrieval path at the top level per model)."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked but no CUDA device is available")
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    models, weights = build_models(args)
    results = {}
    # one tick per run (warm-up or timed) of every workload of every model, on stderr
    bar = tqdm(total=len(models) * len(WORKLOADS) * (args.warmup + args.repeats), desc="bench", unit="run")
    for name, model in models.items():
        if progress:
            progress(name)
        bar.set_postfix_str(name)
        model = model.to(device, dtype).eval()
        timings = measure(model, args, device, dtype, after_run=bar.update)
        flops = _flops(model.config, args)
        params = count_parameters(model.config, ("itm",))
        results[name] = {
            "params": params["total"],
            "prunable_params": prunable_parameters(model.config)["total"],
            "gflops": flops["retrieval"] / 1e9,
            "latency_ms": timings["retrieval"]["median_ms"],
            "latency_min_ms": timings["retrieval"]["min_ms"],
            "latency_max_ms": timings["retrieval"]["max_ms"],
            "throughput_images_per_s": args.num_images / (timings["retrieval"]["median_ms"] / 1000),
            "encoders": {m: {**timings[m], "gflops": flops[m] / 1e9} for m in ("vision", "text", "fusion")},
        }
    bar.close()
    base = _add_ratios(results)
    info = protocol(args, weights)
    info["speedup_baseline"] = base
    info["image_size"] = next(iter(models.values())).config.vision_config.image_size
    return {"protocol": info, "models": results}


def _add_ratios(results: dict) -> str:
    """Speed-up, FLOPs and parameter ratios over the teacher (or the first model); returns the baseline's name."""
    base_name = "teacher" if "teacher" in results else next(iter(results))
    base = results[base_name]
    for entry in results.values():
        entry["speedup"] = base["latency_ms"] / entry["latency_ms"]
        # models are timed one after another (not paired), so the range is the bound from the min / max runs
        entry["speedup_min"] = base["latency_min_ms"] / entry["latency_max_ms"]
        entry["speedup_max"] = base["latency_max_ms"] / entry["latency_min_ms"]
        entry["flops_speedup"] = base["gflops"] / entry["gflops"]
        entry["speedup_over_flops_ratio"] = entry["speedup"] / entry["flops_speedup"]
        entry["params_fraction"] = entry["params"] / base["params"]
        for name, enc in entry["encoders"].items():
            ref = base["encoders"][name]
            enc["speedup"] = ref["median_ms"] / enc["median_ms"]
            enc["flops_speedup"] = ref["gflops"] / enc["gflops"] if enc["gflops"] else float("inf")
    return base_name


def protocol(args: BenchArguments, weights: str) -> dict:
    info = {
        "device": args.device if args.device != "cuda" else torch.cuda.get_device_name(),
        "cpu": platform.processor() or platform.machine(),
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "attention": "sdpa",
        "weights": weights,
        "path": "retrieval: encode images + texts, ITC all pairs, ITM on top-k per image and per text query",
    }
    info.update({k: v for k, v in asdict(args).items() if k in (
        "image_size", "num_images", "num_texts", "text_length", "k", "warmup", "repeats")})
    if args.model:  # what was benchmarked: the checkpoints, not the (unused) preset
        info["models"] = parse_models(args.model)
    else:
        info.update(preset=args.preset, pad_multiple=args.pad_multiple)
    info["timing"] = "median of `repeats` runs after `warmup` untimed runs; min/max reported"
    return info


def format_table(result: dict) -> str:
    """A readable table of the benchmark result (protocol first)."""
    p = result["protocol"]
    keys = ("device", "dtype", "threads", "preset", "image_size", "num_images", "num_texts", "text_length", "k",
            "warmup", "repeats")
    source = ("Models: " + ", ".join(f"{name}={path}" for name, path in p["models"].items()) + ". ") if "models" in p \
        else ""
    lines = [
        "Protocol: " + ", ".join(f"{k}={p[k]}" for k in keys if k in p),
        f"{source}Weights: {p['weights']}. Path: {p['path']}.",
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
            f"{r['speedup_over_flops_ratio']:>7.2f}"
        )
    lines.append(f"Speed-ups are over {p['speedup_baseline']}: ratio of medians; [min-max] = slowest / fastest run "
                 "pairing (models timed one after another).")
    lines.append("")
    lines.append(f"Per encoder (median ms, speed-up vs {p['speedup_baseline']} / FLOPs speed-up):")
    for name, r in result["models"].items():
        cells = [f"{m} {e['median_ms']:.1f} ({e['speedup']:.2f}x/{e['flops_speedup']:.2f}x)" for m, e in r["encoders"].items()]
        lines.append(f"  {name:<8} " + "  ".join(cells))
    return "\n".join(lines)


def write_json(result: dict, path: str) -> None:
    """Writes atomically (temp file + rename)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, path)
