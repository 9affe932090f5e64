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
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from . import losses as L
from .l0 import ModalL0Module
from .structure import ENCODER_CONFIG_KEYS, MODALITIES

GATES_FILE = "l0_gates.safetensors"
NOISE_RNG_FILE = "noise_rng.safetensors"  # hard-concrete noise + ITM negative sampling generator
STAGING_DIR = ".checkpoint-staging"


# ----------------------------------------------------------------------------------------------------- arguments
@dataclass
class DistillationArguments(TrainingArguments):
    """TrainingArguments plus the distillation weights: total = λ·L_VLP + (1−λ)·(α·L_attn + β·L_hid + γ·L_logits)."""

    lambda_vlp: float = field(default=0.6, metadata={"help": "λ: weight of the VLP losses (ITC+ITM+MLM), in [0, 1]."})
    alpha_attn: float = field(default=1.0, metadata={"help": "α: weight of attention-map KD (MSE on probabilities)."})
    beta_hidden: float = field(default=1.0, metadata={"help": "β: weight of hidden-state KD (MSE)."})
    gamma_logits: float = field(default=1.0, metadata={"help": "γ: weight of logit KD (KL, T² scaled)."})
    kd_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature T of logit KD (> 0)."})
    image_hidden_weight: float = field(
        default=0.1, metadata={"help": "Down-weighting of vision hidden-state KD (official code: 0.1-0.2)."}
    )
    distill_itc: bool = field(default=False, metadata={"help": "Also distil the ITC similarity matrix (both ways)."})
    cross_attention_kd: bool = field(default=False, metadata={"help": "Also distil fusion cross-attention maps."})
    attention_key_length_scale: bool = field(
        default=True, metadata={"help": "Scale attention MSE by the key length (official code), so maps of any "
                                        "length weigh alike."}
    )
    use_mlm: bool = field(default=True, metadata={"help": "Use MLM (loss and KD) when the batch has masked text."})
    itc_global_batch: bool = field(
        default=False,
        metadata={"help": "Multi-process: contrast each rank's pairs against the features of all ranks (X-VLM)."},
    )

    def __post_init__(self):
        if not 0.0 <= self.lambda_vlp <= 1.0:
            raise ValueError(f"lambda_vlp must lie in [0, 1], got {self.lambda_vlp}")
        for name in ("alpha_attn", "beta_hidden", "gamma_logits", "image_hidden_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.kd_temperature > 0:
            raise ValueError(f"kd_temperature must be > 0, got {self.kd_temperature}")
        self.remove_unused_columns = False  # image batches: keep pixel_values
        if self.ddp_find_unused_parameters is None:  # a step may skip sub-layers (all-zero masks) or heads (no MLM)
            self.ddp_find_unused_parameters = True
        super().__post_init__()


@dataclass
class PruningArguments(DistillationArguments):
    """Distillation arguments plus modal-adaptive pruning (REFERENCE §3)."""

    lambda_vlp: float = field(default=0.5, metadata={"help": "λ (retrieval: 0.5·(KD + ITC + ITM))."})
    target_sparsity: float = field(default=0.25, metadata={"help": "Global target sparsity of prunable params, [0,1)."})
    vision_target: float | None = field(default=None, metadata={"help": "Own target for the vision encoder."})
    text_target: float | None = field(default=None, metadata={"help": "Own target for the text encoder."})
    fusion_target: float | None = field(default=None, metadata={"help": "Own target for the fusion encoder."})
    one_sided_lagrangian: bool = field(default=False, metadata={"help": "TinyCLIP's λ1·max(t−ŝ,0)+λ2·max(t−ŝ,0)²."})
    reg_learning_rate: float = field(default=0.01, metadata={"help": "LR of the gates' log α and of λ (ascent)."})
    sparsity_warmup_steps: int = field(default=0, metadata={"help": "Steps over which the target ramps from 0."})
    freeze_masks_step: int | None = field(
        default=None, metadata={"help": "From this step on use deterministic masks and stop training the gates."}
    )

    def __post_init__(self):
        for name in ("target_sparsity", "vision_target", "text_target", "fusion_target"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {value}")
        if self.reg_learning_rate <= 0:
            raise ValueError(f"reg_learning_rate must be > 0, got {self.reg_learning_rate}")
        if self.sparsity_warmup_steps < 0:
            raise ValueError(f"sparsity_warmup_steps must be >= 0, got {self.sparsity_warmup_steps}")
        super().__post_init__()

    @property
    def modality_targets(self) -> dict[str, float]:
        targets = {"vision": self.vision_target, "text": self.text_target, "fusion": self.fusion_target}
        return {k: v for k, v in targets.items() if v is not None}


# ------------------------------------------------------------------------------------------- the distillation step
def layer_maps(student_config, teacher_config) -> dict[str, dict[str, list[tuple[int, int]]]]:
    """Per encoder: attention map (student layer i ↔ teacher layer 2i+1) and hidden map (incl. embeddings 0 ↔ 0)."""
    maps = {}
    for modality in MODALITIES:
        s = getattr(student_config, ENCODER_CONFIG_KEYS[modality]).num_hidden_layers
        t = getattr(teacher_config, ENCODER_CONFIG_KEYS[modality]).num_hidden_layers
        maps[modality] = {
            "attn": L.default_layer_map(s, t, include_embeddings=False),
            "hidden": L.default_layer_map(s, t, include_embeddings=True),
        }
    return maps


def _forward_all(
    model, inputs, masks, pairs, attn: bool, hidden: bool, cross: bool, mlm: bool, image=None, text=None
) -> dict:
    """Runs one model on a batch: encoders (unless given), ITC, ITM on the given (image, text) pairs, MLM."""
    if image is None:
        image = model.encode_image(inputs["pixel_values"], masks, attn, hidden)
    if text is None:
        text = model.encode_text(inputs["input_ids"], inputs["attention_mask"], masks, attn, hidden)
    image_feat, text_feat = model.image_itc_embeds(image.last_hidden_state), model.text_itc_embeds(text.last_hidden_state)
    out = {"image": image, "text": text, "image_feat": image_feat, "text_feat": text_feat}
    out["sim_i2t"] = image_feat @ text_feat.t() / model.temperature
    if pairs is not None:
        image_idx, text_idx = pairs
        out["itm_logits"], out["fusion"] = model.itm_logits(
            text.last_hidden_state[text_idx],
            inputs["attention_mask"][text_idx],
            image.last_hidden_state[image_idx],
            masks,
            attn or cross,
            hidden,
        )
    if mlm:
        out["mlm_logits"], _, _ = model.mlm_logits(
            inputs["mlm_input_ids"], inputs["attention_mask"], image.last_hidden_state, masks
        )
    return out


def _attention_kd(
    student: dict, teacher: dict, maps: dict, inputs: dict, pairs, cross: bool, scale: bool = True
) -> torch.Tensor:
    terms = []
    for modality, key in (("vision", "image"), ("text", "text"), ("fusion", "fusion")):
        s_attn, t_attn = student[key].attentions, teacher[key].attentions
        pairs_map = [(i, j) for i, j in maps[modality]["attn"] if s_attn[i] is not None and t_attn[j] is not None]
        if not pairs_map:
            continue
        query_mask = None if modality == "vision" else inputs["attention_mask"][pairs[1]] if key == "fusion" else inputs["attention_mask"]
        terms.append(L.attention_kd_loss(list(s_attn), list(t_attn), pairs_map, query_mask, scale))
        if cross and modality == "fusion":
            s_cross, t_cross = student[key].cross_attentions, teacher[key].cross_attentions
            cross_map = [(i, j) for i, j in maps[modality]["attn"] if s_cross[i] is not None and t_cross[j] is not None]
            if cross_map:
                terms.append(L.attention_kd_loss(list(s_cross), list(t_cross), cross_map, query_mask, scale))
    return sum(terms) / len(terms) if terms else torch.zeros(())


def _hidden_kd(student: dict, teacher: dict, maps: dict, image_weight: float) -> torch.Tensor:
    total = torch.zeros(())
    for modality, key, weight in (("vision", "image", image_weight), ("text", "text", 1.0), ("fusion", "fusion", 1.0)):
        s_hidden, t_hidden = student[key].hidden_states, teacher[key].hidden_states
        total = total + weight * L.hidden_kd_loss(list(s_hidden), list(t_hidden), maps[modality]["hidden"])
    return total


def distillation_losses(
    student, teacher, inputs: dict, args: DistillationArguments, maps: dict, masks=None, generator=None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """VLP losses of the student + KD from the teacher on the same batch and the same ITM pairs.

    ITM hard negatives are sampled ONCE, from the student's ITC similarity (that is what the student must learn to
    reject), and the teacher is scored on exactly those (image, text) pairs.
    """
    use_attn, use_hidden = teacher is not None and args.alpha_attn > 0, teacher is not None and args.beta_hidden > 0
    use_mlm = args.use_mlm and "mlm_input_ids" in inputs and hasattr(student, "mlm_head")
    batch = inputs["input_ids"].shape[0]
    # student ITC first: its similarities choose the negatives
    s_image = student.encode_image(inputs["pixel_values"], masks, use_attn, use_hidden)
    s_text = student.encode_text(inputs["input_ids"], inputs["attention_mask"], masks, use_attn, use_hidden)
    sim = student.image_itc_embeds(s_image.last_hidden_state) @ student.text_itc_embeds(s_text.last_hidden_state).t()
    neg_text, neg_image = L.sample_itm_negatives(sim.detach().float(), generator=generator)
    image_idx, text_idx, itm_labels = L.build_itm_pairs(neg_text, neg_image, batch)
    pairs = (image_idx.to(sim.device), text_idx.to(sim.device))
    cross = args.cross_attention_kd
    if teacher is None:  # teacher pre-training: VLP losses only
        use_attn = use_hidden = cross = False
    s = _forward_all(student, inputs, masks, pairs, use_attn, use_hidden, cross, use_mlm, s_image, s_text)
    vlp = {
        "itc": _itc(s["image_feat"], s["text_feat"], student.temperature, args.itc_global_batch),
        "itm": L.itm_loss(s["itm_logits"], itm_labels.to(sim.device)),
    }
    if use_mlm:
        vlp["mlm"] = L.mlm_loss(s["mlm_logits"], inputs["mlm_labels"])
    if teacher is None:
        return L.combine_losses(vlp, {}, 1.0, 0.0, 0.0, 0.0)
    with torch.no_grad():
        t = _forward_all(teacher, inputs, None, pairs, use_attn, use_hidden, cross, use_mlm)
    kd_logits = L.logit_kd_loss(s["itm_logits"], t["itm_logits"], args.kd_temperature)
    if use_mlm:
        masked = inputs["mlm_labels"] != -100
        kd_logits = kd_logits + L.logit_kd_loss(s["mlm_logits"][masked], t["mlm_logits"][masked], args.kd_temperature)
    if args.distill_itc:
        kd_logits = kd_logits + L.itc_kd_loss(s["sim_i2t"], t["sim_i2t"], args.kd_temperature)
    kd = {"logits": kd_logits}
    if use_attn:
        kd["attn"] = _attention_kd(
            s, t, maps, inputs, pairs, args.cross_attention_kd, args.attention_key_length_scale
        ).to(sim.device)
    if use_hidden:
        kd["hidden"] = _hidden_kd(s, t, maps, args.image_hidden_weight).to(sim.device)
    return L.combine_losses(vlp, kd, args.lambda_vlp, args.alpha_attn, args.beta_hidden, args.gamma_logits)


def _itc(image_feat: torch.Tensor, text_feat: torch.Tensor, temperature, global_batch: bool) -> torch.Tensor:
    """ITC on the local batch, or (multi-process, `global_batch`) against the features gathered from every rank.

    `torch.distributed.nn.all_gather` is differentiable, and DDP averages the gradients of the per-rank means, so
    the update equals that of one process computing the loss over the global batch.
    """
    import torch.distributed as dist

    if not (global_batch and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return L.itc_loss(image_feat, text_feat, temperature)
    from torch.distributed.nn.functional import all_gather

    all_image, all_text = torch.cat(all_gather(image_feat)), torch.cat(all_gather(text_feat))
    offset = dist.get_rank() * image_feat.shape[0]
    return L.itc_loss_global(image_feat, text_feat, all_image, all_text, temperature, offset)


# ------------------------------------------------------------------------------------------------------ trainers
class EfficientVLMDistillationTrainer(Trainer):
    """Trains a student with VLP losses + KD from a frozen teacher (kept in eval mode, run under no_grad).

    Args:
        teacher_model: the teacher (any EfficientVLM head class compatible with the student's task).
        *args, **kwargs: as `transformers.Trainer`; `args` must be a `DistillationArguments`.
    """

    def __init__(self, model: nn.Module | None = None, *args, teacher_model: nn.Module | None, **kwargs):
        if model is not None and not isinstance(model, GatedModel):
            model = GatedModel(model)  # the step runs inside the wrapped forward (DDP), see GatedModel
        super().__init__(model, *args, **kwargs)
        if not isinstance(self.args, DistillationArguments):
            raise TypeError("EfficientVLMDistillationTrainer needs DistillationArguments (or PruningArguments)")
        self.teacher = teacher_model
        self.maps = None
        if teacher_model is not None:  # None: teacher pre-training with the VLP losses only
            self.teacher = teacher_model.to(self.args.device).eval()
            self.teacher.requires_grad_(False)
            _check_compatible(self.student.config, self.teacher.config, self.args.beta_hidden > 0)
            self.maps = layer_maps(self.student.config, self.teacher.config)
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
        losses_fn = distillation_losses
        if inputs["pixel_values"].dim() == 5:  # (B, 2, C, H, W): NLVR2-style pairs of images with labels
            from .nlvr2 import nlvr2_losses as losses_fn

        def step(gated: GatedModel):
            total, parts = losses_fn(
                gated.student, self.teacher, inputs, self.args, self.maps, self._masks(gated), self.noise_generator
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
        if gated.l0 is not None:
            gated.l0.save(os.path.join(output_dir, GATES_FILE))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        gated = self.model
        loaded = type(gated.student).from_pretrained(resume_from_checkpoint)
        gated.student.load_state_dict(loaded.state_dict())
        if gated.l0 is not None:
            gated.l0.load_state_dict(load_file(os.path.join(resume_from_checkpoint, GATES_FILE)))

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


def _check_compatible(student_config, teacher_config, hidden_kd: bool) -> None:
    """KD compares tokens and logits position by position: vocabularies and widths must agree."""
    s_text, t_text = student_config.text_config, teacher_config.text_config
    if s_text.vocab_size != t_text.vocab_size:
        raise ValueError(
            f"student vocab_size ({s_text.vocab_size}) != teacher vocab_size ({t_text.vocab_size}): MLM/ITM KD needs one "
            "tokenizer"
        )
    for key in ENCODER_CONFIG_KEYS.values() if hidden_kd else ():
        s, t = getattr(student_config, key).hidden_size, getattr(teacher_config, key).hidden_size
        if s != t:
            raise ValueError(
                f"{key}.hidden_size differs (student {s}, teacher {t}): hidden-state KD would need a projection; set "
                "beta_hidden=0 or use equal widths"
            )


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
    """Clamps log α after every optimizer step and freezes the masks at `freeze_masks_step`."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # the Trainer hands callbacks its unwrapped model: the GatedModel itself
        if not isinstance(model, GatedModel) or model.l0 is None:
            return
        model.l0.clamp_()
        if args.freeze_masks_step is not None and state.global_step >= args.freeze_masks_step:
            model.l0.freeze()


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
        self.add_callback(L0Callback())
        self._l0_logs: dict[str, float] = {}

    def _masks(self, gated: GatedModel):
        if gated.training and not bool(gated.l0.frozen):
            return gated.l0.sample_masks(self.noise_generator)
        return gated.l0.deterministic_masks()

    def _add_regularisers(self, gated: GatedModel, total, parts):
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
            {"params": gated.l0.lambda_parameters(), "weight_decay": 0.0, "lr": self.args.reg_learning_rate,
             "maximize": True},
        ]
        self.optimizer = optimizer_cls(groups, **kwargs)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """The usual schedule for the weights; constant lr for the gates and the multipliers."""
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if hasattr(scheduler, "lr_lambdas") and len(scheduler.lr_lambdas) == 4:
            scheduler.lr_lambdas[2] = scheduler.lr_lambdas[3] = _constant
        return scheduler


def _constant(_step: int) -> float:
    return 1.0


def make_gated_model(student: nn.Module, args: PruningArguments) -> GatedModel:
    """Wraps a student with a ModalL0Module built from its config and the pruning arguments."""
    l0 = ModalL0Module(
        student.config,
        target_sparsity=args.target_sparsity,
        modality_targets=args.modality_targets,
        one_sided=args.one_sided_lagrangian,
        warmup_steps=args.sparsity_warmup_steps,
    )
    return GatedModel(student, l0)
