"""The task registry: one module per task (`retrieval`, `nlvr2`, `captioning`, `vqa`, ...), each exporting a `Task`
as `TASK`.

Adding a task = one new module here + one line in `TASKS`.
"""

from __future__ import annotations

from .base import ModelCardSpec, Task
from .captioning import TASK as CAPTIONING
from .captioning_domain import TASK as CAPTIONING_DOMAIN
from .nlvr2 import TASK as NLVR2
from .nlvr2_domain import TASK as NLVR2_DOMAIN
from .retrieval import TASK as RETRIEVAL
from .vqa import TASK as VQA

TASKS: dict[str, Task] = {task.name: task for task in (RETRIEVAL, NLVR2, NLVR2_DOMAIN, CAPTIONING, CAPTIONING_DOMAIN,
                                                               VQA)}


def get_task(name: str | Task) -> Task:
    """The registered task called `name` (a `Task` passes through); ValueError naming the allowed tasks."""
    if isinstance(name, Task):
        return name
    if name not in TASKS:
        raise ValueError(f"--task must be one of {sorted(TASKS)}, got {name!r}")
    return TASKS[name]


def task_of_model(model_or_config) -> Task:
    """The task whose head class a model (or a config's `architectures`) belongs to; retrieval by default."""
    names = getattr(model_or_config, "architectures", None) or [type(model_or_config).__name__]
    for task in TASKS.values():
        # retrieval is the fallback: pre-training and retrieval checkpoints both fine-tune as retrieval models
        if task is not RETRIEVAL and task.model_class.__name__ in names:
            return task
    return RETRIEVAL


def has_path(task: str | Task) -> bool:
    """Whether `task` declares an inference path (`Task.cost_path`), i.e. can be pruned with a FLOPs budget."""
    return get_task(task).cost_path is not None


def check_has_path(task: str | Task) -> Task:
    """The task; ValueError naming the tasks that have an inference-path model when `task` has none."""
    spec = get_task(task)
    if spec.cost_path is None:
        raise ValueError(
            f"--budget flops has no inference-path model for task {spec.name!r} (tasks with one: "
            f"{sorted(name for name in TASKS if has_path(name))}); use --budget params"
        )
    return spec


def task_path(task: str | Task, config, text: str = ""):
    """The inference path of `task` (its `Task.cost_path`) at the sizes of `text` over its `Task.path_sizes`
    (`training.method.cost.inference_path`, after `check_has_path`)."""
    from ..method.cost import inference_path

    return inference_path(check_has_path(task), config, text)


__all__ = ["ModelCardSpec", "TASKS", "Task", "check_has_path", "get_task", "has_path", "task_of_model", "task_path"]
