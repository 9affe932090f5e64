"""What a task provides: one `Task` record per task, read by the stages, the trainer, export, bench and compare.

Adding a task = one module in `training/tasks/` that builds a `Task`, plus one line in the registry
(`training/tasks/__init__.py`). Nothing else dispatches on the task's name or on tensor shapes.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol


# ------------------------------------------------------------------------------- what each Task callable must accept
class LossStep(Protocol):
    """Task loss + task KD for one batch -> (total, {term: value}); `teacher` and `maps` are None without KD."""

    def __call__(self, student: Any, teacher: Any | None, inputs: dict, args: Any, maps: dict | None, *,
                 masks: Any = None, generator: Any = None, step: int = 0) -> tuple[Any, dict]: ...


class TrainData(Protocol):
    """(train dataset, collator) for the data arguments; `mlm`: whether the collator adds MLM inputs."""

    def __call__(self, data: Any, processor: Any, seed: int, mlm: bool) -> tuple[Any, Callable]: ...


class EvalData(Protocol):
    """The held-out set for the data arguments."""

    def __call__(self, data: Any) -> Any: ...


class Evaluate(Protocol):
    """The task's metrics (percent) of `model` on `held_out`.

    `return_per_item=True` returns (metrics, per_item) instead: per_item is a (N,) float64 numpy array with one score
    per held-out item in the primary metric's units (VQA: 100 × each question's score, NLVR2: 100 × correct,
    captioning: 100 × each image's CIDEr-D), whose mean is `metrics[task.metric]` up to float rounding — the input of
    `training.metrics.confidence.mean_ci95` / `paired_mean_difference`. Retrieval's r_mean is not a mean of per-item
    scores (image retrieval averages over captions): its `evaluate` takes `return_ranks` instead and returns the
    per-query ranks (`training.metrics.confidence.PerQueryRanks`, for `r_mean_ci`).
    """

    def __call__(self, model: Any, processor: Any, data: Any, held_out: Any, show_progress: bool = True,
                 pruning_masks: Any = None, *, return_per_item: bool = False) -> dict | tuple[dict, Any]: ...


class Workload(Protocol):
    """A zero-argument callable running the task's inference path on `batch` held-out items (what latency times)."""

    def __call__(self, model: Any, processor: Any, data: Any, held_out: Any, batch: int) -> Callable[[], Any]: ...


class WorkloadText(Protocol):
    """One line describing the workload, for benchmark protocols."""

    def __call__(self, data: Any, batch: int) -> str: ...


class PrepareModel(Protocol):
    """Sets what a freshly built or loaded task model needs from the tokenizer (in place)."""

    def __call__(self, model: Any, processor: Any, data: Any = None) -> None: ...


class PathModel(Protocol):
    """A function of the config and the inference path's sizes (`Task.path_sizes`): the cost path or its FLOPs."""

    def __call__(self, config: Any, **path_sizes: int) -> Any: ...


def _no_preparation(model: Any, processor: Any, data: Any = None) -> None:
    """The default `prepare_model`: nothing to set."""


@dataclass(frozen=True)
class ModelCardSpec:
    """The task-specific parts of an exported model card."""

    task_type: str  # model-index task type
    pipeline_tag: str | None  # Hub pipeline tag (None: no standard pipeline)
    tag: str  # Hub tag naming the task
    heads: str  # one line describing the heads
    speed_name: str  # what the latency measures ("retrieval", "NLVR2")
    usage: str  # Python snippet (with a {repo} placeholder) that a test runs in a clean interpreter
    usage_pipeline: str = ""  # optional pipeline snippet (markdown, {repo} placeholder)
    metric_keys: tuple[str, ...] = ()  # metrics reported in model-index
    report_keys: tuple[str, ...] = ()  # metrics in the card's evaluation table (percent)
    title: str = ""  # the task's name in prose


BLIND_SAMPLE = 5000
"""Training items a task's blind baseline is fitted on (a fresh sample of the synthetic stream)."""


def blind_training_sample(data: Any, task: str, make_item: Callable[[random.Random], dict]) -> list[dict] | None:
    """`BLIND_SAMPLE` fresh synthetic training items of `task` for its blind baseline (`make_item(rng)` draws one; the
    baselines never look at the images, so callers render them tiny), seeded by the held-out seed; None for data other
    than the built-in scenes (no stream to fit on)."""
    if data.dataset != "synthetic" or data.eval_dataset:
        return None
    rng = random.Random(f"efficientvlm-{task}-blind-{data.eval_seed}")
    return [make_item(rng) for _ in range(BLIND_SAMPLE)]


@dataclass(frozen=True)
class Task:
    """Everything the commands need to know about one fine-tuning task.

    Attributes:
        name: the `--task` value.
        model_class: the head class fine-tuned and pruned for the task.
        teacher_class: the class `efficientvlm teacher --task <name>` trains (pre-training for retrieval).
        metric: the primary metric (a key of `evaluate`'s result, higher is better).
        loss_step: task loss + task KD for one batch (see `LossStep`); the trainer calls it, nothing else.
        prune_defaults: the official task-KD / pruning defaults (`PruningArguments` fields left unset take these).
        train_data: fn(data_args, processor, seed, mlm) -> (train dataset, collator).
        eval_data: fn(data_args) -> the held-out set.
        eval_size: fn(held-out set) -> number of items (for reports).
        evaluate: fn(model, processor, data_args, held_out, show_progress, pruning_masks) -> metrics; with
            `return_per_item=True` (metrics, per-item scores) (see `Evaluate`; retrieval: `return_ranks`).
        workload: fn(model, processor, data_args, held_out, batch) -> zero-argument callable running the task's
            inference path on `batch` held-out items (what latency measures).
        workload_text: fn(data_args, batch) -> one line describing that path (for protocols).
        manual_split: default hand split of `compare-splits` (a format string with {half} and {more}).
        card: the model card's task-specific parts.
        prepare_model: fn(model, processor, data=None) -> None, called by the stages right after a task model is
            built or
            loaded, to set what the model needs from the tokenizer before it is trained, saved or evaluated
            (captioning: the prompt ids and the generation config); a no-op by default.
        path_sizes: the sizes of the task's inference path at its evaluation protocol (`prune --budget_path` names
            them), e.g. {"images": 5000, ...}; None: no path model (no FLOPs budget for the task).
        cost_path: fn(config, **path_sizes) -> `training.method.cost.Path`, the runs of each encoder on that path.
        flops: fn(config, **path_sizes) -> FLOPs by part and "total" of the whole inference path: `cost_path`'s
            encoders (`training.method.cost.path_flops`) + the task's heads (what bench reports); None with no path.
        blind_baseline: fn(data_args, held_out) -> {metric: value, ..., "what": one line} of the best predictor that
            never looks at the image, fitted on a fresh sample of the synthetic training stream (VQA: question only;
            NLVR2: statement only; captioning: one constant caption) — what a task teacher must clearly beat; None for
            data other than the built-in scenes, or a task without one.
        engines: (the package's engine, the reference engine) where the inference path has two ways to run that
            give the same outputs — the second as the official code runs it: keyword settings, each a data-arguments
            field the `workload` / `evaluate` read and a keyword of `cost_path` / `flops` (retrieval:
            `reuse_image_kv`). bench times both and splits the speed-up into model and engine; None: one engine.
    """

    name: str
    model_class: type
    teacher_class: type
    metric: str
    loss_step: LossStep
    prune_defaults: dict[str, Any]
    train_data: TrainData
    eval_data: EvalData
    eval_size: Callable[[Any], int]
    evaluate: Evaluate
    workload: Workload
    workload_text: WorkloadText
    manual_split: str
    card: ModelCardSpec
    description: str = field(default="")
    prepare_model: PrepareModel = _no_preparation
    path_sizes: dict[str, int] | None = None
    cost_path: PathModel | None = None
    flops: PathModel | None = None
    engines: tuple[dict[str, Any], dict[str, Any]] | None = None
    blind_baseline: Callable[[Any, Any], dict | None] | None = None
