"""Export: materialize a gated student, write a Hub-ready folder (safetensors, config, remote code, processor,
pipeline, model card, structure figure), and push folders to a Hub."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from importlib import resources

import torch

from modeling_efficientvlm.pipeline_efficientvlm import save_pipeline_files
from modeling_efficientvlm.processing_efficientvlm import EfficientVLMProcessor

from .atomic import atomic_directory
from ..method.l0 import ModalL0Module
from ..method.materialize import materialize
from ..method.structure import MODALITIES, count_parameters, prunable_parameters, structure_table
from ..tasks import task_of_model
from ..method.l0 import GATES_FILE

# shipped as package data of `efficientvlm.model_cards` (the repository's model_cards/), so a wheel install finds it
CARD_TEMPLATE = str(resources.files("efficientvlm.model_cards").joinpath("efficientvlm_template.md"))
STRUCTURE_FILE = "structure.json"


@dataclass
class ExportArguments:
    """Arguments of `efficientvlm export`."""

    checkpoint: str = field(default="", metadata={"help": "A pruning (student + l0_gates.safetensors) or model dir."})
    output_dir: str = field(default="", metadata={"help": "Where the Hub-ready folder is written (atomically)."})
    reference: str | None = field(
        default=None, metadata={"help": "Teacher dir: parameters and sparsity are reported relative to it."}
    )
    model_name: str | None = field(default=None, metadata={"help": "Title of the model card."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing output_dir."})

    def __post_init__(self):
        if not os.path.isdir(self.checkpoint):
            raise ValueError(f"--checkpoint must be an existing dir, got {self.checkpoint!r}")
        if not self.output_dir:
            raise ValueError("--output_dir is required")


def checkpoint_class(checkpoint: str):
    """The task head class a checkpoint was saved from (config.json "architectures", see `task_of_model`); image-text
    (pre-training / retrieval) checkpoints load as `EfficientVLMForImageTextRetrieval`."""
    from modeling_efficientvlm import EfficientVLMConfig

    return task_of_model(EfficientVLMConfig.from_pretrained(checkpoint)).model_class


def load_pruned(checkpoint: str) -> tuple[torch.nn.Module, dict | None]:
    """Loads a checkpoint; if it carries L0 gates, materializes the student at the deterministic masks.

    Returns:
        (model, sparsity report or None). The report has the expected sparsity per modality at export.
    """
    model = checkpoint_class(checkpoint).from_pretrained(checkpoint).eval()
    gates_path = os.path.join(checkpoint, GATES_FILE)
    if not os.path.isfile(gates_path):
        return model, None
    l0 = ModalL0Module.from_file(gates_path, model.config)
    pruned = materialize(model, l0.deterministic_masks())
    return pruned, {k: float(v.detach()) for k, v in l0.expected_sparsity().items()}


def sparsity_report(model_config, reference_config=None) -> dict:
    """Parameters and realised sparsity per modality of a (materialized) config relative to a reference."""
    reference_config = reference_config or model_config
    ours, ref = prunable_parameters(model_config), prunable_parameters(reference_config)
    report = {m: 1 - ours[m] / ref[m] if ref[m] else 0.0 for m in MODALITIES}
    report["total"] = 1 - ours["total"] / ref["total"]
    return {
        "params": count_parameters(model_config)["total"],
        "reference_params": count_parameters(reference_config)["total"],
        "sparsity": report,
        "structure": structure_table(model_config),
    }


def plot_structure(config, path: str, reference_config=None) -> None:
    """Bar chart of kept heads and FFN width per layer and encoder (kept / reference), as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = structure_table(config)
    ref = structure_table(reference_config or config)
    kinds = [("heads", "self-attn heads"), ("cross_heads", "cross-attn heads"), ("ffn", "FFN width")]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2), sharey=True)
    for ax, modality in zip(axes, MODALITIES):
        width = 0.8 / sum(1 for k, _ in kinds if k in table[modality])
        offset = 0
        for kind, label in kinds:
            if kind not in table[modality]:
                continue
            kept = table[modality][kind]
            total = ref[modality][kind]
            ratio = [k / t if t else 0.0 for k, t in zip(kept, total)]
            ax.bar([i + offset for i in range(len(kept))], ratio, width=width, label=label)
            offset += width
        ax.set_title(f"{modality} ({len(table[modality]['ffn'])} layers)")
        ax.set_xlabel("layer")
        ax.set_ylim(0, 1.05)
    axes[0].set_ylabel("kept fraction")
    axes[-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _card_text(model_name: str, report: dict, metrics: dict | None, extra: dict) -> dict:
    s = report["sparsity"]
    speed = extra.get("speedup")
    row = (
        f"| {model_name} | {report['params'] / 1e6:.2f}M ({report['params'] / report['reference_params']:.1%} of "
        f"reference) | {s['vision']:.1%} | {s['text']:.1%} | {s['fusion']:.1%} | {s['total']:.1%} | "
        f"{f'{speed:.2f}x' if speed else 'not measured'} |"
    )
    structure_lines = []
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
        eval_text = f"{card.title} on {extra.get('dataset_name', 'the held-out set')} (in %):\n\n{header}\n{values}"
    return {"compression_rows": row, "structure_text": "\n".join(structure_lines), "eval_text": eval_text}


def render_card(output_dir: str, model_name: str, report: dict, metrics: dict | None, extra: dict) -> str:
    """Renders README.md through huggingface_hub's ModelCard (model-index eval results + our template)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from ..tasks import get_task

    dataset_name = extra.get("dataset_name", "synthetic-scenes")
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
    repo = extra.get("repo_id", "path/to/this/folder")
    rendered = ModelCard.from_template(
        data,
        template_path=CARD_TEMPLATE,
        model_name=model_name,
        model_summary=extra.get("summary", "An EfficientVLM image-text retrieval model."),
        how_made=extra.get("how_made", "trained with the EfficientVLM package"),
        speed_protocol=extra.get("speed_protocol", "not measured for this export (run `efficientvlm bench`)."),
        usage_automodel=card.usage.format(repo=repo),
        usage_pipeline=card.usage_pipeline.format(repo=repo),
        heads=card.heads,
        speed_name=card.speed_name,
        recipe=extra.get("recipe", "See the EfficientVLM README."),
        limitations=extra.get("limitations", LIMITATIONS),
        **_card_text(model_name, report, metrics, extra),
    )
    path = os.path.join(output_dir, "README.md")
    rendered.save(path)
    return path


LIMITATIONS = (
    "Retrieval quality is measured only on the evaluation set named above; a model distilled and pruned on one "
    "task keeps the capacity that task needed (modal-adaptive pruning learns a task-specific split), so re-prune "
    "for other tasks. Speed-ups depend on the device: measure with `efficientvlm bench` on yours."
)


def save_hub_ready(
    model, processor: EfficientVLMProcessor | None, output_dir: str, model_name: str, reference_config=None,
    metrics: dict | None = None, extra: dict | None = None, overwrite: bool = True, files: dict | None = None,
) -> dict:
    """Writes a Hub-ready folder atomically (temp dir → rename); returns the sparsity/size report.

    `files` maps extra file names to source paths copied into the folder (e.g. a learning curve)."""
    extra = dict(extra or {})
    if os.path.exists(output_dir) and not overwrite:
        raise FileExistsError(f"{output_dir} exists; pass overwrite=True (--overwrite) to replace it")
    extra.setdefault("task", task_of_model(model).name)
    with atomic_directory(output_dir, prefix=".export-") as tmp:
        model.save_pretrained(tmp)
        if processor is not None:
            processor.save_pretrained(tmp)
        save_pipeline_files(tmp)
        report = sparsity_report(model.config, reference_config)
        report["params"] = sum(p.numel() for p in model.parameters())  # the real model, whatever its head
        report["eval"] = metrics or {}
        report.update({k: v for k, v in extra.items() if k in ("speedup", "expected_sparsity")})
        with open(os.path.join(tmp, STRUCTURE_FILE), "w") as f:
            json.dump(report, f, indent=2)
        plot_structure(model.config, os.path.join(tmp, "structure.png"), reference_config)
        for name, source in (files or {}).items():
            shutil.copyfile(source, os.path.join(tmp, name))
        render_card(tmp, model_name, report, metrics, extra)
    return report


def run_export(args: ExportArguments, extra: dict | None = None) -> dict:
    """`efficientvlm export`: materialize (if gated) + Hub-ready folder + card."""
    model, expected = load_pruned(args.checkpoint)
    reference = None
    if args.reference:
        from modeling_efficientvlm import EfficientVLMConfig

        reference = EfficientVLMConfig.from_pretrained(args.reference)
    processor = None
    if os.path.isfile(os.path.join(args.checkpoint, "processor_config.json")):
        processor = EfficientVLMProcessor.from_pretrained(args.checkpoint)
    metrics = None
    metrics_path = os.path.join(args.checkpoint, "eval_results.json")
    if os.path.isfile(metrics_path):
        with open(metrics_path) as f:
            metrics = json.load(f)
    extra = dict(extra or {})
    if expected:
        extra["expected_sparsity"] = expected
    name = args.model_name or os.path.basename(os.path.abspath(args.output_dir))
    return save_hub_ready(model, processor, args.output_dir, name, reference, metrics, extra, args.overwrite)
