"""The method: losses, hard-concrete gates, the modal L0 module, the size model, materialization, student
initialisation and its layer map, the shared distillation terms, argument dataclasses and the Trainer subclasses."""
