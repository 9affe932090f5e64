"""`efficientvlm demo`: the whole chain on built-in synthetic scenes, with no set-up.

teacher (12/6/6 layers, small widths, from scratch, VLP losses) → half-depth student (general distillation) →
retrieval fine-tuning with task KD + modal-adaptive pruning → materialize → evaluate all three on one held-out set →
retrieval latency of all three in one run → report.json, a table, and Hub-ready folders teacher/ student/ pruned/.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field

import torch

from .presets import demo_config
from .compare import measure_latency
from .export import load_pruned, save_hub_ready, sparsity_report
from .stages import (
    DataArguments,
    PruneArguments,
    StudentArguments,
    TeacherArguments,
    eval_set,
    evaluate_model,
    run_distill,
    run_prune,
    run_teacher,
)
from ..method.arguments import DistillationArguments, PruningArguments


@dataclass
class DemoArguments:
    """Arguments of `efficientvlm demo`."""

    output: str = field(default="demo_output", metadata={"help": "Output dir: report.json + teacher/ student/ pruned/."})
    quick: bool = field(default=False, metadata={"help": "A ~2-minute run with smaller models and fewer steps."})
    seed: int = field(default=0, metadata={"help": "Seed of data, init and gate noise."})
    target_sparsity: float = field(default=0.4, metadata={"help": "Global target sparsity of the pruning stage."})
    teacher_steps: int | None = field(default=None, metadata={"help": "Override the teacher's training steps."})
    distill_steps: int | None = field(default=None, metadata={"help": "Override the distillation steps."})
    prune_steps: int | None = field(default=None, metadata={"help": "Override the pruning steps."})
    overwrite: bool = field(default=True, metadata={"help": "Replace an existing output dir."})

    def __post_init__(self):
        if not 0 <= self.target_sparsity < 1:
            raise ValueError(f"--target_sparsity must lie in [0, 1), got {self.target_sparsity}")


LATENCY_BATCH = 32  # held-out images (and captions) in the timed retrieval batch

# (image size, width, FFN, teacher/distill/prune steps, batch, eval images, lr)
PROFILES = {
    # 32-px scenes, 4-px patches (65 image tokens), width 64: cheap enough for ~1000 teacher steps on 2 CPU cores;
    # ITM only leaves its prior after ~250 steps, so the teacher needs the long run.
    "default": dict(image_size=32, hidden=64, ffn=256, heads=4, teacher_steps=900, distill_steps=300, prune_steps=400,
                    batch=32, eval_images=200, lr=1e-3, itm_k=8, latency_repeats=5),
    "quick": dict(image_size=32, hidden=64, ffn=256, heads=4, teacher_steps=120, distill_steps=50, prune_steps=80,
                  batch=32, eval_images=64, lr=1e-3, itm_k=4, latency_repeats=3),
}


def _training_args(cls, output_dir: str, steps: int, profile: dict, seed: int, **kwargs):
    return cls(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=profile["batch"],
        learning_rate=kwargs.pop("learning_rate", profile["lr"]), warmup_steps=max(1, steps // 10),
        lr_scheduler_type="cosine", weight_decay=0.01, logging_steps=max(1, steps // 5), save_strategy="no",
        report_to=[], seed=seed, dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(),
        disable_tqdm=False, **kwargs,
    )


def _latency(models: dict, processor, data: DataArguments, eval_data: dict, repeats: int) -> dict:
    """Retrieval-path latency of every model on the same held-out batch, repeats interleaved (see `measure_latency`)."""
    batch = min(LATENCY_BATCH, len(eval_data["images"]))
    measured = measure_latency(models, processor, data, eval_data, batch, repeats, warmup=1)
    return {name: {"latency_ms": m["median_ms"], "latency_min_ms": m["min_ms"], "latency_max_ms": m["max_ms"],
                   "batch_images": batch, "batch_texts": batch} for name, m in measured.items()}


def run_demo(args: DemoArguments, write=lambda text: None) -> dict:
    """Runs the chain and writes `report.json`; returns the report."""
    start = time.time()
    profile = PROFILES["quick" if args.quick else "default"]
    if os.path.exists(args.output) and not args.overwrite:
        raise FileExistsError(f"{args.output} exists (pass --overwrite true)")
    work = os.path.join(args.output, "checkpoints")
    data = DataArguments(image_size=profile["image_size"], eval_images=profile["eval_images"], itm_k=profile["itm_k"])
    eval_data = eval_set(data)
    timings = {}

    # 1. teacher from scratch (VLP losses)
    t0 = time.time()
    config_path = _write_teacher_config(work, profile, data)
    teacher_args = _training_args(DistillationArguments, os.path.join(work, "teacher"),
                                  args.teacher_steps or profile["teacher_steps"], profile, args.seed)
    teacher, teacher_metrics = run_teacher(TeacherArguments(config=config_path), data, teacher_args, eval_data)
    timings["teacher"] = time.time() - t0

    # 2. general distillation into a half-depth student
    t0 = time.time()
    distill_args = _training_args(DistillationArguments, os.path.join(work, "student"),
                                  args.distill_steps or profile["distill_steps"], profile, args.seed, lambda_vlp=0.6)
    student, student_metrics = run_distill(StudentArguments(teacher=teacher_args.output_dir), data, distill_args,
                                           eval_data)
    timings["distill"] = time.time() - t0

    # 3. retrieval fine-tuning with task KD + modal-adaptive pruning
    t0 = time.time()
    steps = args.prune_steps or profile["prune_steps"]
    prune_args = _training_args(
        PruningArguments, os.path.join(work, "pruned"), steps, profile, args.seed, target_sparsity=args.target_sparsity,
        sparsity_warmup_steps=steps // 3, reg_learning_rate=0.05, freeze_masks_step=int(steps * 0.85),
        lambda_vlp=0.5, learning_rate=profile["lr"] / 2,
    )
    gated, _ = run_prune(PruneArguments(student=distill_args.output_dir, teacher=teacher_args.output_dir), data,
                         prune_args, eval_data=False)
    timings["prune"] = time.time() - t0

    # 4. materialize, then evaluate the dense pruned model (not the masked one)
    pruned, expected = load_pruned(prune_args.output_dir)
    processor = _processor(teacher_args.output_dir)
    pruned_metrics = evaluate_model(pruned, processor, data, eval_data)

    # 5. latency of the three in one run, same inputs
    models = {"teacher": teacher, "student": student, "pruned": pruned}
    latency = _latency(models, processor, data, eval_data, profile["latency_repeats"])
    metrics = {"teacher": teacher_metrics, "student": student_metrics, "pruned": pruned_metrics}
    report = _report(models, metrics, latency, expected, args, profile, timings)
    report["wall_time_s"] = time.time() - start

    # 6. Hub-ready folders + report
    for name, model in models.items():
        extra = {"speedup": report["models"][name]["speedup"], "speed_protocol": report["protocol"]["latency"],
                 "recipe": RECIPES[name], "how_made": HOW_MADE[name], "dataset_name": "efficientvlm-synthetic-scenes",
                 "summary": f"EfficientVLM demo {name} for image-text retrieval on synthetic scenes."}
        save_hub_ready(model, processor, os.path.join(args.output, name), f"efficientvlm-demo-{name}",
                       teacher.config, metrics[name], extra)
    with open(os.path.join(args.output, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    shutil.rmtree(work, ignore_errors=True)
    write(format_report(report))
    return report


def _processor(path: str):
    from modeling_efficientvlm.processing_efficientvlm import EfficientVLMProcessor

    return EfficientVLMProcessor.from_pretrained(path)


def _write_teacher_config(work: str, profile: dict, data: DataArguments) -> str:
    from ..data.tokenization import synthetic_tokenizer

    config = demo_config(
        image_size=profile["image_size"], vocab_size=len(synthetic_tokenizer()), hidden=profile["hidden"],
        ffn=profile["ffn"], heads=profile["heads"], patch_size=8 if profile["image_size"] >= 48 else 4,
    )
    os.makedirs(work, exist_ok=True)
    path = os.path.join(work, "teacher_config")
    config.save_pretrained(path)
    return path


def _report(models, metrics, latency, expected, args, profile, timings) -> dict:
    from ..method.structure import count_parameters

    teacher_cfg = models["teacher"].config
    out = {"models": {}, "protocol": {
        "latency": (
            f"CPU ({platform.machine()}), {torch.get_num_threads()} threads, float32, sdpa; retrieval path on "
            f"{latency['teacher']['batch_images']} held-out images × {latency['teacher']['batch_texts']} captions "
            f"(40 tokens): encode all, ITC all pairs, ITM on top-{profile['itm_k']} per query; median of "
            f"{profile['latency_repeats']} runs after 1 warm-up, all models in one process, runs interleaved"
        ),
        "evaluation": f"{profile['eval_images']} held-out synthetic scenes, one unique caption each; ITM re-ranks "
                      f"the ITC top-{profile['itm_k']}",
        "profile": "quick" if args.quick else "default", "seed": args.seed, "target_sparsity": args.target_sparsity,
    }, "stage_seconds": timings}
    for name, model in models.items():
        report = sparsity_report(model.config, teacher_cfg)
        entry = {"params": count_parameters(model.config, ("itm",))["total"], **metrics[name], **latency[name]}
        entry["speedup"] = latency["teacher"]["latency_ms"] / latency[name]["latency_ms"]
        entry["sparsity_vs_teacher"] = report["sparsity"]
        entry["structure"] = report["structure"]
        out["models"][name] = entry
    student_cfg = models["student"].config
    out["models"]["pruned"]["sparsity_vs_student"] = sparsity_report(models["pruned"].config, student_cfg)["sparsity"]
    out["models"]["pruned"]["expected_sparsity_at_export"] = expected
    out["models"]["pruned"]["r_mean_fraction_of_teacher"] = (
        out["models"]["pruned"]["r_mean"] / max(out["models"]["teacher"]["r_mean"], 1e-9)
    )
    return out


def format_report(report: dict) -> str:
    """The demo's table: per model parameters, R@K, r_mean, latency, speed-up, sparsity per modality."""
    head = (f"{'model':<8}{'params':>10}{'TR@1':>7}{'TR@5':>7}{'TR@10':>7}{'IR@1':>7}{'IR@5':>7}{'IR@10':>7}"
            f"{'r_mean':>8}{'latency ms':>12}{'speedup':>9}  sparsity vs student (v/t/f, total)")
    lines = [head]
    for name, r in report["models"].items():
        s = r.get("sparsity_vs_student") or {}
        sparsity = f"{s['vision']:.2f}/{s['text']:.2f}/{s['fusion']:.2f}, {s['total']:.2f}" if s else "-"
        lines.append(
            f"{name:<8}{r['params'] / 1e6:>9.2f}M{r['txt_r1']:>7.1f}{r['txt_r5']:>7.1f}{r['txt_r10']:>7.1f}"
            f"{r['img_r1']:>7.1f}{r['img_r5']:>7.1f}{r['img_r10']:>7.1f}{r['r_mean']:>8.1f}{r['latency_ms']:>12.1f}"
            f"{r['speedup']:>9.2f}  {sparsity}"
        )
    p = report["protocol"]
    lines += ["", f"Latency: {p['latency']}.", f"Evaluation: {p['evaluation']}.",
              f"Pruned keeps {report['models']['pruned']['r_mean_fraction_of_teacher']:.1%} of the teacher's r_mean; "
              f"wall time {report['wall_time_s']:.0f} s."]
    return "\n".join(lines)


RECIPES = {
    "teacher": "Trained from scratch on fresh synthetic scenes with ITC + ITM (hard negatives from ITC) + MLM.",
    "student": "Half-depth student (layer i ← teacher layer 2i+1 per encoder), general distillation: "
               "0.6·VLP + 0.4·(attention + hidden + logit KD).",
    "pruned": "Distilled student fine-tuned for retrieval with task KD (ITM logits, attention, hidden states) and "
              "hard-concrete gates on heads and FFN neurons of all encoders, one global Lagrangian target "
              "(modal-adaptive), then materialized into a smaller dense model.",
}
HOW_MADE = {
    "teacher": "trained from scratch as the teacher of the EfficientVLM demo",
    "student": "distilled from the demo teacher into half the layers",
    "pruned": "distilled and then modal-adaptively pruned (and physically materialized)",
}

__all__ = ["DemoArguments", "format_report", "run_demo"]
