"""`efficientvlm analyze-modules`: the module-sensitivity sweep of `method.sensitivity` on a task model, with an
optional recovery fine-tune per point; writes the curves as JSON + a plot.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from ..method.sensitivity import analyze_modules, unit_importance


@dataclass
class AnalyzeArguments:
    """Arguments of `efficientvlm analyze-modules` (the task and data come from the data arguments: --task ...)."""

    model: str = field(default="", metadata={"help": "Task checkpoint dir (a pruning dir with gates enables 'gates')."})
    ratios: str = field(default="0.1,0.2,0.3,0.4,0.5,0.6", metadata={"help": "Comma-separated pruning ratios."})
    importance: str = field(default="magnitude", metadata={"help": "'magnitude' (weight RMS) or 'gates' (P(z>0))."})
    output_dir: str = field(default="module_analysis", metadata={"help": "Where analysis.json and the PNG go."})
    recovery_steps: int = field(
        default=0, metadata={"help": "If > 0: also evaluate every point after this many fine-tuning steps of the "
                                     "materialized model with the task loss (0 = no retraining only)."}
    )
    recovery_learning_rate: float = field(default=5e-4, metadata={"help": "Learning rate of the recovery fine-tune."})
    recovery_batch_size: int = field(default=16, metadata={"help": "Batch size of the recovery fine-tune."})
    seed: int = field(default=0, metadata={"help": "Seed of the recovery fine-tune (data order, init of new heads)."})

    def __post_init__(self):
        if not self.model or not os.path.isdir(self.model):
            raise ValueError(f"--model must be an existing checkpoint dir, got {self.model!r}")
        if self.recovery_steps < 0:
            raise ValueError(f"--recovery_steps must be >= 0, got {self.recovery_steps}")
        self.parsed_ratios()

    def parsed_ratios(self) -> list[float]:
        try:
            ratios = [float(r) for r in self.ratios.split(",") if r.strip()]
        except ValueError as error:
            raise ValueError(f"--ratios must be comma-separated numbers, got {self.ratios!r}") from error
        bad = [r for r in ratios if not 0 <= r < 1]
        if bad:
            raise ValueError(f"--ratios must lie in [0, 1), got {bad}")
        return ratios




def plot_analysis(result: dict, path: str, metric: str) -> None:
    """Metric vs ratio, one line per encoder, PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    recovered = result.get("recovered_curves", {})
    for modality, curve in result["curves"].items():
        line, = ax.plot([0.0] + [c[0] for c in curve], [result["baseline"]] + [c[1] for c in curve], marker="o",
                        label=f"{modality} (no retraining)" if recovered else modality)
        if modality in recovered:
            ax.plot([0.0] + [c[0] for c in recovered[modality]],
                    [result["baseline_recovered"]] + [c[1] for c in recovered[modality]], marker="s", linestyle="--",
                    color=line.get_color(), label=f"{modality} (+{result.get('recovery_steps', '')} steps)")
    ax.set_xlabel("fraction of the encoder's prunable parameters removed")
    ax.set_ylabel(metric)
    ax.set_title(f"module sensitivity ({result.get('importance', '')} importance)", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_analysis(result: dict, output_dir: str, metric: str) -> str:
    """Writes analysis.json + sensitivity.png; returns a readable table."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "analysis.json"), "w") as f:
        json.dump(result, f, indent=2)
    plot_analysis(result, os.path.join(output_dir, "sensitivity.png"), metric)
    ratios = [c[0] for c in next(iter(result["curves"].values()))]
    lines = [f"{metric} vs fraction of one encoder's prunable parameters removed; importance: "
             f"{result.get('importance')}; baseline {result['baseline']:.2f}"]
    if "baseline_recovered" in result:
        lines[0] += f" ({result['baseline_recovered']:.2f} after the {result.get('recovery_steps')}-step fine-tune)"
    lines.append(f"{'encoder':<16}" + "".join(f"{r:>8.2f}" for r in ratios))
    for modality, curve in result["curves"].items():
        lines.append(f"{modality:<16}" + "".join(f"{c[1]:>8.2f}" for c in curve))
        if modality in result.get("recovered_curves", {}):
            lines.append(f"{'  + fine-tune':<16}" + "".join(f"{c[1]:>8.2f}" for c in result["recovered_curves"][modality]))
    return "\n".join(lines)


def recovery_fine_tune(model, processor, data, *, steps: int, learning_rate: float, batch_size: int, seed: int):
    """A copy of `model` fine-tuned for `steps` with the task loss only (retrieval: ITC + ITM; NLVR2: cross-entropy),
    no KD and nothing saved: the optional recovery step of the module analysis."""
    import copy
    import tempfile

    from ..method.arguments import DistillationArguments
    from ..method.trainers import EfficientVLMDistillationTrainer
    from ..tasks import get_task
    from .stages import build_datasets

    model = copy.deepcopy(model).train()
    with tempfile.TemporaryDirectory(prefix="efficientvlm-recovery-") as tmp:
        args = DistillationArguments(
            output_dir=tmp, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=learning_rate,
            warmup_steps=max(1, steps // 10), lr_scheduler_type="cosine", save_strategy="no", report_to=[],
            seed=seed, logging_steps=max(1, steps), disable_tqdm=True, use_mlm=False, dataloader_num_workers=0,
            use_cpu=not torch.cuda.is_available(),
        )
        train, collator = build_datasets(data, processor, seed, mlm=False)
        trainer = EfficientVLMDistillationTrainer(model=model, args=args, train_dataset=train, data_collator=collator,
                                                  teacher_model=None, task=get_task(data.task))
        trainer.train()
    return model.eval()


def run_analysis(args: AnalyzeArguments, data, write=lambda text: None) -> dict:
    """`efficientvlm analyze-modules`: loads the task model, scores units, runs the sweep, writes JSON + PNG."""
    from ..method.l0 import GATES_FILE, ModalL0Module
    from ..tasks import get_task
    from .stages import eval_set, evaluate_model, load_processor, load_task_model

    ratios = args.parsed_ratios()
    processor = load_processor(data, args.model)
    model = load_task_model(args.model, data.task).eval()
    held_out = eval_set(data)
    metric = get_task(data.task).metric
    l0 = None
    if os.path.isfile(os.path.join(args.model, GATES_FILE)):
        l0 = ModalL0Module.from_file(os.path.join(args.model, GATES_FILE), model.config)
    importance = unit_importance(model, args.importance, l0)

    def evaluate(net, masks):
        return evaluate_model(net, processor, data, held_out, show_progress=False, pruning_masks=masks)[metric]

    def recover(net):
        return recovery_fine_tune(net, processor, data, steps=args.recovery_steps,
                                  learning_rate=args.recovery_learning_rate,
                                  batch_size=args.recovery_batch_size, seed=args.seed)

    result = analyze_modules(model, evaluate, ratios=ratios, importance=importance,
                             recover=recover if args.recovery_steps else None, show_progress=True)
    result.update(importance=args.importance, task=data.task, metric=metric, recovery_steps=args.recovery_steps)
    write(write_analysis(result, args.output_dir, metric))
    return result
