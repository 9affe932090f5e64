"""EfficientVLM training layer: distillation, modal-adaptive pruning, materialization, evaluation, benchmark, CLI.

Imports torch/transformers-heavy pieces lazily so `efficientvlm --help` stays fast.
"""

from importlib import import_module

_EXPORTS = {
    "ModalL0Module": ".l0",
    "HardConcreteGate": ".gates",
    "init_student_from_teacher": ".student",
    "count_parameters": ".structure",
    "EfficientVLMDistillationTrainer": ".trainer",
    "EfficientVLMPruningTrainer": ".trainer",
    "DistillationArguments": ".trainer",
    "PruningArguments": ".trainer",
    "GatedModel": ".trainer",
    "make_gated_model": ".trainer",
    "from_vision_text_pretrained": ".convert",
    "convert_xvlm_checkpoint": ".convert",
    "evaluate_retrieval": ".evaluation",
    "retrieval_metrics": ".evaluation",
}

# `materialize` names both a submodule and its function: bind the function eagerly so the submodule import (which
# sets the package attribute) cannot shadow it later.
from .materialize import materialize  # noqa: E402

__all__ = sorted([*_EXPORTS, "materialize"])


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'training' has no attribute {name!r}")
