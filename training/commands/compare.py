"""`efficientvlm compare-splits`: uniform vs manual vs learned (modal-adaptive) sparsity splits at equal total sparsity.

The same student is pruned three times with the same task KD, data stream, seed and schedule; only the sparsity
constraint differs:

* uniform: every encoder held to the target by its own multipliers (the paper's "30 % per encoder" baseline);
* manual: per-encoder targets chosen by hand (`--manual_split`; `auto` entries share the ratio that makes the
  parameter-weighted total equal the target);
* learned: one global target; the gates decide how much each encoder loses (EfficientVLM's modal-adaptive pruning).
* flops: learned, but the budget is the FLOPs of the task's inference path (`--flops_path`), not parameters;
* flops+layers: the same with CoFi's sub-layer gates;
* flops+hidden, flops+layers+hidden: the same with CoFi's hidden-dimension (residual channel) gates added;
* latency, latency+layers: the budget is the seconds of the same path by a latency table: `--latency_table` (from
  `efficientvlm latency-table`), else measured once here, on this device (`latency_table.json` in the output dir).

The FLOPs and latency strategies run at a *matched* budget: when `learned` ran first, their target is the FLOPs (or
table-predicted latency) sparsity the learned (params-budget) model achieved on the same path, so the comparison asks
"same cost, which split keeps more quality?"; otherwise the target is --target_sparsity.

Each result is materialized, evaluated on the held-out set, counted, and timed with the unpruned student in one
process on one batch (round-robin repeats, so drift hits every model alike).
"""

from __future__ import annotations

import copy
import json
import os
import platform
import time
from dataclasses import dataclass, field

import torch

from ..method.cost import path_to_json, prunable_flops
from ..method.latency_table import format_latency_table, latency_share, latency_table_for
from ..method.structure import modalities, prunable_parameters
from ..tasks import get_task, has_path, task_path
from ..infra.timing import measure_interleaved, summarize

STRATEGIES = ("uniform", "manual", "learned", "flops", "flops+layers", "flops+hidden", "flops+layers+hidden",
              "latency", "latency+layers")
BUDGET_STRATEGIES = {
    "flops": ("flops", False, False), "flops+layers": ("flops", True, False), "flops+hidden": ("flops", False, True),
    "flops+layers+hidden": ("flops", True, True), "latency": ("latency", False, False),
    "latency+layers": ("latency", True, False),
}
"""Cost-budget strategies → (budget, sub-layer gates, hidden-dimension gates)."""


@dataclass
class CompareArguments:
    """What to compare (the student, teacher, task, data and pruning schedule come from the other argument groups)."""

    manual_split: str | None = field(
        default=None,
        metadata={"help": "Hand-chosen per-encoder sparsity, e.g. 'vision=0.2,text=auto,fusion=auto' ('auto' "
                          "entries share the ratio that makes the total equal --target_sparsity). Default per task: "
                          "retrieval prunes vision at half the target, nlvr2 prunes fusion at 1.5x the target."},
    )
    strategies: str = field(
        default="uniform,manual,learned",
        metadata={"help": "Comma-separated subset of uniform, manual, learned, flops, flops+layers, flops+hidden, "
                          "flops+layers+hidden, latency, latency+layers."},
    )
    flops_path: str = field(
        default="",
        metadata={"help": "Sizes of the inference path of the FLOPs strategies and of every model's FLOPs column "
                          "(see prune --budget_path; default: the task's evaluation protocol)."},
    )
    latency_batch: int = field(default=32, metadata={"help": "Held-out items in the timed batch."})
    latency_repeats: int = field(default=10, metadata={"help": "Timed repeats per model (median reported)."})

    def parsed_strategies(self) -> list[str]:
        names = [s.strip() for s in self.strategies.split(",") if s.strip()]
        bad = [s for s in names if s not in STRATEGIES]
        if bad or not names:
            raise ValueError(f"--strategies must be a comma-separated subset of {list(STRATEGIES)}, got {self.strategies!r}")
        return names


def resolve_split(split: str, config, target: float) -> dict[str, float]:
    """Per-encoder sparsity from 'vision=0.2,text=auto,fusion=auto' such that the total equals `target`.

    Every encoder of `config` (and the VQA answer decoder) must be named once. `auto` encoders share one ratio r solved from
    Σ_fixed r_m·P_m + r·Σ_auto P_m = target·Σ P_m (P_m: the encoder's prunable parameters). Without `auto` the
    weighted total must already equal the target within 0.01.

    Raises:
        ValueError: naming the entry, the solved ratio or the total when they are out of range.
    """
    params = prunable_parameters(config)
    stacks = modalities(config)  # the three encoders (+ the answer decoder of a VQA model)
    ratios: dict[str, float | None] = {}
    for item in split.split(","):
        name, _, value = (part.strip() for part in item.partition("="))
        if name not in stacks or not value or name in ratios:
            raise ValueError(f"--manual_split entries must name each of {list(stacks)} once as "
                             f"encoder=ratio or encoder=auto, got {item!r} in {split!r}")
        if value == "auto":
            ratios[name] = None
            continue
        try:
            ratios[name] = float(value)
        except ValueError as error:
            raise ValueError(f"--manual_split {name}={value!r}: expected a number or 'auto'") from error
        if not 0.0 <= ratios[name] < 1.0:
            raise ValueError(f"--manual_split {name}={value}: a sparsity must lie in [0, 1)")
    missing = [m for m in stacks if m not in ratios]
    if missing:
        raise ValueError(f"--manual_split {split!r} does not name {missing} (use encoder=auto to solve for it)")
    fixed = sum(r * params[m] for m, r in ratios.items() if r is not None)
    auto = [m for m, r in ratios.items() if r is None]
    shares = ", ".join(f"{m} {params[m] / params['total']:.1%}" for m in stacks)
    if auto:
        shared = (target * params["total"] - fixed) / sum(params[m] for m in auto)
        if not 0.0 <= shared < 1.0:
            raise ValueError(
                f"--manual_split {split!r}: the 'auto' encoders would need sparsity {shared:.3f} to reach the total "
                f"{target}, outside [0, 1) (prunable-parameter shares: {shares})"
            )
        ratios.update({m: shared for m in auto})
    total = sum(ratios[m] * params[m] for m in stacks) / params["total"]
    if abs(total - target) > 0.01:
        raise ValueError(
            f"--manual_split {split!r} totals {total:.3f}, not the target {target} (prunable-parameter shares: "
            f"{shares}); give one encoder as 'auto'"
        )
    return {m: float(ratios[m]) for m in stacks}


def default_manual_split(task: str, target: float) -> str:
    """The task's hand split (`Task.manual_split`, from the paper's sensitivity findings) at total `target`."""
    more = min(0.95, 1.5 * target)
    return get_task(task).manual_split.format(half=round(target / 2, 4), more=round(more, 4))


def strategy_targets(strategy: str, split: dict[str, float], target: float, config) -> dict[str, float | None]:
    """PruningArguments fields for one strategy (per-encoder targets, or None = follow the global target)."""
    stacks = modalities(config)
    if strategy == "learned" or strategy in BUDGET_STRATEGIES:
        return {f"{m}_target": None for m in stacks}
    ratios = {m: target for m in stacks} if strategy == "uniform" else split
    return {f"{m}_target": ratios[m] for m in stacks}


def measure_latency(models: dict, processor, *, data, eval_data, batch: int, repeats: int, warmup: int = 2) -> dict:
    """Median / min / max latency (ms) of the task's inference path per model (`Task.workload` on `batch` held-out
    items); repeats interleave the models so drift hits all alike."""
    task = get_task(data.task)
    workloads = {name: task.workload(model.eval(), processor, data, eval_data, batch) for name, model in models.items()}
    times = measure_interleaved(workloads, repeats, warmup=warmup)
    return {name: summarize(t) for name, t in times.items()}


def run_compare(compare: CompareArguments, prune, data, args, write=lambda text: None) -> dict:
    """Prunes `prune.student` once per strategy at `args.target_sparsity`; writes comparison.json / .png + a table.

    Args:
        compare: `CompareArguments`.
        prune: `PruneModelsArguments` (student = distilled student, teacher = the task teacher).
        data: `DataArguments` (its `task` picks retrieval or NLVR2).
        args: `PruningArguments`: the schedule shared by all runs; `output_dir` gets one sub-dir per strategy.
    """
    from .export import load_pruned, sparsity_report
    from .stages import eval_set, evaluate_model, load_processor, load_task_model, run_prune

    strategies = compare.parsed_strategies()
    task = get_task(data.task)  # resolved once; the method layer gets the Task
    args.apply_task_defaults(task.prune_defaults)  # the protocol below names the values every run uses
    target = args.target_sparsity
    student = load_task_model(prune.student, data.task).eval()
    path = task_path(task, student.config, compare.flops_path) if has_path(task) else None
    if path is None and set(strategies) & set(BUDGET_STRATEGIES):
        task_path(task, student.config)  # raises: no inference-path model for this task
    split_text = compare.manual_split or default_manual_split(data.task, target)
    manual = resolve_split(split_text, student.config, target) if "manual" in strategies else {}
    processor = load_processor(data, prune.student)
    held_out = eval_set(data)
    metric = task.metric
    root = args.output_dir
    os.makedirs(root, exist_ok=True)

    table = table_file = None
    if any(BUDGET_STRATEGIES.get(s, ("",))[0] == "latency" for s in strategies):  # one table for every latency run
        # prune's --latency_table, else measured once on --flops_path's path and written beside the runs
        table, table_file = latency_table_for(student.config, task, args.latency_table, compare.flops_path, root)
        write(format_latency_table(table, student.config))

    results: dict[str, dict] = {}
    models = {"student (unpruned)": student}
    for strategy in strategies:
        run_args = copy.copy(args)
        run_args.output_dir = os.path.join(root, strategy)
        run_args.latency_table = ""  # only the latency strategies price their units by the table
        for name, value in strategy_targets(strategy, manual, target, student.config).items():
            setattr(run_args, name, value)
        if strategy in BUDGET_STRATEGIES:
            run_args.budget, run_args.layer_gates, run_args.hidden_gates = BUDGET_STRATEGIES[strategy]
            run_args.budget_path = compare.flops_path if run_args.budget == "flops" else ""
            run_args.latency_table = table_file if run_args.budget == "latency" else ""
            kept = results.get("learned", {}).get(f"{run_args.budget}_kept")
            if kept is not None:  # matched budget: the FLOPs / latency the params-budget learned split kept
                run_args.target_sparsity = round(1 - kept, 4)
        write(f"[{strategy}] pruning to total {run_args.budget} sparsity {run_args.target_sparsity} with targets "
              f"{run_args.modality_targets or 'global'}")
        start = time.time()
        run_prune(prune, data, run_args, eval_data=False)
        pruned, expected = load_pruned(run_args.output_dir)
        metrics = evaluate_model(pruned, processor, data, held_out, show_progress=False)
        realised = sparsity_report(pruned.config, student.config)["sparsity"]
        results[strategy] = {
            "targets": run_args.modality_targets or {"total": run_args.target_sparsity},
            "budget": run_args.budget, "layer_gates": run_args.layer_gates,
            "hidden_gates": run_args.hidden_gates,
            "flops_kept": None if path is None else (
                prunable_flops(pruned.config, path)["total"] / prunable_flops(student.config, path)["total"]),
            "latency_kept": None if table is None else latency_share(table, pruned.config, student.config),
            "sparsity": realised, "expected_sparsity_at_export": expected, "metrics": metrics,
            "widths_kept": {m: getattr(pruned.config, k).hidden_size / getattr(student.config, k).hidden_size
                            for m, k in (("vision", "vision_config"), ("text", "text_config"))},
            "metric": metrics[metric], "params": sum(p.numel() for p in pruned.parameters()),
            "train_seconds": time.time() - start, "checkpoint": run_args.output_dir,
        }
        models[strategy] = pruned
    student_metrics = evaluate_model(student, processor, data, held_out, show_progress=False)
    latency = measure_latency(models, processor, data=data, eval_data=held_out, batch=compare.latency_batch,
                              repeats=compare.latency_repeats)
    base = latency["student (unpruned)"]["median_ms"]
    for strategy in strategies:
        results[strategy]["latency"] = latency[strategy]
        results[strategy]["speedup_vs_student"] = base / latency[strategy]["median_ms"]
    report = {
        "task": data.task, "metric": metric, "target_sparsity": target, "manual_split": split_text,
        "modalities": list(modalities(student.config)),
        "student": {"metric": student_metrics[metric], "metrics": student_metrics,
                    "params": sum(p.numel() for p in student.parameters()), "latency": latency["student (unpruned)"],
                    "checkpoint": prune.student},
        "teacher": prune.teacher, "strategies": results,
        "protocol": {
            "training": f"same student, teacher, seed ({args.seed}), data stream and schedule for every strategy: "
                        f"{args.max_steps} steps, batch {args.per_device_train_batch_size}, lr {args.learning_rate}, "
                        f"reg lr {args.reg_learning_rate}, sparsity warm-up {_warmup_text(args)}, masks "
                        f"frozen at {args.freeze_masks_step}, λ {args.lambda_vlp}",
            "evaluation": f"materialized models on the held-out set ({data.eval_dataset or 'synthetic'}, "
                          f"{task.eval_size(held_out)} items)",
            "latency": f"{platform.machine()} {'CUDA' if torch.cuda.is_available() else 'CPU'}, "
                       f"{torch.get_num_threads()} threads, float32; {task.workload_text(data, compare.latency_batch)}; "
                       f"median of {compare.latency_repeats} round-robin repeats after 2 warm-ups, one process",
            "sparsity": "share of the student's prunable parameters (attention heads + FFN neurons) removed",
            "flops": "kept share of the student's prunable FLOPs on the inference path "
                     f"{path_to_json(path) if path else '(none for this task)'}",
            "latency_table": None if table is None else (
                f"predicted share of the student's prunable-sub-layer seconds by {table_file} ({table['device']}; "
                f"{table['protocol']})"),
        },
    }
    with open(os.path.join(root, "comparison.json"), "w") as f:
        json.dump(report, f, indent=2)
    plot_comparison(report, os.path.join(root, "comparison.png"))
    table = format_comparison(report)
    with open(os.path.join(root, "comparison.md"), "w") as f:
        f.write(table + "\n")
    write(table)
    return report


def _warmup_text(args) -> str:
    if args.sparsity_warmup_steps is None:
        return "one epoch (default)"
    return f"{args.sparsity_warmup_steps} steps"


def format_comparison(report: dict) -> str:
    """A Markdown table: metric, parameters, latency and the split of each strategy (+ the unpruned student)."""
    metric = report["metric"]
    stacks = report.get("modalities", ["vision", "text", "fusion"])
    lines = [
        f"{report['task']}: total sparsity {report['target_sparsity']} (manual split: {report['manual_split']})",
        "",
        f"| model | {metric} | params | FLOPs kept | table latency kept | latency ms | speed-up | widths kept v/t | "
        + " | ".join(stacks) + " | total |",
        "|---|---|---|---|---|---|---|---|" + "---|" * (len(stacks) + 1),
    ]
    student = report["student"]
    lines.append(f"| student (unpruned) | {student['metric']:.2f} | {student['params'] / 1e6:.3f}M | 1.00 | 1.00 | "
                 f"{student['latency']['median_ms']:.1f} | 1.00x | 1.00/1.00 | " + "0 | " * len(stacks) + "0 |")
    for name, entry in report["strategies"].items():
        s = entry["sparsity"]
        flops, predicted = entry.get("flops_kept"), entry.get("latency_kept")
        widths = entry.get("widths_kept", {"vision": 1.0, "text": 1.0})
        lines.append(
            f"| {name} | {entry['metric']:.2f} | {entry['params'] / 1e6:.3f}M | "
            f"{'-' if flops is None else f'{flops:.2f}'} | {'-' if predicted is None else f'{predicted:.2f}'} | "
            f"{entry['latency']['median_ms']:.1f} | "
            f"{entry['speedup_vs_student']:.2f}x | {widths['vision']:.2f}/{widths['text']:.2f} | " + " | ".join(f"{s[m]:.2f}" for m in stacks)
            + f" | {s['total']:.2f} |"
        )
    lines += ["", f"latency: {report['protocol']['latency']}", f"sparsity: {report['protocol']['sparsity']}"]
    return "\n".join(lines)


def plot_comparison(report: dict, path: str) -> None:
    """Grouped bars: sparsity per encoder for each strategy, the metric in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["strategies"])
    stacks = report.get("modalities", ["vision", "text", "fusion"])
    fig, ax = plt.subplots(figsize=(8.5, 3.6))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        entry = report["strategies"][name]
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(stacks))]
        flops = entry.get("flops_kept")
        ax.bar(xs, [entry["sparsity"][m] for m in stacks], width,
               label=f"{name}: {report['metric']} {entry['metric']:.1f}"
                     + ("" if flops is None else f", FLOPs kept {flops:.2f}"))
    ax.axhline(report["target_sparsity"], color="gray", linestyle=":", linewidth=1, label="total target")
    ax.set_xticks(range(len(stacks)), stacks)
    ax.set_ylabel("sparsity (share of prunable params removed)")
    ax.set_title(f"{report['task']}: split at total sparsity {report['target_sparsity']}", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


__all__ = ["CompareArguments", "STRATEGIES", "format_comparison", "measure_latency", "resolve_split", "run_compare"]
