"""Export: materialize a gated student, write a Hub-ready folder (safetensors, config, remote code, processor,
pipeline, model card, structure figure), and push folders to a Hub."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from importlib import resources

import torch

from modeling_efficientvlm import EfficientVLMConfig
from modeling_efficientvlm.pipeline_efficientvlm import save_pipeline_files
from modeling_efficientvlm.processing_efficientvlm import EfficientVLMProcessor

from ..infra.runs import (
    MODEL_FILES,
    RUN_FILE,
    atomic_directory,
    check_output_dir,
    folder_writer,
    missing_files,
    read_run_record,
    stage_files,
)
from ..method.cost import path_from_json, path_to_json, prunable_flops
from ..method.latency_table import latency_share
from ..method.l0 import ModalL0Module, read_gates_file
from ..method.materialize import materialize
from ..method.structure import VQA_HEADS, count_parameters, modalities, prunable_parameters, structure_table
from ..tasks import task_of_model, task_path
from ..method.l0 import GATES_FILE

# shipped as package data of `efficientvlm.model_cards` (the repository's model_cards/), so a wheel install finds it
logger = logging.getLogger(__name__)
CARD_TEMPLATE = str(resources.files("efficientvlm.model_cards").joinpath("efficientvlm_template.md"))
STRUCTURE_FILE = "structure.json"


@dataclass
class ExportArguments:
    """Arguments of `efficientvlm export`."""

    model: str = field(default="", metadata={"help": "A pruning run (student + l0_gates.safetensors) or model dir.",
                                             "aliases": ["--checkpoint"]})
    output_dir: str = field(default="", metadata={"help": "Where the Hub-ready folder is written (atomically)."})
    reference: str | None = field(
        default=None, metadata={"help": "Teacher dir: parameters and sparsity are reported relative to it."}
    )
    model_name: str | None = field(default=None, metadata={"help": "Title of the model card."})
    overwrite: bool = field(
        default=False,
        metadata={"help": "Replace an existing output_dir (the old folder is deleted only once the new one is in place)."},
    )

    def __post_init__(self):
        if not os.path.isdir(self.model):
            raise ValueError(f"--model must be an existing dir, got {self.model!r}")
        if not self.output_dir:
            raise ValueError("--output_dir is required")
        # never into (or above) the folder it exports from; replacing anything else is decided below
        check_output_dir(self.output_dir, "export", {"--model": self.model}, overwrite=True)
        if os.path.exists(self.output_dir) and not self.overwrite:
            raise FileExistsError(f"{self.output_dir} exists; pass --overwrite true to replace it")


def checkpoint_class(checkpoint: str):
    """The task head class a checkpoint was saved from (config.json "architectures", see `task_of_model`); image-text
    (pre-training / retrieval) checkpoints load as `EfficientVLMForImageTextRetrieval`."""
    from modeling_efficientvlm import EfficientVLMConfig

    return task_of_model(EfficientVLMConfig.from_pretrained(checkpoint)).model_class


def _checkpoint_hint(folder: str, required) -> str:
    """Where to export from instead: the newest complete `checkpoint-N` inside `folder` (checkpoints are renamed into
    place only once written, so each one there is whole)."""
    steps = []
    for name in os.listdir(folder):
        match = re.fullmatch(r"checkpoint-(\d+)", name)
        if match and not missing_files(os.path.join(folder, name), required):
            steps.append((int(match.group(1)), name))
    if not steps:
        return "it holds no complete checkpoint-* folder to export instead: rerun the stage"
    return f"export its last checkpoint instead: --model {os.path.join(folder, max(steps)[1])}"


def check_export_source(checkpoint: str) -> bool:
    """Checks that `checkpoint` holds a complete model and returns whether it is gated (a pruning run or one of its
    checkpoints); raises ValueError naming what is missing and the `checkpoint-*` folder to export instead.

    A folder a stage wrote carries its run record (`efficientvlm_run.json`): it names the stage (so a pruning run is
    known as one even when its gates are missing) and is marked "complete" only by the run's last write. A folder
    without one (a checkpoint-N, an export, a conversion) needs config.json + weights; gates make it gated.
    """
    record = read_run_record(checkpoint)
    if record is None:
        gated = os.path.isfile(os.path.join(checkpoint, GATES_FILE))
        required, what = MODEL_FILES, "model folder"
    else:
        stage = record.get("stage")
        gated = stage == "prune"
        required, what = stage_files(stage), f"`efficientvlm {stage}` run"
        if not gated and os.path.isfile(os.path.join(checkpoint, GATES_FILE)):
            logger.warning("%s: ignoring %s: the run that wrote this folder (%s) has no gates", checkpoint, GATES_FILE,
                           stage)
    missing = missing_files(checkpoint, required)
    hint = _checkpoint_hint(checkpoint, (*MODEL_FILES, GATES_FILE) if gated else MODEL_FILES)
    if record is not None and record.get("status") != "complete":
        error = f": {record['error']}" if record.get("error") else ""
        found = (f"missing {', '.join(missing)}" if missing
                 else "its top-level files may be half-written or left by an earlier run")
        raise ValueError(
            f"{checkpoint} holds an unfinished {what} (status {record.get('status')!r}{error}; started "
            f"{record.get('started')} by pid {record.get('pid')} on host {record.get('host')}, see {RUN_FILE}): "
            f"{found}; {hint}"
        )
    if missing:
        raise ValueError(f"{checkpoint} is not a complete {what}: missing {', '.join(missing)}; {hint}")
    return gated


def load_pruned(checkpoint: str) -> tuple[torch.nn.Module, dict | None]:
    """Loads a checkpoint (checked by `check_export_source`); if it is gated, materializes the student at the
    deterministic masks.

    Returns:
        (model, sparsity report or None). The report has the expected sparsity per modality at export.
    """
    gated = check_export_source(checkpoint)
    model = checkpoint_class(checkpoint).from_pretrained(checkpoint).eval()
    if not gated:
        return model, None
    l0 = ModalL0Module.from_file(os.path.join(checkpoint, GATES_FILE), model.config)
    pruned = materialize(model, l0.deterministic_masks())
    return pruned, {k: float(v.detach()) for k, v in l0.expected_sparsity().items()}


def budget_report(checkpoint: str, pruned) -> dict | None:
    """The pruning budget of a gated checkpoint and what the materialized model achieved against the gated student:
    {"kind": "params" | "flops" | "latency", "target_sparsity", "gates": {"layer", "hidden"} (which CoFi gates it
    had), "path" (the inference path it was measured on), "latency_device" (latency: where the table was measured),
    "achieved": {"params": kept share of the prunable parameters, "flops": kept share of the prunable FLOPs on the
    path, "latency": kept share of the table's predicted seconds (latency budget only)}}. A params-budget run is measured on its task's default path (None when the task has no path model)."""
    gates = os.path.join(checkpoint, GATES_FILE)
    if not os.path.isfile(gates):
        return None
    settings, _ = read_gates_file(gates)
    student = EfficientVLMConfig.from_pretrained(checkpoint)
    kind = settings.get("budget", "params")
    raw_path = settings.get("cost_path") or settings.get("latency_table", {}).get("cost_path")
    if raw_path is not None:  # the path the budget was priced on (a latency table's: the one it was measured on)
        path = path_from_json(raw_path)
    else:
        try:
            path = task_path(task_of_model(pruned), student)
        except ValueError:
            path = None
    kept_params = prunable_parameters(pruned.config)["total"] / prunable_parameters(student)["total"]
    report = {"kind": kind, "target_sparsity": settings.get("target_sparsity"),
              "gates": {"layer": bool(settings.get("layer_gates", False)),
                        "hidden": bool(settings.get("hidden_gates", False))},
              "achieved": {"params": kept_params}}
    if path is not None:
        report["path"] = path_to_json(path)
        kept = prunable_flops(pruned.config, path)["total"]
        report["achieved"]["flops"] = kept / prunable_flops(student, path)["total"]
    table = settings.get("latency_table")
    if table is not None:  # what the measured table predicts for the materialized sub-layers, vs the student's
        report["latency_device"] = table.get("device")
        report["achieved"]["latency"] = latency_share(table, pruned.config, student)
    return report


def sparsity_report(model_config, reference_config=None) -> dict:
    """Parameters and realised sparsity per modality (`modalities`: + "decoder" for VQA) of a (materialized) config
    relative to a reference. Parameters count the retrieval heads, or the answer decoder's for a VQA config."""
    reference_config = reference_config or model_config
    ours, ref = prunable_parameters(model_config), prunable_parameters(reference_config)
    report = {m: 1 - ours[m] / ref[m] if ref.get(m) else 0.0 for m in modalities(model_config)}
    report["total"] = 1 - ours["total"] / ref["total"]

    def heads(config) -> tuple[str, ...]:
        return VQA_HEADS if "decoder" in modalities(config) else ("itm",)

    return {
        "params": count_parameters(model_config, heads(model_config))["total"],
        "reference_params": count_parameters(reference_config, heads(reference_config))["total"],
        "sparsity": report,
        "structure": structure_table(model_config),
        # the sizes `structure` is a fraction of: `efficientvlm bench --split` reads per-layer keep fractions from both
        "reference_structure": structure_table(reference_config),
    }


# one colour per kind in every panel (colours assigned by order differ per panel: vision/text have no cross heads)
STRUCTURE_KINDS = {"heads": ("self-attn heads", "tab:blue"), "cross_heads": ("cross-attn heads", "tab:green"),
                   "ffn": ("FFN width", "tab:orange")}


def reference_label(reference_config=None) -> str:
    """How the plot and the card name the reference: the folder / model name the config was loaded from, else a
    neutral phrase; `None` means the model is measured against its own sizes."""
    if reference_config is None:
        return "its own sizes (no reference given)"
    source = getattr(reference_config, "name_or_path", "") or ""  # set by a model's from_pretrained
    return os.path.basename(os.path.normpath(source)) if source else "the reference config"


def structure_figure(config, reference_config=None, reference_name: str | None = None):
    """The matplotlib figure of `plot_structure`: per encoder, kept fraction of heads / cross heads / FFN width per
    layer relative to `reference_config` (bar groups centred on integer layer ticks, removed sub-layers marked ×,
    one legend for the figure outside the axes, the reference named in the title)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    table, ref = structure_table(config), structure_table(reference_config or config)
    reference_name = reference_name or reference_label(reference_config)
    stacks = modalities(config)  # the encoders (+ the VQA answer decoder)
    fig, axes = plt.subplots(1, len(stacks), figsize=(13 * len(stacks) / 3, 3.8), sharey=True)
    for ax, modality in zip(axes, stacks):
        kinds = [k for k in STRUCTURE_KINDS if k in table[modality]]
        layers, width = len(table[modality]["ffn"]), 0.8 / len(kinds)
        for j, kind in enumerate(kinds):
            ratio = [k / t if t else 0.0 for k, t in zip(table[modality][kind], ref[modality][kind])]
            x = [i - 0.4 + width * (j + 0.5) for i in range(layers)]  # the group of layer i is centred on i
            colour = STRUCTURE_KINDS[kind][1]
            ax.bar(x, ratio, width=width, color=colour, label=STRUCTURE_KINDS[kind][0])
            removed = [xi for xi, r in zip(x, ratio) if r == 0]
            ax.plot(removed, [0.03] * len(removed), linestyle="none", marker="x", color=colour)
        ax.set_xticks(range(layers))
        ax.set_xlim(-0.6, layers - 0.4)
        ref_layers = len(ref[modality]["ffn"])  # a half-depth student compares layer i with reference layer i
        ax.set_title(f"{modality} ({layers} layers)" if ref_layers == layers else
                     f"{modality} ({layers} of {ref_layers} layers)")
        ax.set_xlabel("layer")
        ax.set_ylim(0, 1.05)
    axes[0].set_ylabel("kept fraction")
    handles = [Patch(color=colour, label=label) for label, colour in STRUCTURE_KINDS.values()]
    handles.append(Line2D([], [], linestyle="none", marker="x", color="black", label="removed (0 kept)"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, bbox_to_anchor=(0.5, 0.0))
    fig.suptitle(f"Kept fraction of {reference_name} per layer (heads and FFN width)")
    fig.tight_layout(rect=(0, 0.08, 1, 1))  # the bottom strip holds the legend, below the axes
    return fig


def plot_structure(config, path: str, reference_config=None, reference_name: str | None = None) -> None:
    """Writes `structure_figure` as PNG."""
    import matplotlib.pyplot as plt

    fig = structure_figure(config, reference_config, reference_name)
    fig.savefig(path, dpi=100)
    plt.close(fig)


LOCAL_REPO = "path/to/this/folder"
"""What the usage snippets load from in an exported folder; `efficientvlm push` writes the repo id in its place."""


def _speed_cell(extra: dict) -> str:
    """'1.85x (median; range 1.62–2.03x, 3 runs)': the speed-up and its spread over the runs when known."""
    speed = extra.get("speedup")
    if not speed:
        return "not measured"
    if extra.get("speedup_min") is None or extra.get("speedup_max") is None:
        return f"{speed:.2f}x (one figure, no spread recorded)"
    runs = f", {extra['speedup_runs']} runs" if extra.get("speedup_runs") else ""
    return f"{speed:.2f}x (median; range {extra['speedup_min']:.2f}–{extra['speedup_max']:.2f}x{runs})"


def _reference_name(report: dict, extra: dict) -> str:
    """What the card calls the reference sizes are measured against (`extra["reference_name"]`, e.g. the teacher)."""
    return extra.get("reference_name") or report.get("reference_name") or "the reference"


def _card_text(model_name: str, report: dict, metrics: dict | None, extra: dict) -> dict:
    """The computed parts of the card: compression row (sizes relative to the named reference, speed-up with its
    spread), structure list, evaluation table."""
    s, reference = report["sparsity"], _reference_name(report, extra)
    if s is None:  # no reference: sizes only, never the model measured against itself
        row = f"| {model_name} | {report['params'] / 1e6:.2f}M (no reference) | — | — | — | — | {_speed_cell(extra)} |"
        note = ("No reference model was given (`export --reference DIR`) or recorded in the run, so no share or "
                "sparsity is reported: the parameters are this model's own.")
    else:
        row = (
            f"| {model_name} | {report['params'] / 1e6:.2f}M ({report['params'] / report['reference_params']:.1%} of "
            f"{reference}: {report['reference_params'] / 1e6:.2f}M) | {s['vision']:.1%} | {s['text']:.1%} | "
            f"{s['fusion']:.1%} | {s['total']:.1%} | {_speed_cell(extra)} |"
        )
        note = f"Sparsity is the share of {reference}'s prunable parameters (attention heads, FFN neurons) removed."
    structure_lines = []
    budget = report.get("budget")
    if budget:  # what the pruning run counted, and what the materialized model kept of each cost
        what = {"params": "prunable parameters", "flops": "FLOPs of the task's inference path",
                "latency": f"measured latency on the task's path ({budget.get('latency_device', 'a latency table')})"}
        kept = ", ".join(f"{name} {value:.1%}" for name, value in budget.get("achieved", {}).items())
        gates = [name for name, on in budget.get("gates", {}).items() if on]
        structure_lines.append(
            f"- **budget**: {what.get(budget['kind'], budget['kind'])}, target sparsity {budget['target_sparsity']}"
            + (f" (+ {' and '.join(gates)} gates)" if gates else "") + (f"; kept: {kept}" if kept else "")
        )
    for modality, entry in report["structure"].items():
        parts = [f"{kind}: {values}" for kind, values in entry.items()]
        structure_lines.append(f"- **{modality}**: " + "; ".join(parts))
    from ..tasks import get_task

    card = get_task(extra.get("task", "retrieval")).card
    keys = [k for k in card.report_keys if metrics and k in metrics]
    eval_text = "Not evaluated."
    if keys:
        header = "| " + " | ".join(keys) + " |\n|" + "---|" * len(keys)
        values = "| " + " | ".join(f"{metrics[k]:.2f}" for k in keys) + " |"
        scored = extra.get("dataset_description") or extra.get("dataset_name", "the held-out set")
        eval_text = f"{card.title} on {scored} (in %):\n\n{header}\n{values}"
    return {"compression_rows": row, "compression_note": note, "structure_text": "\n".join(structure_lines),
            "eval_text": eval_text}


def scored_data(metrics: dict | None) -> dict:
    """What the card says was scored, from the "data" entry a stage or `evaluate` saves with its metrics
    (`describe_eval_data`): {"dataset_name": the test file's name (+ "held-out share") or the synthetic set and its
    protocol, "dataset_description": the full one-line description}; empty when the metrics do not say."""
    data = (metrics or {}).get("data") or {}
    source = data.get("source")
    if not source:
        return {}
    if source == "synthetic":
        protocol = data.get("protocol")
        name = "efficientvlm-synthetic-scenes" + (f" ({protocol} protocol)" if protocol else "")
    else:
        name = os.path.basename(source) + (" (held-out share)" if "held out" in data.get("description", "") else "")
    return {"dataset_name": name, "dataset_description": data.get("description") or name}


def render_card(output_dir: str, model_name: str, report: dict, metrics: dict | None, extra: dict) -> str:
    """Renders README.md through huggingface_hub's ModelCard (model-index eval results + our template)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from ..tasks import get_task

    dataset_name = extra.get("dataset_name", "the held-out set (not recorded)")
    card = get_task(extra.get("task", "retrieval")).card
    results = [
        EvalResult(task_type=card.task_type, dataset_type=dataset_name, dataset_name=dataset_name,
                   metric_type=key, metric_name=key, metric_value=round(float(metrics[key]), 4))
        for key in card.metric_keys if metrics and key in metrics
    ]
    data = ModelCardData(
        library_name="transformers", pipeline_tag=card.pipeline_tag, license="apache-2.0",
        tags=["efficientvlm", "vision-language", card.tag, "pruning", "knowledge-distillation"],
        model_name=model_name, eval_results=results or None,
    )
    repo = extra.get("repo_id", LOCAL_REPO)
    reference = _reference_name(report, extra)
    rendered = ModelCard.from_template(
        data,
        template_path=CARD_TEMPLATE,
        model_name=model_name,
        model_summary=extra.get("summary", f"An EfficientVLM {(card.title or card.tag).lower()} model."),
        how_made=extra.get("how_made", "trained with the EfficientVLM package"),
        speed_protocol=extra.get("speed_protocol", "not measured for this export (run `efficientvlm bench`)."),
        usage_automodel=card.usage.format(repo=repo),
        usage_pipeline=card.usage_pipeline.format(repo=repo),
        heads=card.heads,
        speed_name=card.speed_name,
        speed_baseline=extra.get("speedup_baseline", reference),
        reference=reference,
        recipe=extra.get("recipe", "See the EfficientVLM README."),
        limitations=extra.get("limitations", LIMITATIONS),
        **_card_text(model_name, report, metrics, extra),
    )
    path = os.path.join(output_dir, "README.md")
    rendered.save(path)
    return path


LIMITATIONS = (
    "Quality is measured only on the evaluation set named above; a model distilled and pruned on one task keeps the "
    "capacity that task needed (modal-adaptive pruning learns a task-specific split), so re-prune for other tasks. "
    "Parameters and sparsity are relative to the reference named in the Compression table. Speed-ups hold for the "
    "device, threads and batch of the stated protocol only: measure with `efficientvlm bench` on yours."
)


def save_hub_ready(
    model, processor: EfficientVLMProcessor | None, output_dir: str, *, model_name: str, reference_config=None,
    metrics: dict | None = None, extra: dict | None = None, overwrite: bool = True, files: dict | None = None,
) -> dict:
    """Writes a Hub-ready folder atomically (temp dir → rename; an existing folder stays whole until the new one is
    in place, then is deleted); returns the sparsity/size report.

    `files` maps extra file names to source paths copied into the folder (e.g. a learning curve)."""
    extra = dict(extra or {})
    extra.setdefault("task", task_of_model(model).name)
    for key, value in scored_data(metrics).items():  # the data the metrics were computed on, not a fixed name
        extra.setdefault(key, value)
    if reference_config is not None:
        extra.setdefault("reference_name", reference_label(reference_config))
    # one writer at a time (a second gets OutputDirInUseError naming the first); checked again under the lock
    with folder_writer(output_dir), atomic_directory(output_dir, prefix=".export-") as tmp:
        if os.path.exists(output_dir) and not overwrite:
            raise FileExistsError(f"{output_dir} exists; pass --overwrite true to replace it")
        model.save_pretrained(tmp)
        if processor is not None:
            processor.save_pretrained(tmp)
        save_pipeline_files(tmp)
        report = sparsity_report(model.config, reference_config)
        # the real model, whatever its head; the reference is counted with the same head (an MLM head the config
        # count leaves out would otherwise make a teacher "100.3 % of itself")
        head = sum(p.numel() for p in model.parameters()) - report["params"]
        report["params"] += head
        report["reference_params"] += head
        if reference_config is None:  # nothing to compare with: no self-comparison (0 % sparsity, 100 % of itself)
            report.update(sparsity=None, reference_params=None)
        report["eval"] = metrics or {}
        report.update({k: v for k, v in extra.items() if k in (
            "speedup", "speedup_min", "speedup_max", "speedup_runs", "speedup_baseline", "reference_name",
            "expected_sparsity", "budget")})
        with open(os.path.join(tmp, STRUCTURE_FILE), "w") as f:
            json.dump(report, f, indent=2)
        plot_structure(model.config, os.path.join(tmp, "structure.png"), reference_config,
                       extra.get("reference_name"))
        for name, source in (files or {}).items():
            shutil.copyfile(source, os.path.join(tmp, name))
        render_card(tmp, model_name, report, metrics, extra)
    return report


def recorded_reference(checkpoint: str) -> tuple[str, str] | None:
    """(flag, path) of the model the run that wrote `checkpoint` started from, from its run record's inputs (a
    `checkpoint-N` folder: its run's record): the --teacher (distill, prune), else --init_from (teacher), else the
    --student (prune without KD); None when none is recorded or it no longer holds a config (a warning says so)."""
    record = read_run_record(checkpoint)
    if record is None and re.fullmatch(r"checkpoint-\d+", os.path.basename(os.path.normpath(checkpoint))):
        record = read_run_record(os.path.dirname(os.path.abspath(checkpoint)))
    inputs = (record or {}).get("inputs") or {}
    for flag in ("--teacher", "--init_from", "--student"):
        path = inputs.get(flag)
        if not path:
            continue
        if os.path.isfile(os.path.join(path, "config.json")):
            return flag, path
        logger.warning("%s: the run's %s %s is gone; the card reports no reference (pass --reference)", checkpoint,
                       flag, path)
        return None
    return None


def run_export(args: ExportArguments, extra: dict | None = None) -> dict:
    """`efficientvlm export`: materialize (if gated) + Hub-ready folder + card."""
    model, expected = load_pruned(args.model)
    reference = None
    if args.reference:
        from modeling_efficientvlm import EfficientVLMConfig

        reference = EfficientVLMConfig.from_pretrained(args.reference)
    processor = None
    if os.path.isfile(os.path.join(args.model, "processor_config.json")):
        processor = EfficientVLMProcessor.from_pretrained(args.model)
    metrics = None
    metrics_path = os.path.join(args.model, "eval_results.json")
    if os.path.isfile(metrics_path):
        with open(metrics_path) as f:
            metrics = json.load(f)
    extra = dict(extra or {})
    if expected:
        extra["expected_sparsity"] = expected
        extra["budget"] = budget_report(args.model, model)
    if args.reference:  # a config read on its own has no name_or_path: name the reference by its folder
        extra.setdefault("reference_name", os.path.basename(os.path.normpath(args.reference)))
    else:  # the model the run started from (its teacher / init model, from the run record)
        recorded = recorded_reference(args.model)
        if recorded is not None:
            from modeling_efficientvlm import EfficientVLMConfig

            flag, path = recorded
            reference = EfficientVLMConfig.from_pretrained(path)
            extra.setdefault("reference_name", f"{os.path.basename(os.path.normpath(path))} (the run's {flag})")
    name = args.model_name or os.path.basename(os.path.abspath(args.output_dir))
    return save_hub_ready(model, processor, args.output_dir, model_name=name, reference_config=reference,
                          metrics=metrics, extra=extra, overwrite=args.overwrite)
