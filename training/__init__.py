"""EfficientVLM training layer, grouped by role (each layer imports only the ones below it):

  commands/  the `efficientvlm` CLI: argument dataclasses and thin `run_*` functions over the library
  tasks/     one module per task (retrieval, nlvr2, nlvr2_domain, captioning, vqa): head class, data, loss step,
             evaluation, inference and cost path, pruning defaults; the registry and the `Task` protocols
  method/    losses, hard-concrete gates, the modal L0 module, the size / FLOPs model, materialize, student init + layer
             map, initializers, the shared distillation terms, argument dataclasses, the Trainer subclasses
  data/      the synthetic world (scenes, their language, rendering), per-task datasets, file formats, collators,
             the synthetic-caption tokenizer
  infra/     run folders (locks, atomic writes, run records), the timing harness, callbacks, config presets
  metrics/   every metric's maths, and the local `evaluate` modules

Imports torch/transformers-heavy pieces lazily so `efficientvlm --help` stays fast.
"""

from importlib import import_module

_EXPORTS = {
    "ModalL0Module": ".method.l0",
    "HardConcreteGate": ".method.gates",
    "init_student_from_teacher": ".method.student",
    "load_layer_map": ".method.student",
    "count_parameters": ".method.structure",
    "materialize": ".method.materialize",
    "EfficientVLMDistillationTrainer": ".method.trainers",
    "EfficientVLMPruningTrainer": ".method.trainers",
    "GatedModel": ".method.trainers",
    "make_gated_model": ".method.trainers",
    "DistillationArguments": ".method.arguments",
    "PruningArguments": ".method.arguments",
    "RetrievalCollator": ".data.collators",
    "TASKS": ".tasks",
    "get_task": ".tasks",
    "from_vision_text_pretrained": ".method.initializers",
    "convert_xvlm_checkpoint": ".method.initializers",
    "evaluate_retrieval": ".tasks.retrieval",
    "retrieval_metrics": ".metrics.retrieval_ranks",
    "evaluate_nlvr2": ".tasks.nlvr2",
    "save_hub_ready": ".commands.export",
    "PushArguments": ".commands.push",
    "push_folder": ".commands.push",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'training' has no attribute {name!r}")
