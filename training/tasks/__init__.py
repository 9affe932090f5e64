"""The task registry: one module per task (`retrieval`, `nlvr2`, `captioning`, `vqa`, ...), each exporting a `Task`
as `TASK`.

Adding a task = one new module here + one line in `TASKS`.
"""

from __future__ import annotations

from .base import ModelCardSpec, Task
from .captioning import TASK as CAPTIONING
from .nlvr2 import TASK as NLVR2
from .nlvr2_domain import TASK as NLVR2_DOMAIN
from .retrieval import TASK as RETRIEVAL
from .vqa import TASK as VQA

TASKS: dict[str, Task] = {task.name: task for task in (RETRIEVAL, NLVR2, NLVR2_DOMAIN, CAPTIONING, VQA)}


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


__all__ = ["ModelCardSpec", "TASKS", "Task", "get_task", "task_of_model"]
