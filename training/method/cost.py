"""What a prunable unit costs on a task's inference path: FLOPs per head / neuron, for FLOPs-budget pruning.

The parameter budget of the paper counts every head alike; at inference a fusion head runs once per (query,
candidate) pair while a vision head runs once per image, so equal parameters are not equal time. Here the path is
written down as *runs* per encoder — `count` forward passes over `tokens` new tokens whose queries read `self_keys`
keys (more than `tokens` with a KV cache) and, in cross-attention, `cross_keys` image / fused tokens — and a unit's
cost is the FLOPs it adds summed over the runs. Costs are exact for the model's matmuls (the brute-force test counts
them with hooks): attention head = its q/k/v/out projections + QKᵀ + PV; FFN neuron = its fc1 row + fc2 column.
Softmax, LayerNorm and activations (O(T·d)) are not counted.

Expected cost of a gated network = Σ_units P(z>0)·cost(unit) (`training.method.l0` with `budget="flops"`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .structure import UnitGroup, unit_groups


@dataclass(frozen=True)
class Run:
    """`count` forward passes of one encoder.

    Attributes:
        count: how many sequences (images, texts, pairs, decoding steps × beams) take this pass.
        tokens: new tokens per pass (queries; keys / values are projected for these tokens only).
        self_keys: keys each self-attention query reads (= tokens without a cache; cached + new with one).
        cross_keys: tokens the cross-attention reads (projected to keys / values in every pass).
    """

    count: int
    tokens: int
    self_keys: int
    cross_keys: int = 0


Path = dict[str, list[Run]]
"""modality → the runs of that encoder on one task's inference path."""


def _head_macs(group: UnitGroup, run: Run) -> int:
    hd, d = group.head_dim, group.hidden_size
    if group.kind == "cross_head":
        kv_tokens, keys = run.cross_keys, run.cross_keys
    else:
        kv_tokens, keys = run.tokens, run.self_keys
    projections = run.tokens * d * hd + 2 * kv_tokens * group.kv_size * hd + run.tokens * hd * d
    return projections + 2 * run.tokens * keys * hd  # + QKᵀ and PV


def unit_flops(group: UnitGroup, runs: list[Run]) -> int:
    """FLOPs one unit of `group` adds over `runs` (2 FLOPs per multiply-accumulate)."""
    total = 0
    for run in runs:
        if group.kind == "ffn":
            macs = 2 * run.tokens * group.hidden_size  # fc1 row + fc2 column
        else:
            macs = _head_macs(group, run)
        total += 2 * run.count * macs
    return total


def unit_costs(config, path: Path) -> dict[str, int]:
    """FLOPs per unit for every prunable group of `config` on `path` (group name → cost of ONE head / neuron)."""
    return {g.name: unit_flops(g, path.get(g.modality, [])) for g in unit_groups(config)}


def prunable_flops(config, path: Path) -> dict[str, int]:
    """FLOPs of the prunable units on `path`, per modality and "total" (what a FLOPs budget is a fraction of)."""
    out: dict[str, int] = {}
    for group in unit_groups(config):
        out[group.modality] = out.get(group.modality, 0) + group.size * unit_flops(group, path.get(group.modality, []))
    out["total"] = sum(out.values())
    return out


def path_to_json(path: Path) -> dict[str, list[list[int]]]:
    """`path` as plain lists ({modality: [[count, tokens, self_keys, cross_keys], ...]}), e.g. for gate metadata."""
    return {m: [[r.count, r.tokens, r.self_keys, r.cross_keys] for r in runs] for m, runs in path.items()}


def path_from_json(data: dict) -> Path:
    """Reads `path_to_json`'s form back (also accepts `Run`s); raises ValueError naming a malformed entry."""
    path: Path = {}
    for modality, runs in data.items():
        if not isinstance(runs, list):
            raise ValueError(f"cost path entry {modality!r} must be a list of runs, got {runs!r}")
        path[modality] = []
        for run in runs:
            if isinstance(run, Run):
                run = [run.count, run.tokens, run.self_keys, run.cross_keys]
            ok = isinstance(run, (list, tuple)) and len(run) == 4
            ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in run)
            if not ok:
                raise ValueError(
                    f"cost path run {run!r} of {modality!r} must be [count, tokens, self_keys, cross_keys], ints >= 0"
                )
            path[modality].append(Run(*run))
    return path


def image_tokens(config, image_size: int | None = None) -> int:
    """Tokens of the vision encoder ([CLS] + patches) at `image_size` (default: the config's)."""
    vision = config.vision_config
    return 1 + ((image_size or vision.image_size) // vision.patch_size) ** 2


def retrieval_path(
    config, num_images: int, num_texts: int, text_length: int, k: int, image_size: int | None = None
) -> Path:
    """Retrieval (ALBEF / X-VLM protocol): every image and text encoded once, the fusion encoder on k ITC candidates
    for every image query and every text query: (num_images + num_texts)·k pairs."""
    tokens = image_tokens(config, image_size)
    pairs = (num_images + num_texts) * k
    return {
        "vision": [Run(num_images, tokens, tokens)],
        "text": [Run(num_texts, text_length, text_length)],
        "fusion": [Run(pairs, text_length, text_length, tokens)] if pairs else [],
    }


def nlvr2_path(config, items: int, text_length: int, image_size: int | None = None) -> Path:
    """NLVR2 (X-VLM structure): two images and one statement per item; every fusion layer runs once per item (copy
    2l over image 0, copy 2l + 1 over image 1 — with a single, non-duplicated fusion encoder it runs twice)."""
    tokens = image_tokens(config, image_size)
    passes = 1 if getattr(config.fusion_encoder_config, "shared_cross_kv", False) else 2
    return {
        "vision": [Run(2 * items, tokens, tokens)],
        "text": [Run(items, text_length, text_length)],
        "fusion": [Run(passes * items, text_length, text_length, tokens)],
    }


PATH_SIZES: dict[str, dict[str, int]] = {
    "retrieval": {"images": 5000, "texts": 25000, "k": 256, "text_length": 40},
    "nlvr2": {"items": 1000, "text_length": 40},
}
"""Default path sizes per task: the paper's evaluation protocols (COCO 5k test with k = 256; X-VLM's 40 tokens)."""


def parse_sizes(task: str, text: str) -> dict[str, int]:
    """'images=1000,k=128' → the task's default sizes with those replaced; raises naming an unknown / bad entry."""
    if task not in PATH_SIZES:
        raise ValueError(
            f"--budget flops has no inference-path model for task {task!r} (available: {sorted(PATH_SIZES)}); "
            "use --budget params"
        )
    sizes = dict(PATH_SIZES[task])
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = (part.strip() for part in item.partition("="))
        if name not in sizes:
            raise ValueError(f"--budget_path {item!r}: unknown size {name!r} for {task}; known: {sorted(sizes)}")
        if not value.isdigit() or int(value) < (0 if name == "k" else 1):
            raise ValueError(f"--budget_path {item!r}: {name} must be an integer >= {0 if name == 'k' else 1}")
        sizes[name] = int(value)
    return sizes


def task_path(task: str, config, text: str = "") -> Path:
    """The inference path of `task` at the sizes of `text` (see `parse_sizes`) for a model with `config`."""
    sizes = parse_sizes(task, text)
    if task == "retrieval":
        return retrieval_path(config, sizes["images"], sizes["texts"], sizes["text_length"], sizes["k"])
    return nlvr2_path(config, sizes["items"], sizes["text_length"])
