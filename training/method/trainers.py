"""Trainer subclasses: general/task distillation and modal-adaptive pruning.

The Trainer keeps its loop, accelerate/DDP/DeepSpeed handling, gradient accumulation, checkpointing and logging;
these classes override narrow hooks only: `compute_loss`, `create_optimizer`, `create_scheduler`, `log`, and (for
pruning) `_save` / `_load_from_checkpoint` so gate state travels with checkpoints as safetensors.
"""

from __future__ import annotations

import math
import os
import shutil
from collections import defaultdict

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from transformers.utils import logging

from .arguments import DistillationArguments, PruningArguments, default_freeze_step, default_sparsity_warmup
from .cost import inference_path, path_to_json
from .distillation import check_compatible, kd_pairs
from .l0 import GATES_FILE, ModalL0Module, read_gates_file
from .latency_table import latency_table_for
from .student import resolve_layer_map, save_layer_map
from .structure import modalities

NOISE_RNG_FILE = "noise_rng.safetensors"  # hard-concrete noise + ITM negative sampling generator
STAGING_DIR = ".checkpoint-staging"

logger = logging.get_logger(__name__)


# ------------------------------------------------------------------------------------------------------ trainers
class EfficientVLMDistillationTrainer(Trainer):
    """Trains a student with its task's loss step: VLP / task losses + KD from a frozen teacher (kept in eval mode,
    run under no_grad).

    Args:
        teacher_model: the teacher (any EfficientVLM head class compatible with the student's task), or None to
            train with the task losses only (teacher pre-training / fine-tuning).
        task: the `training.tasks.Task` whose `loss_step` runs every step (retrieval — image-caption pairs — is also
            the pre-training and general-distillation step). The caller resolves it (`training.tasks.get_task`):
            this layer imports no task module.
        layer_map: per encoder, the teacher layer each student layer was initialised from — the ONE map every KD
            term uses (attention: (i, map[i]); hidden: outputs of those layers + embeddings). Default: the student's
            depth-derived map (`student.default_init_map`). Saved beside the student as `layer_map.json`.
        *args, **kwargs: as `transformers.Trainer`; `args` must be a `DistillationArguments`.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        *args,
        teacher_model: nn.Module | None,
        task,
        layer_map: dict[str, list[int]] | None = None,
        **kwargs,
    ):
        if model is not None and not isinstance(model, GatedModel):
            model = GatedModel(model)  # the step runs inside the wrapped forward (DDP), see GatedModel
        super().__init__(model, *args, **kwargs)
        if not isinstance(self.args, DistillationArguments):
            raise TypeError("EfficientVLMDistillationTrainer needs DistillationArguments (or PruningArguments)")
        if task is None or isinstance(task, str):
            raise TypeError(f"task must be a training.tasks.Task (training.tasks.get_task(name)), got {task!r}")
        self.task = task
        self.teacher = teacher_model
        self.maps = None
        self.layer_map = layer_map
        if teacher_model is not None:  # None: teacher pre-training with the VLP losses only
            self.teacher = teacher_model.to(self.args.device).eval()
            self.teacher.requires_grad_(False)
            check_compatible(self.student.config, self.teacher.config, self.args.beta_hidden > 0)
            self.layer_map = resolve_layer_map(self.student.config, self.teacher.config, layer_map)
            self.maps = kd_pairs(self.layer_map)
        self.model_accepts_loss_kwargs = False  # our loss is a mean per batch; let the Trainer scale for accumulation
        self.noise_generator = torch.Generator().manual_seed(self.args.seed)
        self._loss_sums: dict[str, float] = defaultdict(float)
        self._loss_count = 0

    @property
    def student(self) -> nn.Module:
        return self.model.student

    def _masks(self, gated: GatedModel):
        return None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.teacher is not None:
            self.teacher.eval()

        def step(gated: GatedModel):
            total, parts = self.task.loss_step(
                gated.student, self.teacher, inputs, self.args, self.maps, masks=self._masks(gated),
                generator=self.noise_generator, step=self.state.global_step,
            )
            return self._add_regularisers(gated, total, parts), parts

        total, parts = model(step=step)
        for name, value in parts.items():
            self._loss_sums[name] += float(value.detach())
        self._loss_count += 1
        if not torch.isfinite(total):
            bad = [n for n, v in parts.items() if not math.isfinite(float(v.detach()))]
            raise FloatingPointError(
                f"non-finite loss at step {self.state.global_step}: terms {bad or ['total']} (nothing was saved)"
            )
        return (total, parts) if return_outputs else total

    def _add_regularisers(self, gated: GatedModel, total, parts):
        return total

    def _save_checkpoint(self, model, trial) -> None:
        """Writes checkpoint-N under a staging dir and renames it into place once complete (all ranks done), so an
        interrupted save never leaves a checkpoint that looks valid; then rotates old checkpoints."""
        run_dir = super()._get_output_dir(trial=trial)
        staging = os.path.join(run_dir, STAGING_DIR)
        self._checkpoint_run_dir = staging
        try:
            super()._save_checkpoint(model, trial)
            self.accelerator.wait_for_everyone()
        except BaseException:
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            self._checkpoint_run_dir = None
        if not self.args.should_save:
            return
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        final = os.path.join(run_dir, name)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(os.path.join(staging, name), final)
        shutil.rmtree(staging, ignore_errors=True)
        if self.state.best_model_checkpoint and self.state.best_model_checkpoint.startswith(staging):
            self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(self.state.best_model_checkpoint))
        rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                           best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)

    def _get_output_dir(self, trial) -> str:
        return getattr(self, "_checkpoint_run_dir", None) or super()._get_output_dir(trial=trial)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Saves the student Hub-ready (save_pretrained, processor) and, when pruning, the gates + multipliers as
        safetensors beside it."""
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        gated = self.model
        gated.student.save_pretrained(output_dir)
        if self.layer_map is not None:
            save_layer_map(output_dir, self.layer_map)
        if gated.l0 is not None:
            gated.l0.save(os.path.join(output_dir, GATES_FILE))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        gated = self.model
        loaded = type(gated.student).from_pretrained(resume_from_checkpoint)
        gated.student.load_state_dict(loaded.state_dict())
        if gated.l0 is not None:
            path = os.path.join(resume_from_checkpoint, GATES_FILE)  # untrusted like any file: checked, then loaded
            gated.l0.load_checked_state(read_gates_file(path)[1], path)

    def _save_rng_state(self, output_dir: str) -> None:
        """Also checkpoints our noise generator (gate samples, ITM negatives), so a resumed run is exact."""
        super()._save_rng_state(output_dir)
        if self.args.should_save:
            save_file({"state": self.noise_generator.get_state()}, os.path.join(output_dir, NOISE_RNG_FILE))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        path = os.path.join(checkpoint, NOISE_RNG_FILE) if checkpoint else ""
        if path and os.path.isfile(path):
            self.noise_generator.set_state(load_file(path)["state"])

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the mean of every loss term since the last log, by name."""
        if self._loss_count and "loss" in logs:
            for name, value in self._loss_sums.items():
                logs[f"loss_{name}"] = round(value / self._loss_count, 6)
            self._loss_sums.clear()
            self._loss_count = 0
        super().log(logs, start_time)

    def create_model_card(self, *args, **kwargs) -> None:
        """The card `--push_to_hub` writes describes the student (its config names what it was trained from), not
        the `GatedModel` wrapper, which has no config."""
        wrapper, self.model = self.model, self.student
        try:
            super().create_model_card(*args, **kwargs)
        finally:
            self.model = wrapper


class GatedModel(nn.Module):
    """The module the Trainer wraps: the student plus (when pruning) its L0 gates and multipliers.

    Gates live here so DDP syncs them and checkpoints carry them. `forward(step=fn)` runs a whole training step
    (`fn(self)`) inside the wrapped module's forward: DDP only all-reduces gradients of a backward that follows a
    forward through its wrapper, and the step touches the student, the gates and the Lagrangian.
    """

    def __init__(self, student: nn.Module, l0: ModalL0Module | None = None):
        super().__init__()
        self.student = student
        self.l0 = l0

    def forward(self, step=None, **inputs):
        if step is not None:
            return step(self)
        masks = None
        if self.l0 is not None:
            masks = self.l0.sample_masks() if self.training else self.l0.deterministic_masks()
        return self.student(**inputs, pruning_masks=masks)


class L0Callback(TrainerCallback):
    """Resolves the default sparsity warm-up and freeze step at the start, clamps log α after every optimizer step
    and freezes the structure at `freeze_masks_step`."""

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if not isinstance(model, GatedModel) or model.l0 is None:
            return
        if args.freeze_masks_step is None:  # leave the weights a tail under the structure that is exported
            args.freeze_masks_step = default_freeze_step(getattr(args, "freeze_masks_at", 1.0), state.max_steps)
        if args.sparsity_warmup_steps is not None:
            return
        try:
            per_epoch = len(train_dataloader) // max(1, args.gradient_accumulation_steps)
        except TypeError:  # a stream without length: epochs are undefined
            per_epoch = None
        args.sparsity_warmup_steps = default_sparsity_warmup(per_epoch, state.max_steps)
        model.l0.warmup_steps = args.sparsity_warmup_steps

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # the Trainer hands callbacks its unwrapped model: the GatedModel itself
        if not isinstance(model, GatedModel) or model.l0 is None:
            return
        if bool(model.l0.frozen):  # log α no longer trains; clamping a snapped structure would move its cut
            return
        model.l0.clamp_()
        if args.freeze_masks_step is not None and state.global_step >= args.freeze_masks_step:
            _freeze(model.l0, args, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        # never frozen: the structure the run ends with (what export materializes) is snapped here
        if isinstance(model, GatedModel) and model.l0 is not None:
            _freeze(model.l0, args, state.global_step)


def _freeze(l0: ModalL0Module, args, step: int) -> None:
    """Freezes the structure once (snapping it to the target first with `--snap_to_target`) and logs what it got."""
    if bool(l0.frozen):
        return
    before = l0.achieved_sparsity()["budget"]["total"].item()
    if getattr(args, "uniform_split", False):
        removed = l0.snap_uniform_()
        deltas = {"uniform per layer": float(sum(removed.values()))}
    else:
        deltas = l0.snap_to_target_() if getattr(args, "snap_to_target", False) else {}
    achieved = l0.achieved_sparsity()
    l0.freeze()
    logger.info(
        "step %d: structure frozen; deterministic masks remove %.4f of the %s budget (%.4f before snapping to the "
        "target, log α shifted by %s), %.4f of the prunable parameters", step, achieved["budget"]["total"].item(),
        l0.budget, before, {k: round(v, 4) for k, v in deltas.items()} or "nothing", achieved["params"]["total"].item(),
    )


class EfficientVLMPruningTrainer(EfficientVLMDistillationTrainer):
    """Task fine-tuning with task KD + hard-concrete gates + Lagrangian (modal-adaptive pruning).

    `model` must be a `GatedModel` (see `make_gated_model`). Gate log α use their own group (lr = reg_learning_rate,
    no weight decay); the λs their own group with `maximize=True` (gradient ascent); both keep a constant lr while the
    weights follow the usual schedule.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.model.l0 is None:
            raise TypeError("EfficientVLMPruningTrainer needs a GatedModel with a ModalL0Module (make_gated_model)")
        if not isinstance(self.args, PruningArguments):
            raise TypeError("EfficientVLMPruningTrainer needs PruningArguments")
        self.args.apply_task_defaults(self.task.prune_defaults)
        self.add_callback(L0Callback())
        self._l0_logs: dict[str, float] = {}

    def _masks(self, gated: GatedModel):
        if gated.training and not bool(gated.l0.frozen):
            return gated.l0.sample_masks(self.noise_generator)
        return gated.l0.deterministic_masks()

    def _add_regularisers(self, gated: GatedModel, total, parts):
        if bool(gated.l0.frozen):  # the structure is fixed: no Lagrangian, so log α and λ get no gradient at all
            self._l0_logs = {"masks_frozen": 1.0}
            return total
        lagrangian, self._l0_logs = gated.l0.lagrangian(self.state.global_step)
        parts["lagrangian"] = lagrangian
        return total + lagrangian.to(total.device)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs.update({k: round(v, 6) for k, v in self._l0_logs.items()})
        super().log(logs, start_time)

    def create_optimizer(self, model=None):
        """Weights: the Trainer's AdamW groups; log α: own group; λ: own group with maximize=True."""
        if self.optimizer is not None:
            return self.optimizer
        gated = self.model
        gate_ids = {id(p) for p in gated.l0.parameters()}
        decay = set(self.get_decay_parameter_names(gated))
        weights = [(n, p) for n, p in gated.named_parameters() if id(p) not in gate_ids and p.requires_grad]
        optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, gated)
        groups = [
            {"params": [p for n, p in weights if n in decay], "weight_decay": self.args.weight_decay},
            {"params": [p for n, p in weights if n not in decay], "weight_decay": 0.0},
            {"params": gated.l0.gate_parameters(), "weight_decay": 0.0, "lr": self.args.reg_learning_rate,
             "betas": (0.9, 0.98)},
            # official `create_L0_optimizer`: AdamW (0.9, 0.98) for λ too (there by a negative lr)
            {"params": gated.l0.lambda_parameters(), "weight_decay": 0.0, "lr": self.args.reg_learning_rate,
             "betas": (0.9, 0.98), "maximize": True},
        ]
        self.optimizer = optimizer_cls(groups, **kwargs)
        return self.optimizer

    def _clip_grad_norm(self, model):
        """`--max_grad_norm` clips the weights only: log α and λ keep their own gradients (the official pruning loop
        clips nothing; a joint norm would tie their steps to the size of the weights' gradients)."""
        gates = {id(p) for p in self.model.l0.parameters()}
        weights = [p for p in model.parameters() if id(p) not in gates]
        return self.accelerator.clip_grad_norm_(weights, self.args.max_grad_norm)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """The usual schedule for the weights; constant lr for the gates and the multipliers."""
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if hasattr(scheduler, "lr_lambdas") and len(scheduler.lr_lambdas) == 4:
            scheduler.lr_lambdas[2] = scheduler.lr_lambdas[3] = _constant
        return scheduler


def _constant(_step: int) -> float:
    return 1.0


def make_gated_model(student: nn.Module, args: PruningArguments, task) -> GatedModel:
    """Wraps a student with a ModalL0Module built from its config and the pruning arguments (an unset warm-up is
    resolved when training starts, see `L0Callback`); `--budget flops` weighs every unit by its FLOPs on `task`'s
    inference path. `task`: a `training.tasks.Task` (its `prune_defaults`, `cost_path` and `path_sizes` are read),
    resolved by the caller."""
    if args.target_sparsity is None:  # the task's official target (the other task defaults: see the trainer)
        args.target_sparsity = task.prune_defaults.get("target_sparsity", 0.25)
    if args.latency_table and args.budget != "latency":
        raise ValueError("--latency_table is the cost table of a latency budget: give it with --budget latency")
    cost_path = table = None
    if args.budget == "flops":
        cost_path = path_to_json(inference_path(task, student.config, args.budget_path))
    if args.budget == "latency":
        if not args.latency_table and args.world_size > 1:  # every process must price the units alike
            raise ValueError("--budget latency on several processes needs --latency_table (measure it once with "
                             "`efficientvlm latency-table` on the serving device)")
        table, _ = latency_table_for(student.config, task, args.latency_table, args.budget_path, args.output_dir)
    l0 = ModalL0Module(
        student.config,
        target_sparsity=args.target_sparsity,
        # the uniform baseline holds every encoder to the target by its own multipliers (`--uniform_split`)
        modality_targets={**({m: args.target_sparsity for m in modalities(student.config)} if args.uniform_split
                             else {}), **args.modality_targets},
        one_sided=args.one_sided_lagrangian,
        warmup_steps=args.sparsity_warmup_steps or 0,
        budget=args.budget,
        cost_path=cost_path,
        layer_gates=args.layer_gates,
        hidden_gates=args.hidden_gates,
        latency_table=table,
        head_init_log_alpha=args.head_init_log_alpha,
    )
    return GatedModel(student, l0)
