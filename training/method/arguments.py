"""Arguments of the training stages: `TrainingArguments` plus distillation weights, plus modal-adaptive pruning."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments


@dataclass
class DistillationArguments(TrainingArguments):
    """TrainingArguments plus the distillation weights: total = λ·L_VLP + (1−λ)·(α·L_attn + β·L_hid + γ·L_logits)."""

    lambda_vlp: float = field(
        default=0.6, metadata={"help": "λ: weight of the VLP losses (ITC+ITM+MLM+BBOX), in [0, 1]."}
    )
    alpha_attn: float = field(default=1.0, metadata={"help": "α: weight of attention-map KD (MSE on probabilities)."})
    beta_hidden: float = field(default=1.0, metadata={"help": "β: weight of hidden-state KD (MSE)."})
    gamma_logits: float = field(default=1.0, metadata={"help": "γ: weight of logit KD (KL, T² scaled)."})
    kd_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature T of logit KD (> 0)."})
    image_hidden_weight: float = field(
        default=0.1, metadata={"help": "Down-weighting of vision hidden-state KD (official code: 0.1-0.2)."}
    )
    distill_itc: bool = field(default=False, metadata={"help": "Also distil the ITC similarity matrix (both ways)."})
    cross_attention_kd: bool = field(
        default=False, metadata={"help": "Also distil fusion cross-attention maps (general distillation: off)."}
    )
    attention_key_length_scale: bool = field(
        default=True, metadata={"help": "Scale attention MSE by the key length (official code), so maps of any "
                                        "length weigh alike."}
    )
    itm_negatives_warmup_steps: int = field(
        default=0,
        metadata={"help": "The share of ITM negatives drawn uniformly at random falls from 1 to 0 over this many steps "
                          "(the rest from softmax(sim/τ)); 0 = all hard from the start (ALBEF / X-VLM). Lets a fusion "
                          "encoder trained from scratch leave the ITM prior."},
    )
    use_mlm: bool = field(default=True, metadata={"help": "Use MLM (loss and KD) when the batch has masked text."})
    overwrite: bool = field(
        default=False,
        metadata={"help": "Write into an --output_dir that holds a complete run or a model (default: refuse; an "
                          "unfinished run's folder is always reusable, and an --output_dir that is one of the "
                          "stage's inputs is always refused)."},
    )
    bbox_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of X-VLM's box loss L_BBOX (L1 + 1 − GIoU of the box head's prediction for a phrase "
                          "about one object against its box) in L_VLP; used when the model has a box head (pre-training "
                          "model) and the batch has boxes (synthetic scenes, JSON 'elems'); 0 = off."},
    )
    itc_global_batch: bool = field(
        default=False,
        metadata={"help": "Multi-process: contrast each rank's pairs against the features of all ranks (X-VLM)."},
    )

    def __post_init__(self):
        if self.lambda_vlp is not None and not 0.0 <= self.lambda_vlp <= 1.0:
            raise ValueError(f"lambda_vlp must lie in [0, 1], got {self.lambda_vlp}")
        for name in ("alpha_attn", "beta_hidden", "gamma_logits", "image_hidden_weight", "bbox_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.itm_negatives_warmup_steps < 0:
            raise ValueError(f"itm_negatives_warmup_steps must be >= 0, got {self.itm_negatives_warmup_steps}")
        if not self.kd_temperature > 0:
            raise ValueError(f"kd_temperature must be > 0, got {self.kd_temperature}")
        self.remove_unused_columns = False  # image batches: keep pixel_values
        if self.dataloader_pin_memory and (self.use_cpu or not _accelerator_available()):
            self.dataloader_pin_memory = False  # pinning needs an accelerator; on CPU the DataLoader warns each epoch
        if self.ddp_find_unused_parameters is None:  # a step may skip sub-layers (all-zero masks) or heads (no MLM)
            self.ddp_find_unused_parameters = True
        super().__post_init__()


def _accelerator_available() -> bool:
    """Whether torch sees an accelerator (CUDA, MPS, XPU...): what the DataLoader's pin_memory needs."""
    accelerator = getattr(torch, "accelerator", None)
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


TASK_DEFAULT = "default: the task's official value"


@dataclass
class PruningArguments(DistillationArguments):
    """Distillation arguments plus modal-adaptive pruning (paper §3.2; CoFi).

    Task-KD settings left unset (None) take the task's official values (`Task.prune_defaults`; `prune --help` lists
    them per task) when the trainer is built; the target sparsity warms up over the first epoch (a tenth of the run
    when the data is a stream or the run is shorter than two epochs).
    """

    lambda_vlp: float | None = field(
        default=None, metadata={"help": f"λ of λ·task + (1−λ)·KD ({TASK_DEFAULT})."}
    )
    cross_attention_kd: bool | None = field(
        default=None, metadata={"help": f"Distil fusion cross-attention maps in task KD ({TASK_DEFAULT})."}
    )
    target_sparsity: float | None = field(
        default=None,
        metadata={"help": f"Global target sparsity of the prunable params (FLOPs / seconds with --budget flops / "
                          f"latency), [0,1) ({TASK_DEFAULT})."},
    )
    vision_target: float | None = field(default=None, metadata={"help": "Own target for the vision encoder."})
    text_target: float | None = field(default=None, metadata={"help": "Own target for the text encoder."})
    fusion_target: float | None = field(default=None, metadata={"help": "Own target for the fusion encoder."})
    decoder_target: float | None = field(
        default=None, metadata={"help": "Own target for the answer decoder (VQA models only)."}
    )
    budget: str = field(
        default="params",
        metadata={"help": "What --target_sparsity (and the per-encoder targets) are fractions of: 'params' (the paper: "
                          "prunable parameters), 'flops' (FLOPs of the task's inference path, see --budget_path) "
                          "or 'latency' (seconds on that path by a latency table measured on the target device, see "
                          "--latency_table)."},
    )
    budget_path: str = field(
        default="",
        metadata={"help": "--budget flops / latency: sizes of the inference path, e.g. 'images=5000,texts=25000,k=256,"
                          "text_length=40' (retrieval; default: the COCO 5k protocol) or 'items=1000,text_length=40' "
                          "(nlvr2); unnamed sizes keep the task's defaults. Every task also takes image_tokens=N: price the "
                          "units at N vision tokens (e.g. 197 = 224 px / 16 when a small proxy trains at 32 px)."},
    )
    latency_table: str = field(
        default="",
        metadata={"help": "--budget latency: a JSON table from `efficientvlm latency-table`, measured on the device the "
                          "model will serve on (default: measured now on the training device, on the --budget_path "
                          "path, and saved as latency_table.json in --output_dir). compare-splits: the table of its "
                          "latency strategies."},
    )
    layer_gates: bool = field(
        default=False,
        metadata={"help": "CoFi's sub-layer gates on top of the head / neuron gates: whole attention, cross-attention "
                          "and FFN sub-layers can be removed."},
    )
    hidden_gates: bool = field(
        default=False,
        metadata={"help": "CoFi's hidden-dimension gates: one gate per residual channel of the vision stream and of the "
                          "text stream (text + fusion); materialize shrinks the widths (retrieval / NLVR2)."},
    )
    head_init_log_alpha: float = field(
        default=10.0,
        metadata={"help": "Initial log α of the head gates (the paper: 10, clamped to 4.6 after one step; FFN neurons "
                          "start at 0). In short runs such heads never reach the cut and only FFN neurons are pruned; "
                          "0 starts heads where the neurons start, so the budget's prices decide between them."},
    )
    snap_to_target: bool = field(
        default=True,
        metadata={"help": "When the structure is frozen (--freeze_masks_step / --freeze_masks_at) shift every "
                          "gate's log α by one common δ so the deterministic masks meet the target exactly (the "
                          "Lagrangian only holds the expected sparsity on average and overshoots in short runs)."},
    )
    uniform_split: bool = field(
        default=False,
        metadata={"help": "The uniform baseline: every encoder is held to the target by its own multipliers while the "
                          "gates train, and when the structure is frozen every layer of every encoder is cut to the "
                          "same share of its prunable parameters (instead of snapping the learned split to the "
                          "budget). Per-encoder targets default to --target_sparsity."},
    )
    one_sided_lagrangian: bool = field(default=False, metadata={"help": "TinyCLIP's λ1·max(t−ŝ,0)+λ2·max(t−ŝ,0)²."})
    reg_learning_rate: float | None = field(
        default=None,
        metadata={"help": f"LR of the gates' log α and of λ (ascent) ({TASK_DEFAULT})."},
    )
    sparsity_warmup_steps: int | None = field(
        default=None,
        metadata={"help": "Steps over which the target ramps from 0 (default: one epoch, as the official code; a "
                          "tenth of max_steps for streamed data or runs shorter than two epochs; 0 = no warm-up)."},
    )
    freeze_masks_step: int | None = field(
        default=None,
        metadata={"help": "From this step on the structure is fixed (snapped to the target first, see "
                          "--snap_to_target): deterministic masks, no Lagrangian, no updates of log α or λ; only the "
                          "weights train, under the structure that is exported (default: --freeze_masks_at of the "
                          "steps)."},
    )
    freeze_masks_at: float = field(
        default=0.85,
        metadata={"help": "Without --freeze_masks_step: the structure is frozen and snapped after this share of "
                          "max_steps, so the weights fine-tune for the rest under the exported structure (the official "
                          "code trains sampled masks to the last step and exports the deterministic masks of the end, "
                          "a structure no step ran); 1 = "
                          "at the end of training (snapped, never trained). Retrieval demo, 300 steps, target 0.5, "
                          "seeds 0/1/2: r_mean 77.1/77.9/76.9 at 0.85 vs 73.7/75.3/74.8 at 1 (docs/retrieval-demo.md)."},
    )

    def __post_init__(self):
        for name in ("target_sparsity", "vision_target", "text_target", "fusion_target", "decoder_target"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {value}")
        if self.budget not in ("params", "flops", "latency"):
            raise ValueError(f"budget must be 'params', 'flops' or 'latency', got {self.budget!r}")
        if self.budget_path and self.budget == "params":
            raise ValueError("--budget_path sets the sizes of a FLOPs / latency budget: give it with --budget flops or "
                             "--budget latency")
        if self.latency_table and self.budget_path:
            raise ValueError("--latency_table already fixes the path it was measured on; drop --budget_path")
        if not math.isfinite(self.head_init_log_alpha):
            raise ValueError(f"head_init_log_alpha must be a finite number, got {self.head_init_log_alpha}")
        if self.reg_learning_rate is not None and self.reg_learning_rate <= 0:
            raise ValueError(f"reg_learning_rate must be > 0, got {self.reg_learning_rate}")
        if self.sparsity_warmup_steps is not None and self.sparsity_warmup_steps < 0:
            raise ValueError(f"sparsity_warmup_steps must be >= 0, got {self.sparsity_warmup_steps}")
        if self.freeze_masks_step is not None and self.freeze_masks_step < 0:
            raise ValueError(f"freeze_masks_step must be >= 0, got {self.freeze_masks_step}")
        if not 0.0 < self.freeze_masks_at <= 1.0:
            raise ValueError(f"freeze_masks_at must lie in (0, 1], got {self.freeze_masks_at}")
        super().__post_init__()

    def apply_task_defaults(self, defaults: dict) -> None:
        """Fills every field still None with the task's official value (`Task.prune_defaults`)."""
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    @property
    def modality_targets(self) -> dict[str, float]:
        targets = {"vision": self.vision_target, "text": self.text_target, "fusion": self.fusion_target,
                   "decoder": self.decoder_target}
        return {k: v for k, v in targets.items() if v is not None}


def default_freeze_step(freeze_masks_at: float, max_steps: int) -> int | None:
    """The step the structure is frozen at when --freeze_masks_step is unset: `freeze_masks_at` of the run (at least
    one step in, so the gates train), None (at the end) for 1."""
    if freeze_masks_at >= 1.0:
        return None
    return max(1, int(freeze_masks_at * max_steps))


def default_sparsity_warmup(steps_per_epoch: int | None, max_steps: int) -> int:
    """One epoch (official), or a tenth of the run when epochs are unknown (streams) or the run is under two epochs."""
    if steps_per_epoch and 2 * steps_per_epoch <= max_steps:
        return steps_per_epoch
    return max(1, max_steps // 10)
