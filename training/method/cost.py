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

from dataclasses import dataclass, replace

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


def vision_tokens(config, tokens: int = 0) -> int:
    """Tokens of the vision encoder: `tokens` when given (the path's `image_tokens` size: price the units at a
    deployment resolution, e.g. 197 = 224 px / 16, while the model trains at another), else the config's
    [CLS] + patches."""
    vision = config.vision_config
    return tokens or 1 + (vision.image_size // vision.patch_size) ** 2


def retrieval_path(
    config, images: int, texts: int, text_length: int, k: int, image_tokens: int = 0
) -> Path:
    """Retrieval (ALBEF / X-VLM protocol): every image and text encoded once, the fusion encoder on k ITC candidates
    for every image query and every text query: (images + texts)·k pairs."""
    tokens = vision_tokens(config, image_tokens)
    pairs = (images + texts) * k
    return {
        "vision": [Run(images, tokens, tokens)],
        "text": [Run(texts, text_length, text_length)],
        "fusion": [Run(pairs, text_length, text_length, tokens)] if pairs else [],
    }


def nlvr2_path(config, items: int, text_length: int, image_tokens: int = 0) -> Path:
    """NLVR2 (X-VLM structure): two images and one statement per item; every fusion layer runs once per item (copy
    2l over image 0, copy 2l + 1 over image 1 — with a single, non-duplicated fusion encoder it runs twice)."""
    tokens = vision_tokens(config, image_tokens)
    passes = 1 if getattr(config.fusion_encoder_config, "shared_cross_kv", False) else 2
    return {
        "vision": [Run(2 * items, tokens, tokens)],
        "text": [Run(items, text_length, text_length)],
        "fusion": [Run(passes * items, text_length, text_length, tokens)],
    }


def vqa_path(config, questions: int, question_length: int, k: int, answer_length: int,
             image_tokens: int = 0) -> Path:
    """VQA answer ranking (`EfficientVLMForQuestionAnswering.rank_answers`): per question one vision, text and fusion
    pass; the answer decoder takes one step from the start token (scores every answer's first token) and then
    re-scores the top k answers teacher-forced over `answer_length` tokens, cross-attending to the question tokens."""
    tokens = vision_tokens(config, image_tokens)
    return {
        "vision": [Run(questions, tokens, tokens)],
        "text": [Run(questions, question_length, question_length)],
        "fusion": [Run(questions, question_length, question_length, tokens)],
        "decoder": [Run(questions, 1, 1, question_length), Run(questions * k, answer_length, answer_length,
                                                             question_length)],
    }


def captioning_path(config, images: int, prompt_length: int, new_tokens: int, beams: int,
                    image_tokens: int = 0) -> Path:
    """Captioning with the KV cache (`EfficientVLMForConditionalGeneration.generate`): the image encoded once; the
    text + fusion stack (one causal decoder) runs the prompt once per beam, then one new token per step reading every
    cached key, the fusion layers cross-attending to the image tokens at every step."""
    tokens = vision_tokens(config, image_tokens)
    count = images * beams
    text = [Run(count, prompt_length, prompt_length)]
    fusion = [Run(count, prompt_length, prompt_length, tokens)]
    for step in range(1, new_tokens):
        keys = prompt_length + step
        text.append(Run(count, 1, keys))
        fusion.append(Run(count, 1, keys, tokens))
    return {"vision": [Run(images, tokens, tokens)], "text": text, "fusion": fusion}


ZERO_ALLOWED = ("k", "image_tokens")
"""Path sizes that may be 0: no ITM re-ranking (k = 0); image_tokens = 0 means the config's [CLS] + patches."""


def parse_sizes(task: str, defaults: dict[str, int], text: str) -> dict[str, int]:
    """'images=1000,k=128' → the task's default sizes with those replaced; raises naming an unknown / bad entry.

    Every path also takes `image_tokens` (default 0 = the config's own): the vision tokens the units are priced at.
    """
    sizes = {**defaults, "image_tokens": 0}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = (part.strip() for part in item.partition("="))
        if name not in sizes:
            raise ValueError(f"--budget_path {item!r}: unknown size {name!r} for {task}; known: {sorted(sizes)}")
        low = 0 if name in ZERO_ALLOWED else 1
        if not value.isdigit() or int(value) < low:
            raise ValueError(f"--budget_path {item!r}: {name} must be an integer >= {low}")
        sizes[name] = int(value)
    return sizes


def inference_path(task, config, text: str = "") -> Path:
    """The inference path of `task` (a `training.tasks.Task`, or anything with its `name`, `cost_path` and
    `path_sizes`) at the sizes of `text` over its `path_sizes`: `task.cost_path(config, **sizes)`.

    The task comes from the caller (commands resolve `--task` once): this layer knows no task names. A task without
    a path model raises; `training.tasks.task_path` takes a name and names the tasks that have one.
    """
    if getattr(task, "cost_path", None) is None:
        raise ValueError(f"--budget flops has no inference-path model for task {getattr(task, 'name', task)!r}; "
                         "use --budget params")
    return task.cost_path(config, **parse_sizes(task.name, task.path_sizes, text))


def width_terms(weight, group: UnitGroup) -> tuple[float, float, float]:
    """`weight(group)` (a unit's parameters or FLOPs) as c0 + c_d·d + c_kv·kv, linear in the residual width d the
    unit reads / writes and the width kv its keys / values read (cross-attention: the vision stream).

    Hidden-dimension gates shrink d and kv; the expected cost of a unit is then c0 + c_d·E[d] + c_kv·E[kv]. Read off
    by evaluating `weight` at widths (0, 0), (1, 0) and (0, 1): every term of `unit_flops` and
    `structure.unit_parameter_count` is linear in each width.
    """
    at = lambda d, kv: float(weight(replace(group, hidden_size=d, kv_size=kv)))  # noqa: E731
    c0 = at(0, 0)
    return c0, at(1, 0) - c0, at(0, 1) - c0
