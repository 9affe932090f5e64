"""`efficientvlm demo`: the whole chain on built-in synthetic scenes, starting from a converged teacher.

The default demo starts where a user starts — from a trained teacher: the package ships one (`DEMO_TEACHER_DIR`, a
Hub-ready folder built by `efficientvlm demo-teacher`, i.e. `make demo-teacher`, with its learning curve and exact
command). Then: half-depth student (general distillation) → retrieval fine-tuning with task KD + modal-adaptive
pruning → materialize → evaluate → retrieval latency, plus the no-KD baselines (the same student trained on the
VLP losses only for the same steps, and that student pruned to the same target without KD), so the report shows what
each step buys. `--train_teacher` trains the teacher from scratch first (the full chain, much longer).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field

import torch

from .export import load_pruned, save_hub_ready, sparsity_report
from .presets import demo_config
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

DEMO_TEACHER_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "demo_teacher")
"""The shipped demo teacher (Hub-ready folder + provenance.json + learning curve)."""
PROVENANCE_FILE = "provenance.json"
LATENCY_BATCH = 32  # held-out images (and captions) in the timed retrieval batch

# (image size, width, FFN, steps, batch, eval images, lr, ITM re-ranking k, latency repeats); the teacher recipe
# (from scratch) is the one `demo-teacher` converges with.
PROFILES = {
    "default": dict(image_size=32, hidden=64, ffn=256, heads=4, teacher_steps=6000, distill_steps=200,
                    prune_steps=300, batch=32, eval_images=200, lr=1e-3, itm_k=8, latency_repeats=5,
                    itm_negatives_warmup_steps=1000),
    "quick": dict(image_size=32, hidden=64, ffn=256, heads=4, teacher_steps=120, distill_steps=40, prune_steps=60,
                  batch=32, eval_images=64, lr=1e-3, itm_k=4, latency_repeats=3, itm_negatives_warmup_steps=30),
}
QUICK_CHANGES = {"teacher_steps": "--train_teacher steps", "distill_steps": "distillation steps",
                 "prune_steps": "pruning steps", "itm_negatives_warmup_steps": "ITM-negatives warm-up steps",
                 "eval_images": "held-out scenes", "itm_k": "ITM re-ranking top-k", "latency_repeats": "latency runs"}


def quick_help() -> str:
    """The help of --quick, made from PROFILES: exactly what the quick profile changes and what it keeps."""
    default, quick = PROFILES["default"], PROFILES["quick"]
    changed = [k for k in default if default[k] != quick[k]]
    unknown = [k for k in changed if k not in QUICK_CHANGES]
    if unknown:  # a new profile entry must be named here, or the help would hide a difference
        raise KeyError(f"demo PROFILES: describe {unknown} in QUICK_CHANGES")
    kept = [k for k in default if default[k] == quick[k]]
    return ("Smoke run (~2 min; its numbers are not meaningful). Unchanged: the teacher, the model sizes and the "
            "optimiser (" + ", ".join(f"{k} {default[k]}" for k in kept) + "). Changed: "
            + ", ".join(f"{QUICK_CHANGES[k]} {default[k]} → {quick[k]}" for k in changed) + ".")


@dataclass
class DemoArguments:
    """Arguments of `efficientvlm demo`."""

    output: str = field(default="demo_output", metadata={"help": "Output dir: report.json + Hub-ready folders."})
    quick: bool = field(default=False, metadata={"help": quick_help()})
    seed: int = field(default=0, metadata={"help": "Seed of data order, new heads' init and gate noise."})
    target_sparsity: float = field(default=0.4, metadata={"help": "Global target sparsity of the pruning stage."})
    teacher: str = field(default=DEMO_TEACHER_DIR, metadata={"help": "Teacher checkpoint (default: the shipped one)."})
    train_teacher: bool = field(default=False, metadata={"help": "Train the teacher from scratch first."})
    baselines: bool = field(default=True, metadata={"help": "Also run the no-KD baselines (student, pruned)."})
    teacher_steps: int | None = field(default=None, metadata={"help": "Steps of --train_teacher."})
    distill_steps: int | None = field(default=None, metadata={"help": "Override the distillation steps."})
    prune_steps: int | None = field(default=None, metadata={"help": "Override the pruning steps."})
    overwrite: bool = field(default=True, metadata={"help": "Replace an existing output dir."})

    def __post_init__(self):
        if not 0 <= self.target_sparsity < 1:
            raise ValueError(f"--target_sparsity must lie in [0, 1), got {self.target_sparsity}")
        if not self.train_teacher and not os.path.isfile(os.path.join(self.teacher, "config.json")):
            raise ValueError(f"--teacher {self.teacher!r} is not a checkpoint folder (build the shipped one with "
                             "`make demo-teacher`, or pass --train_teacher true)")


MODEL_ORDER = ("teacher", "student", "pruned", "student_no_kd", "pruned_no_kd")


def _training_args(cls, output_dir: str, steps: int, profile: dict, seed: int, **kwargs):
    return cls(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=profile["batch"],
        learning_rate=kwargs.pop("learning_rate", profile["lr"]), warmup_steps=max(1, steps // 10),
        lr_scheduler_type="cosine", weight_decay=0.01, logging_steps=max(1, steps // 5), save_strategy="no",
        report_to=[], seed=seed, dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(),
        disable_tqdm=False, **kwargs,
    )


def _demo_data(profile: dict) -> DataArguments:
    """The demo's data: synthetic scenes at the profile's size, its held-out set and re-ranking depth."""
    return DataArguments(image_size=profile["image_size"], eval_images=profile["eval_images"], itm_k=profile["itm_k"])


def _teacher_args(output_dir: str, steps: int, profile: dict, seed: int) -> DistillationArguments:
    """The teacher recipe from scratch (VLP losses, ITM negatives random → hard over the profile's warm-up)."""
    return _training_args(DistillationArguments, output_dir, steps, profile, seed,
                          itm_negatives_warmup_steps=profile["itm_negatives_warmup_steps"])


def _prune_args(output_dir: str, steps: int, profile: dict, args: DemoArguments) -> PruningArguments:
    """The demo's pruning schedule: target ramp over the first third, masks frozen for the last 15 %."""
    return _training_args(
        PruningArguments, output_dir, steps, profile, args.seed, target_sparsity=args.target_sparsity,
        sparsity_warmup_steps=steps // 3, reg_learning_rate=0.05, freeze_masks_step=int(steps * 0.85),
        lambda_vlp=0.5, learning_rate=profile["lr"] / 2,
    )


def _latency(models: dict, processor, data: DataArguments, eval_data: dict, repeats: int) -> dict:
    """Retrieval-path latency of every model on the same held-out batch, repeats interleaved (as `measure_latency`),
    and its speed-up over the teacher: median and range of the per-round ratios (`speedup_summary`)."""
    from ..tasks import get_task
    from .latency import measure_interleaved, speedup_summary, summarize

    batch = min(LATENCY_BATCH, len(eval_data["images"]))
    task = get_task(data.task)
    workloads = {name: task.workload(model.eval(), processor, data, eval_data, batch) for name, model in models.items()}
    times = measure_interleaved(workloads, repeats, warmup=1, device=next(models["teacher"].parameters()).device)
    out = {}
    for name, runs in times.items():
        m, speedup = summarize(runs), speedup_summary(times["teacher"], runs)
        out[name] = {"latency_ms": m["median_ms"], "latency_min_ms": m["min_ms"], "latency_max_ms": m["max_ms"],
                     "speedup": speedup["median"], "speedup_min": speedup["min"], "speedup_max": speedup["max"],
                     "latency_runs": speedup["runs"], "batch_images": batch, "batch_texts": batch}
    return out


def _timed(timings: dict, name: str, fn):
    start = time.time()
    result = fn()
    timings[name] = round(time.time() - start, 1)
    return result


def _teacher(args: DemoArguments, work: str, profile: dict, data: DataArguments, eval_data, timings: dict):
    """(teacher model, its metrics, its folder, provenance): trained from scratch or loaded from the shipped folder."""
    from modeling_efficientvlm import EfficientVLMForPreTraining

    if args.train_teacher:
        config_path = _write_teacher_config(work, profile, data)
        teacher_args = _teacher_args(os.path.join(work, "teacher"), args.teacher_steps or profile["teacher_steps"],
                                     profile, args.seed)
        teacher, metrics = _timed(timings, "teacher", lambda: run_teacher(TeacherArguments(config=config_path), data,
                                                                          teacher_args, eval_data))
        provenance = {"source": "trained from scratch in this run (--train_teacher)", "steps": teacher_args.max_steps,
                      "seed": args.seed}
        return teacher, metrics, teacher_args.output_dir, provenance
    teacher = EfficientVLMForPreTraining.from_pretrained(args.teacher).eval()
    metrics = _timed(timings, "teacher_eval", lambda: evaluate_model(teacher, _processor(args.teacher), data,
                                                                     eval_data))
    provenance = {"source": os.path.abspath(args.teacher)}
    path = os.path.join(args.teacher, PROVENANCE_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            provenance.update(json.load(f))
    return teacher, metrics, args.teacher, provenance


def run_demo(args: DemoArguments, write=lambda text: None) -> dict:
    """Runs the chain and writes `report.json`; returns the report."""
    start = time.time()
    profile = PROFILES["quick" if args.quick else "default"]
    if os.path.exists(args.output) and not args.overwrite:
        raise FileExistsError(f"{args.output} exists (pass --overwrite true)")
    work = os.path.join(args.output, "checkpoints")
    data = _demo_data(profile)
    eval_data = eval_set(data)
    timings: dict[str, float] = {}
    teacher, teacher_metrics, teacher_dir, provenance = _teacher(args, work, profile, data, eval_data, timings)
    processor = _processor(teacher_dir)
    models, metrics, expected = {"teacher": teacher}, {"teacher": teacher_metrics}, {}
    distill_steps = args.distill_steps or profile["distill_steps"]
    prune_steps = args.prune_steps or profile["prune_steps"]

    # general distillation, then retrieval fine-tuning with task KD + modal-adaptive pruning; no-KD baselines alike
    runs = [("student", "pruned", True)] + ([("student_no_kd", "pruned_no_kd", False)] if args.baselines else [])
    for student_name, pruned_name, kd in runs:
        distill_args = _training_args(DistillationArguments, os.path.join(work, student_name), distill_steps, profile,
                                      args.seed, lambda_vlp=0.6)
        models[student_name], metrics[student_name] = _timed(timings, student_name, lambda: run_distill(
            StudentArguments(teacher=teacher_dir, kd=kd), data, distill_args, eval_data))
        prune_args = _prune_args(os.path.join(work, pruned_name), prune_steps, profile, args)
        _timed(timings, pruned_name, lambda: run_prune(
            PruneArguments(student=distill_args.output_dir, teacher=teacher_dir, kd=kd), data, prune_args,
            eval_data=False))
        models[pruned_name], expected[pruned_name] = load_pruned(prune_args.output_dir)  # materialize
        metrics[pruned_name] = _timed(timings, f"{pruned_name}_eval", lambda: evaluate_model(
            models[pruned_name], processor, data, eval_data))

    latency = _timed(timings, "latency", lambda: _latency(models, processor, data, eval_data,
                                                          profile["latency_repeats"]))
    report = _report(models, metrics, latency, expected, args, profile, timings, provenance)

    reference = f"the teacher `{os.path.basename(os.path.normpath(teacher_dir))}`"  # what cards measure against
    for name, model in models.items():  # Hub-ready folders + report
        entry = report["models"][name]
        extra = {**{k: entry[k] for k in ("speedup", "speedup_min", "speedup_max")},
                 "speedup_runs": entry["latency_runs"], "speedup_baseline": reference, "reference_name": reference,
                 "speed_protocol": report["protocol"]["latency"], "recipe": RECIPES[name], "how_made": HOW_MADE[name],
                 "dataset_name": "efficientvlm-synthetic-scenes",
                 "summary": f"EfficientVLM demo {name.replace('_', ' ')} for image-text retrieval on synthetic scenes."}
        _timed(timings, f"save_{name}", lambda: save_hub_ready(
            model, processor, os.path.join(args.output, name), f"efficientvlm-demo-{name.replace('_', '-')}",
            teacher.config, metrics[name], extra))
    report["stage_seconds"] = timings
    report["wall_time_s"] = time.time() - start
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


def _report(models, metrics, latency, expected, args, profile, timings, provenance) -> dict:
    from ..method.structure import count_parameters

    teacher_cfg = models["teacher"].config
    device = next(models["teacher"].parameters()).device
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})"
    runs = latency["teacher"]["latency_runs"]
    out = {"models": {}, "protocol": {
        "latency": (
            f"{device_name}, {torch.get_num_threads()} threads, float32, sdpa, batch of "
            f"{latency['teacher']['batch_images']} held-out images × {latency['teacher']['batch_texts']} captions "
            f"(40 tokens); retrieval path: encode all, ITC all pairs, ITM on top-{profile['itm_k']} per query; "
            f"{runs} timed runs after 1 warm-up, all models in one process, runs interleaved round robin; latency = "
            f"median of the {runs} runs; speed-up = median (min–max) of the {runs} per-round ratios teacher / model"
        ),
        "evaluation": f"{profile['eval_images']} held-out synthetic scenes, one unique caption each; ITM re-ranks "
                      f"the ITC top-{profile['itm_k']} (X-VLM match logit)",
        "profile": "quick" if args.quick else "default", "seed": args.seed, "target_sparsity": args.target_sparsity,
        "steps": {"distill": args.distill_steps or profile["distill_steps"],
                  "prune": args.prune_steps or profile["prune_steps"]},
        "baselines": "student_no_kd: the same half-depth student (same init) trained on the VLP losses only for the "
                     "distillation steps; pruned_no_kd: that student pruned to the same target with the task loss "
                     "only (no teacher)",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
    }, "teacher_provenance": provenance, "stage_seconds": timings}
    for name, model in models.items():
        entry = {"params": count_parameters(model.config, ("itm",))["total"], **metrics[name], **latency[name]}
        report = sparsity_report(model.config, teacher_cfg)
        entry["sparsity_vs_teacher"], entry["structure"] = report["sparsity"], report["structure"]
        entry["r_mean_fraction_of_teacher"] = entry["r_mean"] / max(metrics["teacher"]["r_mean"], 1e-9)
        out["models"][name] = entry
    for pruned_name, student_name in (("pruned", "student"), ("pruned_no_kd", "student_no_kd")):
        if pruned_name in out["models"]:
            entry = out["models"][pruned_name]
            entry["sparsity_vs_student"] = sparsity_report(models[pruned_name].config,
                                                           models[student_name].config)["sparsity"]
            entry["expected_sparsity_at_export"] = expected[pruned_name]
    return out


def format_report(report: dict) -> str:
    """The demo's table: per model parameters, R@K, r_mean (ITM and ITC-only), share of the teacher, latency."""
    head = (f"{'model':<14}{'params':>8}{'TR@1':>6}{'TR@5':>6}{'IR@1':>6}{'IR@5':>6}{'r_mean':>8}{'ITC only':>9}"
            f"{'% teacher':>10}{'latency ms':>11}{'speedup':>8}{'[min-max]':>12}"
            "  sparsity vs student (v/t/f, total)")
    lines = [head]
    for name in [n for n in MODEL_ORDER if n in report["models"]]:
        r = report["models"][name]
        s = r.get("sparsity_vs_student") or {}
        sparsity = f"{s['vision']:.2f}/{s['text']:.2f}/{s['fusion']:.2f}, {s['total']:.2f}" if s else "-"
        lines.append(
            f"{name:<14}{r['params'] / 1e6:>7.2f}M{r['txt_r1']:>6.1f}{r['txt_r5']:>6.1f}{r['img_r1']:>6.1f}"
            f"{r['img_r5']:>6.1f}{r['r_mean']:>8.1f}{r['r_mean_itc']:>9.1f}{r['r_mean_fraction_of_teacher']:>10.1%}"
            f"{r['latency_ms']:>11.1f}{r['speedup']:>8.2f}"
            f"{'[' + format(r['speedup_min'], '.2f') + '-' + format(r['speedup_max'], '.2f') + ']':>12}  {sparsity}"
        )
    p, pruned = report["protocol"], report["models"]["pruned"]
    source = report["teacher_provenance"].get("source", "?")
    lines += ["", f"Teacher: {source}.", f"Latency: {p['latency']}.", f"Evaluation: {p['evaluation']}.",
              f"Pruned keeps {pruned['r_mean_fraction_of_teacher']:.1%} of the teacher's r_mean at "
              f"{pruned['speedup']:.2f}x speed-up with {pruned['params'] / report['models']['teacher']['params']:.0%} "
              f"of its parameters; wall time {report['wall_time_s']:.0f} s.",
              "Stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in report["stage_seconds"].items()) + "."]
    return "\n".join(lines)


RECIPES = {
    "teacher": "Trained from scratch on fresh synthetic scenes with ITC + ITM (hard negatives from ITC, random → hard "
               "over a warm-up) + MLM until its held-out learning curve flattened (see provenance.json).",
    "student": "Half-depth student (layer i ← teacher layer 2i+1 per encoder), general distillation: "
               "0.6·VLP + 0.4·(attention + hidden + logit KD).",
    "pruned": "Distilled student fine-tuned for retrieval with task KD (ITM logits, self- and cross-attention, hidden "
              "states) and hard-concrete gates on heads and FFN neurons of all encoders, one global Lagrangian target "
              "(modal-adaptive), then materialized into a smaller dense model.",
    "student_no_kd": "Baseline: the same half-depth student (same init) trained on the VLP losses only, no teacher.",
    "pruned_no_kd": "Baseline: the no-KD student pruned to the same target with the task loss only, no teacher.",
}
HOW_MADE = {
    "teacher": "trained from scratch as the teacher of the EfficientVLM demo",
    "student": "distilled from the demo teacher into half the layers",
    "pruned": "distilled and then modal-adaptively pruned (and physically materialized)",
    "student_no_kd": "initialised from every other teacher layer and trained without distillation (baseline)",
    "pruned_no_kd": "pruned without distillation from the no-KD student (baseline)",
}

__all__ = ["DEMO_TEACHER_DIR", "DemoArguments", "format_report", "run_demo"]


@dataclass
class DemoTeacherArguments:
    """Arguments of `efficientvlm demo-teacher` (`make demo-teacher`): train the shipped demo teacher to convergence."""

    output_dir: str = field(default=DEMO_TEACHER_DIR, metadata={"help": "Where the Hub-ready teacher is written."})
    seed: int = field(default=0, metadata={"help": "Seed of data, init and ITM negatives."})
    max_steps: int = field(default=PROFILES["default"]["teacher_steps"], metadata={"help": "Step budget."})
    eval_every: int = field(default=250, metadata={"help": "Held-out evaluation interval (steps)."})
    convergence_band: float = field(default=1.5, metadata={"help": "Stop when the last quarter stays within ±band."})


def build_demo_teacher(args: DemoTeacherArguments, command: str, write=lambda text: None) -> dict:
    """Trains the demo teacher from scratch until its held-out learning curve flattens (or the budget ends) and
    writes it as a Hub-ready folder with `provenance.json` (command, data, seed, curve) and the curve's plot."""
    import tempfile

    profile = PROFILES["default"]
    data = _demo_data(profile)
    with tempfile.TemporaryDirectory(prefix="efficientvlm-demo-teacher-") as work:
        config_path = _write_teacher_config(work, profile, data)
        train_args = _teacher_args(os.path.join(work, "teacher"), args.max_steps, profile, args.seed)
        train_args.lr_scheduler_type = "constant_with_warmup"  # a budget, not a schedule: stopping may come early
        train_args.logging_steps = 50
        teacher_args = TeacherArguments(config=config_path, eval_every=args.eval_every, stop_when_converged=True,
                                        convergence_band=args.convergence_band)
        start = time.time()
        model, metrics = run_teacher(teacher_args, data, train_args)
        with open(os.path.join(train_args.output_dir, "learning_curve.json")) as f:
            curve = json.load(f)
        provenance = {
            "command": command, "seed": args.seed, "steps_trained": curve["curve"][-1]["step"],
            "step_budget": args.max_steps, "train_seconds": round(time.time() - start, 1),
            "data": f"fresh synthetic scenes every step ({profile['image_size']} px, batch {profile['batch']}); held-out: "
                    f"{profile['eval_images']} scenes (eval seed {data.eval_seed}), ITM re-ranks the ITC top-"
                    f"{profile['itm_k']}",
            "recipe": f"ITC + ITM + MLM from scratch, AdamW lr {profile['lr']} (constant after {train_args.warmup_steps} "
                      f"warm-up steps), ITM negatives random → hard over {profile['itm_negatives_warmup_steps']} steps",
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, torch "
                       f"{torch.__version__}",
            "metrics": metrics, "learning_curve": curve,
        }
        provenance_path = os.path.join(work, PROVENANCE_FILE)
        with open(provenance_path, "w") as f:
            json.dump(provenance, f, indent=2)
        points = ", ".join(f"{p['step']}: {p['r_mean']:.1f}" for p in curve["curve"])
        recipe = (f"`{command}` (seed {args.seed}): {provenance['recipe']}; {provenance['data']}. Held-out r_mean by "
                  f"step: {points}. Rule: {curve['rule']} — {'met' if curve['converged'] else 'NOT met'}"
                  f"{' at step ' + str(curve['converged_at_step']) if curve['converged_at_step'] else ''}.\n\n"
                  "![learning curve](learning_curve.png)")
        save_hub_ready(model, _processor(train_args.output_dir), args.output_dir, "efficientvlm-demo-teacher",
                       metrics=metrics, files={PROVENANCE_FILE: provenance_path, "learning_curve.png": os.path.join(
                           train_args.output_dir, "learning_curve.png")},
                       extra={"recipe": recipe, "how_made": HOW_MADE["teacher"], "dataset_name":
                              "efficientvlm-synthetic-scenes", "summary": "The teacher the EfficientVLM demo starts "
                              "from: a 12/6/6-layer X-VLM-style model trained to convergence on synthetic scenes."})
    if os.path.realpath(args.output_dir) == os.path.realpath(DEMO_TEACHER_DIR):
        link_remote_code(args.output_dir)
    write(json.dumps({k: provenance[k] for k in ("steps_trained", "train_seconds", "metrics")}, indent=2))
    return provenance


def link_remote_code(folder: str) -> None:
    """Replaces the remote-code copies in a folder shipped inside the package by relative links to the library's own
    files, so the shipped teacher's `trust_remote_code` path never goes stale (a wheel stores the links' contents)."""
    import modeling_efficientvlm

    library = os.path.dirname(os.path.abspath(modeling_efficientvlm.__file__))
    for name in os.listdir(folder):
        source = os.path.join(library, name)
        if name.endswith(".py") and os.path.isfile(source):
            target = os.path.join(folder, name)
            os.remove(target)
            os.symlink(os.path.relpath(source, folder), target)
