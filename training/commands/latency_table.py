"""`efficientvlm latency-table`: measure, once and on the serving device, what every prunable unit of a student costs
on its task's inference path, for `prune --budget latency --latency_table FILE` (see `training.method.latency_table`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from modeling_efficientvlm import EfficientVLMConfig

from ..method.cost import vision_tokens
from ..method.latency_table import (
    check_latency_table, format_latency_table, measure_latency_table, save_latency_table, transfer_table,
)
from ..method.student import student_config
from ..infra.presets import preset_config
from ..tasks import TASKS, task_path


@dataclass
class LatencyTableArguments:
    """Arguments of `efficientvlm latency-table`."""

    student: str = field(metadata={"help": "The student to be pruned (a checkpoint folder; only its config is read)."})
    output_json: str = field(metadata={"help": "Where to write the table (JSON), for prune --latency_table.",
                                       "aliases": ["--output"]})
    task: str = field(default="retrieval", metadata={"help": f"Whose inference path: one of {sorted(TASKS)}."})
    budget_path: str = field(
        default="",
        metadata={"help": "Sizes of the path, as prune --budget_path (e.g. 'images=8,texts=8,k=4,text_length=40'); "
                          "unnamed sizes keep the task's evaluation protocol."},
    )
    price_at: str = field(
        default="",
        metadata={"help": "Time the sub-layers of this bench preset's student instead (e.g. 'xvlm-clip': the paper's "
                          "6/3/3 shapes at --image_size) and price --student's units by them: for a narrow proxy "
                          "pruned in place of the deployment model (each group reads the preset's group at the same "
                          "relative depth; a unit costs per_unit × preset size / proxy size)."},
    )
    image_size: int = field(default=224, metadata={"help": "--price_at: the preset's image size."})
    device: str = field(default="cpu", metadata={"help": "The serving device: cpu or cuda."})
    dtype: str = field(default="float32", metadata={"help": "float32, float16 or bfloat16."})
    threads: int = field(default=0, metadata={"help": "torch threads on CPU (0 = leave as is)."})
    batch: int = field(default=16, metadata={"help": "Sequences per timed call (scaled to each run's count)."})
    points: int = field(default=4, metadata={"help": "Unit counts timed per sub-layer for the line fit."})
    repeats: int = field(default=7, metadata={"help": "Timed samples per unit count (median)."})

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"--task must be one of {sorted(TASKS)}, got {self.task!r}")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"--dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {self.device}: no CUDA device here (measure on the serving machine)")
        if self.price_at and "image_tokens" in self.budget_path:
            raise ValueError("--price_at sets the image tokens (the preset's at --image_size); drop image_tokens from "
                             "--budget_path")
        for name in ("batch", "points", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")


def run_latency_table(args: LatencyTableArguments) -> str:
    """Measures the table, writes it to `args.output_json` (atomically), returns the printed summary."""
    if args.threads:
        torch.set_num_threads(args.threads)
    config = EfficientVLMConfig.from_pretrained(args.student)
    measured = config
    if args.price_at:
        measured = student_config(preset_config(args.price_at, args.image_size, config.text_config.vocab_size))
    path = task_path(args.task, measured, args.budget_path)
    table = measure_latency_table(measured, path, device=args.device, dtype=getattr(torch, args.dtype),
                                  batch=args.batch, points=args.points, repeats=args.repeats)
    if args.price_at:  # the student's path at the preset's image tokens, so FLOPs reports price the same path
        sizes = ",".join(filter(None, [args.budget_path, f"image_tokens={vision_tokens(measured)}"]))
        table = transfer_table(table, measured, config, task_path(args.task, config, sizes),
                               f"{args.price_at} student, {args.image_size} px")
    check_latency_table(table, config, args.output_json)
    save_latency_table(table, args.output_json)
    return format_latency_table(table, config) + f"\nwritten: {args.output_json}"
