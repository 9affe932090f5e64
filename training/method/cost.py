"""The one FLOPs model: what a prunable unit, an encoder and a task's whole inference path cost, from the config.

Used for FLOPs-budget pruning (per unit) and for the FLOPs that bench, compare and export report (per path).

The parameter budget of the paper counts every head alike; at inference a fusion head runs once per (query,
candidate) pair while a vision head runs once per image, so equal parameters are not equal time. Here the path is
written down as *runs* per encoder — `count` forward passes over `tokens` new tokens whose queries read `self_keys`
keys (more than `tokens` with a KV cache) and, in cross-attention, `cross_keys` image / fused tokens — and a unit's
cost is the FLOPs it adds summed over the runs. Costs are exact for the model's matmuls (the brute-force test counts
them with hooks): attention head = its q/k/v/out projections + QKᵀ + PV; FFN neuron = its fc1 row + fc2 column.
Softmax, LayerNorm and activations (O(T·d)) are not counted.

Expected cost of a gated network = Σ_units P(z>0)·cost(unit) (`training.method.l0` with `budget="flops"`).

A whole path adds the fixed matmuls around the units: the vision patch embedding (`encoder_flops`) and each task's
heads (`retrieval_flops`: ITC + ITM head; `nlvr2_flops`: NLVR head; `vqa_flops` / `captioning_flops`: LM head per
scored token). Every task's FLOPs = `path_flops(config, its path)` + its heads: one per-unit model for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from modeling_efficientvlm.modeling_efficientvlm import head_width

from .structure import UnitGroup, unit_groups


@dataclass(frozen=True)
class Run:
    """`count` forward passes of one encoder.

    Attributes:
        count: how many sequences (images, texts, pairs, decoding steps × beams) take this pass.
        tokens: new tokens per pass (queries; keys / values are projected for these tokens only).
        self_keys: keys each self-attention query reads (= tokens without a cache; cached + new with one).
        cross_keys: tokens the cross-attention reads (projected to keys / values).
        cross_kv_count: how many times those tokens are projected to cross-attention keys / values: None = in every
            pass (`count`, the per-pair reference engine); fewer when passes share them (retrieval re-ranking with
            `reuse_image_kv`: once per image for all its candidate texts).
    """

    count: int
    tokens: int
    self_keys: int
    cross_keys: int = 0
    cross_kv_count: int | None = None


Path = dict[str, list[Run]]
"""modality → the runs of that encoder on one task's inference path."""


def _head_macs(group: UnitGroup, run: Run) -> tuple[int, int]:
    """(MACs of one head per pass but its cross-attention key / value projections, MACs of those projections once):
    self-attention projects its own tokens' keys / values in every pass (the second term is 0)."""
    hd, d = group.head_dim, group.hidden_size
    per_pass = run.tokens * d * hd + run.tokens * hd * d  # q and out projections
    if group.kind == "cross_head":
        return per_pass + 2 * run.tokens * run.cross_keys * hd, 2 * run.cross_keys * group.kv_size * hd
    kv = 2 * run.tokens * group.kv_size * hd
    return per_pass + kv + 2 * run.tokens * run.self_keys * hd, 0  # + QKᵀ and PV


def unit_flops(group: UnitGroup, runs: list[Run]) -> int:
    """FLOPs one unit of `group` adds over `runs` (2 FLOPs per multiply-accumulate); a cross-attention head's key /
    value projections count `cross_kv_count` times (default: every pass)."""
    total = 0
    for run in runs:
        if group.kind == "ffn":
            total += 2 * run.count * 2 * run.tokens * group.hidden_size  # fc1 row + fc2 column
            continue
        per_pass, cross_kv = _head_macs(group, run)
        kv_count = run.count if run.cross_kv_count is None else run.cross_kv_count
        total += 2 * (run.count * per_pass + kv_count * cross_kv)
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
    """`path` as plain lists ({modality: [[count, tokens, self_keys, cross_keys], ...]}, a fifth entry
    cross_kv_count where a run shares its cross-attention keys / values), e.g. for gate metadata."""
    return {m: [[r.count, r.tokens, r.self_keys, r.cross_keys]
                + ([] if r.cross_kv_count is None else [r.cross_kv_count]) for r in runs] for m, runs in path.items()}


def path_from_json(data: dict) -> Path:
    """Reads `path_to_json`'s form back (also accepts `Run`s); raises ValueError naming a malformed entry."""
    path: Path = {}
    for modality, runs in data.items():
        if not isinstance(runs, list):
            raise ValueError(f"cost path entry {modality!r} must be a list of runs, got {runs!r}")
        path[modality] = []
        for run in runs:
            if isinstance(run, Run):
                path[modality].append(run)
                continue
            ok = isinstance(run, (list, tuple)) and len(run) in (4, 5)
            ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in run)
            if not ok:
                raise ValueError(f"cost path run {run!r} of {modality!r} must be [count, tokens, self_keys, "
                                 "cross_keys] (+ cross_kv_count), ints >= 0")
            path[modality].append(Run(*run))
    return path


def vision_tokens(config, tokens: int = 0) -> int:
    """Tokens of the vision encoder: `tokens` when given (the path's `image_tokens` size: price the units at a
    deployment resolution, e.g. 197 = 224 px / 16, while the model trains at another), else the config's
    [CLS] + patches."""
    vision = config.vision_config
    return tokens or 1 + (vision.image_size // vision.patch_size) ** 2


def retrieval_path(
    config, *, images: int, texts: int, text_length: int, k: int, image_tokens: int = 0, reuse_image_kv: bool = False
) -> Path:
    """Retrieval (ALBEF / X-VLM protocol): every image and text encoded once, the fusion encoder on k ITC candidates
    for every image query and every text query: (images + texts)·k pairs.

    `reuse_image_kv` prices the re-rank engine of `EfficientVLMForImageTextRetrieval.itm_pair_scores`: False (the
    default here, what FLOPs budgets price) = the official X-VLM engine, every pair's fusion pass projects its image's
    tokens to cross-attention keys / values; True (the model's default engine) = each image's keys / values are
    projected once per fusion layer for all its candidate texts (every image is a query, so it is among the pairs)."""
    tokens = vision_tokens(config, image_tokens)
    pairs = (images + texts) * k
    kv_count = min(images, pairs) if reuse_image_kv else None
    return {
        "vision": [Run(images, tokens, tokens)],
        "text": [Run(texts, text_length, text_length)],
        "fusion": [Run(pairs, text_length, text_length, tokens, kv_count)] if pairs else [],
    }


def nlvr2_path(config, *, items: int, text_length: int, image_tokens: int = 0) -> Path:
    """NLVR2 (X-VLM structure): two images and one statement per item; every fusion layer runs once per item (copy
    2l over image 0, copy 2l + 1 over image 1 — with a single, non-duplicated fusion encoder it runs twice)."""
    tokens = vision_tokens(config, image_tokens)
    passes = 1 if getattr(config.fusion_encoder_config, "shared_cross_kv", False) else 2
    return {
        "vision": [Run(2 * items, tokens, tokens)],
        "text": [Run(items, text_length, text_length)],
        "fusion": [Run(passes * items, text_length, text_length, tokens)],
    }


def vqa_path(config, *, questions: int, question_length: int, k: int, answer_length: int,
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


def captioning_path(config, *, images: int, prompt_length: int, new_tokens: int, beams: int,
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


def encoder_flops(config, modality: str, runs: list[Run]) -> int:
    """Forward FLOPs of one encoder over `runs`: every unit of every group (`unit_flops` x group size) plus the
    encoder's fixed matmuls (vision: the patch embedding, a (C·p², d) matmul per image token but [CLS]). Softmax,
    LayerNorm and activations (O(T·d)) are not counted."""
    total = sum(g.size * unit_flops(g, runs) for g in unit_groups(config) if g.modality == modality and g.size)
    if modality == "vision":
        v = config.vision_config
        total += sum(2 * run.count * (run.tokens - 1) * v.num_channels * v.patch_size**2 * v.hidden_size
                     for run in runs)
    return total


def path_flops(config, path: Path) -> dict[str, int]:
    """FLOPs of every encoder on `path` (`encoder_flops`), per modality and "total" (without the task's heads)."""
    out = {modality: encoder_flops(config, modality, runs) for modality, runs in path.items()}
    out["total"] = sum(out.values())
    return out


def _lm_head_macs(sub) -> int:
    """Multiply-accumulates of the MLM-style LM head on one token: dense (d, d) + decoder (d, vocab)."""
    return sub.hidden_size * sub.hidden_size + sub.hidden_size * sub.vocab_size


def retrieval_flops(config, *, images: int, texts: int, text_length: int, k: int,
                    image_tokens: int = 0, reuse_image_kv: bool = False) -> dict[str, int]:
    """FLOPs of the retrieval inference path (`retrieval_path`, its re-rank engine chosen by `reuse_image_kv`):
    encoders + ITC (projections, all-pairs scores) + the ITM head on every re-ranked pair. Returns {"vision", "text",
    "itc", "fusion" (incl. the ITM head), "total"}."""
    path = retrieval_path(config, images=images, texts=texts, text_length=text_length, k=k, image_tokens=image_tokens,
                          reuse_image_kv=reuse_image_kv)
    out = path_flops(config, path)
    v, t = config.vision_config, config.text_config
    itc = 2 * images * texts * config.embed_dim
    itc += 2 * (images * v.hidden_size + texts * t.hidden_size) * config.embed_dim
    pairs = (images + texts) * k
    w = head_width(config)
    itm = pairs * 2 * (t.hidden_size * w + w * 2)  # ITM head: Linear(d, w) + Linear(w, 2)
    fusion = out.get("fusion", 0) + itm
    return {"vision": out["vision"], "text": out["text"], "itc": itc, "fusion": fusion,
            "total": out["vision"] + out["text"] + itc + fusion}


def nlvr2_flops(config, *, items: int, text_length: int, image_tokens: int = 0) -> dict[str, int]:
    """FLOPs of NLVR2 classification (`nlvr2_path`) + the NLVR head on each item's [CLS]: Linear(d, w) + Linear(w,
    num_labels). Returns {"vision", "text", "fusion" (incl. the head), "total"}."""
    out = path_flops(config, nlvr2_path(config, items=items, text_length=text_length, image_tokens=image_tokens))
    d, w, labels = config.text_config.hidden_size, head_width(config), getattr(config, "num_labels", 2)
    out["fusion"] += items * 2 * (d * w + w * labels)
    out["total"] = out["vision"] + out["text"] + out["fusion"]
    return out


def vqa_flops(config, *, questions: int, question_length: int, k: int, answer_length: int,
              image_tokens: int = 0) -> dict[str, int]:
    """FLOPs of VQA answer ranking (`vqa_path`: k re-scored answers per question, so pass min(k, answers)) + the answer
    decoder's LM head over the whole vocabulary on every decoder token (as large as a decoder layer at V ~ 30k).
    Returns {"vision", "text", "fusion", "decoder" (incl. the LM head), "total"}."""
    out = path_flops(config, vqa_path(config, questions=questions, question_length=question_length, k=k,
                                      answer_length=answer_length, image_tokens=image_tokens))
    tokens = questions + questions * k * answer_length  # the first-token step + k answers teacher-forced
    out["decoder"] += tokens * 2 * _lm_head_macs(config.decoder_config)
    out["total"] = sum(out[m] for m in ("vision", "text", "fusion", "decoder"))
    return out


def captioning_flops(config, *, images: int, prompt_length: int, new_tokens: int, beams: int,
                     image_tokens: int = 0) -> dict[str, int]:
    """FLOPs of cached beam-search captioning (`captioning_path`) + the LM head on each beam's new token per step.
    Returns {"vision", "text", "fusion" (incl. the LM head), "total"}."""
    out = path_flops(config, captioning_path(config, images=images, prompt_length=prompt_length,
                                             new_tokens=new_tokens, beams=beams, image_tokens=image_tokens))
    out["fusion"] += images * beams * new_tokens * 2 * _lm_head_macs(config.text_config)
    out["total"] = out["vision"] + out["text"] + out["fusion"]
    return out


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
