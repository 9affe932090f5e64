"""`efficientvlm demo`: the whole chain on built-in synthetic scenes, starting from a converged teacher.

The default demo starts where a user starts — from a trained teacher: the package ships one (`DEMO_TEACHER_DIR`, a
Hub-ready folder built by `efficientvlm demo-teacher`, i.e. `make demo-teacher`, with its learning curve and exact
command). Then: half-depth student (general distillation) → retrieval fine-tuning with task KD + modal-adaptive
pruning → materialize → evaluate → retrieval latency, plus the no-KD baselines (the same student trained on the
VLP losses only for the same steps, and that student pruned to the same target without KD), so the report shows what
each step buys. `--train_teacher` trains the teacher from scratch first (the full chain, much longer).

`--task <name>` runs the same chain for a task whose teacher is fine-tuned on it (any registered task whose
`teacher_class` is not the pre-training model: nlvr2, vqa, captioning): the task teacher is the shipped one
(`task_teacher_dir`, built to convergence by `make task-teachers`; `--task_teacher ''` or `--train_teacher` fine-tune
one in the run instead). The students start from every other layer of that task teacher (`--student_from
task_teacher`, the default) or, as in the paper's chain, from general distillation of the pre-training teacher
(`--student_from distilled`); student = fine-tuned on the task (no pruning, as many steps as pruning); pruned = pruned
on the task with task KD from the task teacher (the task's official KD settings), materialized; the baselines: pruned
with the task loss only, the uniform split, and (distilled students only: from the task teacher it would repeat the
student) the no-KD student. Each is scored by the task's metric on its held-out set, with a 95 % bootstrap interval
over items and paired differences, next to the task's blind baseline, and timed on the task's inference path
(`Task.workload`).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field, fields

import torch

from modeling_efficientvlm import EfficientVLMForPreTraining

from .export import load_pruned, save_hub_ready, sparsity_report
from ..tasks import TASKS, Task, get_task
from ..infra.presets import demo_config
from .stages import (
    DataArguments,
    InitStudentArguments,
    describe_eval_data,
    PruneModelsArguments,
    StudentArguments,
    TeacherArguments,
    eval_set,
    evaluate_model,
    run_distill,
    run_init_student,
    run_prune,
    run_teacher,
)
from ..method.arguments import DistillationArguments, PruningArguments

STUDENT_SOURCES = ("distilled", "task_teacher")
"""Where a task chain's students start (`--student_from`)."""

DEMO_TEACHER_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "demo_teacher")
"""The shipped demo teacher (Hub-ready folder + provenance.json + learning curve)."""


def task_teacher_dir(task: str) -> str:
    """Where the shipped task teacher of `task` lives (`make task-teachers`): beside the demo teacher."""
    return os.path.join(os.path.dirname(DEMO_TEACHER_DIR), f"{task}_teacher")


def shipped_teacher_dirs() -> list[str]:
    """The shipped teachers' folders: the demo teacher and every task teacher built into the assets folder."""
    assets = os.path.dirname(DEMO_TEACHER_DIR)
    return [DEMO_TEACHER_DIR] + sorted(os.path.join(assets, name) for name in os.listdir(assets)
                                       if name.endswith("_teacher") and name != os.path.basename(DEMO_TEACHER_DIR)
                                       and os.path.isfile(os.path.join(assets, name, "config.json")))


PROVENANCE_FILE = "provenance.json"
LATENCY_BATCH = 32  # held-out images (and captions) in the timed retrieval batch
DEMO_REG_LR = 0.05
"""LR of the gates' log α and λ in the demo's pruning runs (at least): its schedules are far shorter than the
official ones (retrieval 0.01 would leave the gates near their initial sparsity within 60-300 steps)."""

# (image size, width, FFN, steps, batch, eval images, lr, ITM re-ranking k, latency repeats); the teacher recipe
# (from scratch) is the one `demo-teacher` converges with.
# `task_teacher_steps`: fine-tuning of the task teacher (--task other than retrieval; the student's task fine-tuning
# and pruning take `prune_steps`).
PROFILES = {
    "default": dict(image_size=32, hidden=64, ffn=256, heads=4, teacher_steps=6000, distill_steps=200,
                    prune_steps=300, batch=32, eval_images=1000, lr=1e-3, itm_k=8, latency_repeats=5,
                    itm_negatives_warmup_steps=1000, task_teacher_steps=300),
    "quick": dict(image_size=32, hidden=64, ffn=256, heads=4, teacher_steps=120, distill_steps=40, prune_steps=60,
                  batch=32, eval_images=64, lr=1e-3, itm_k=4, latency_repeats=3, itm_negatives_warmup_steps=30,
                  task_teacher_steps=60),
}
TASK_PROFILES: dict[str, dict[str, dict]] = {
    # NLVR2: two images per item, so batch 16 costs what batch 32 costs elsewhere; the 'easy' synthetic statements
    # (the 'hard' ones stay at chance for 1,000+ steps of the demo-sized teacher); X-VLM's NLVR domain pre-training of
    # the teacher before its NLVR2 fine-tuning (`domain_task`, `domain_steps`); lr 2e-4, the shipped teacher's (at 5e-4
    # its curve peaked at 80 % and fell to 70 %; for the students one seed each way, docs/tasks.md)
    "nlvr2": {
        "default": dict(batch=16, eval_images=1000, nlvr2_level="easy", domain_task="nlvr2_domain", domain_steps=100,
                        lr=2e-4),
        # the teacher needs ~100 NLVR2 steps to leave chance (80: 57.5 %, 100: 61 % after 40 domain steps; without
        # them it collapsed to 50 %), and at lr 1e-3 it can still collapse: half the lr; distillation gives way
        "quick": dict(batch=16, eval_images=200, nlvr2_level="easy", domain_task="nlvr2_domain", domain_steps=40,
                      task_teacher_steps=100, distill_steps=20, lr=5e-4),
    },
    # the NLVR domain pre-training of the NLVR2 teacher (`make task-teachers`): NLVR2's pairs of images
    "nlvr2_domain": {"default": dict(batch=16, eval_images=200, nlvr2_level="easy", lr=5e-4)},
}
"""Per-task changes to PROFILES (task name → profile name → entries), for tasks whose steps, batch, held-out size or
data must differ from the shared values (entries named like a `DataArguments` field set that field); `domain_task`
and `domain_steps` add a domain pre-training stage of the task teacher (see `_domain_pretraining`)."""
QUICK_CHANGES = {"teacher_steps": "--train_teacher steps", "distill_steps": "distillation steps",
                 "prune_steps": "pruning steps (and the student's task fine-tuning)",
                 "itm_negatives_warmup_steps": "ITM-negatives warm-up steps", "eval_images": "held-out scenes",
                 "itm_k": "ITM re-ranking top-k", "latency_repeats": "latency runs",
                 "task_teacher_steps": "task-teacher fine-tuning steps (--task other than retrieval)"}


def quick_help() -> str:
    """The help of --quick, made from PROFILES: exactly what the quick profile changes and what it keeps."""
    default, quick = PROFILES["default"], PROFILES["quick"]
    changed = [k for k in default if default[k] != quick[k]]
    unknown = [k for k in changed if k not in QUICK_CHANGES]
    if unknown:  # a new profile entry must be named here, or the help would hide a difference
        raise KeyError(f"demo PROFILES: describe {unknown} in QUICK_CHANGES")
    kept = [k for k in default if default[k] == quick[k]]
    tasks = "; ".join(f"{task}: " + ", ".join(f"{k} {v}" for k, v in entries.get("quick", {}).items())
                      for task, entries in TASK_PROFILES.items() if entries.get("quick"))
    return ("Smoke run (2-3 min on one CPU core; its numbers are not meaningful). Unchanged: the teacher, the model "
            "sizes and the optimiser (" + ", ".join(f"{k} {default[k]}" for k in kept) + "). Changed: "
            + ", ".join(f"{QUICK_CHANGES[k]} {default[k]} → {quick[k]}" for k in changed) + "."
            + (f" Per task ({tasks})." if tasks else ""))


def demo_profile(task: str, quick: bool) -> dict:
    """The profile a demo of `task` runs with: PROFILES' entry, changed by the task's TASK_PROFILES entry."""
    name = "quick" if quick else "default"
    return {**PROFILES[name], **TASK_PROFILES.get(task, {}).get(name, {})}


@dataclass
class DemoArguments:
    """Arguments of `efficientvlm demo`."""

    output_dir: str = field(default="demo_output", metadata={"help": "Output dir: report.json + Hub-ready folders.",
                                                              "aliases": ["--output"]})
    task: str = field(
        default="retrieval",
        metadata={"help": f"The task of the chain, one of {sorted(TASKS)}. Other than retrieval: the teacher is the "
                          "shipped task teacher (--task_teacher), the students are fine-tuned (unpruned) and pruned "
                          "on the task."},
    )
    quick: bool = field(default=False, metadata={"help": quick_help()})
    seed: int = field(default=0, metadata={"help": "Seed of data order, new heads' init and gate noise."})
    target_sparsity: float = field(
        default=0.5,
        metadata={"help": "Global target sparsity of the pruning stage (share of the student's prunable parameters). "
                          "0.5: the pruned student measured 2.85-3.07x faster than the teacher at 100.7 %% of its r_mean on "
                          "the twins protocol; 0.4 gave 2.42-2.53x (docs/retrieval-demo.md)."},
    )
    teacher: str = field(default=DEMO_TEACHER_DIR, metadata={"help": "Teacher checkpoint (default: the shipped one)."})
    train_teacher: bool = field(
        default=False, metadata={"help": "Train the teacher from scratch first (other tasks: and fine-tune the task "
                                         "teacher from it in this run)."})
    task_teacher: str | None = field(
        default=None,
        metadata={"help": "--task other than retrieval: the task teacher's folder (default: the shipped one, built by "
                          "`make task-teachers`); '' fine-tunes one from --teacher in this run "
                          "(--task_teacher_steps)."},
    )
    baselines: bool = field(
        default=True, metadata={"help": "Also run the baselines: no-KD student and pruned student, uniform split."}
    )
    teacher_steps: int | None = field(default=None, metadata={"help": "Steps of --train_teacher."})
    distill_steps: int | None = field(default=None, metadata={"help": "Override the distillation steps."})
    prune_steps: int | None = field(
        default=None, metadata={"help": "Override the pruning steps (and the student's task fine-tuning steps)."}
    )
    task_teacher_steps: int | None = field(
        default=None, metadata={"help": "Fine-tune the task teacher in this run for this many steps instead of "
                                          "loading the shipped one (--task other than retrieval)."}
    )
    overwrite: bool = field(
        default=False,
        metadata={"help": "Run into an existing --output_dir: its models, report and any checkpoints a stopped demo "
                          "left are replaced (default: refuse, as the stages do)."},
    )
    student_init: str = field(
        default="teacher_layers",
        metadata={"help": "How the students (with and without KD alike) start: 'teacher_layers' (the paper) or "
                          "'random' (an ablation: the same structure, freshly initialised)."},
    )
    student_from: str | None = field(
        default=None,
        metadata={"help": "Where the students start. 'distilled' (the paper's chain; retrieval's only one): general "
                          "distillation from the pre-training teacher, then the task; 'task_teacher' (the default of "
                          "the other tasks): every other layer of the task teacher, its embeddings and task head too, "
                          "no general distillation. After 300 task steps the pruned students keep 58-88 %% of their "
                          "converged task teachers when distilled, 96-97 %% from the task teacher (docs/tasks.md)."},
    )
    student_layers: str | None = field(
        default=None,
        metadata={"help": "Student depths 'vision,text,fusion' (retrieval; default half of the teacher's, e.g. "
                          "'3,2,2' for a quarter-depth student of the 12/6/6 demo teacher); layers are taken from the "
                          "teacher by the default map (the last teacher layer of each block)."},
    )

    def student_depths(self) -> dict[str, int]:
        """{"vision": n, "text": n, "fusion": n} from --student_layers (empty: half depth)."""
        if not self.student_layers:
            return {}
        parts = self.student_layers.split(",")
        if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"--student_layers must be three positive integers 'vision,text,fusion', got "
                             f"{self.student_layers!r}")
        return dict(zip(("vision", "text", "fusion"), (int(p) for p in parts)))

    def student_shape(self) -> dict:
        """The `StudentShapeArguments` fields these arguments set (depths, initialisation), for `distill` and
        `init-student` alike."""
        depths = {f"{modality}_layers": n for modality, n in self.student_depths().items()}
        return {**depths, "student_init": self.student_init}

    def __post_init__(self):
        self.student_depths()  # raises on a malformed --student_layers
        pretraining = get_task(self.task).teacher_class is EfficientVLMForPreTraining  # raises naming the tasks
        for name in ("teacher_steps", "distill_steps", "prune_steps", "task_teacher_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.student_from is None:
            self.student_from = "distilled" if pretraining else "task_teacher"
        if self.student_from not in STUDENT_SOURCES:
            raise ValueError(f"--student_from must be one of {STUDENT_SOURCES}, got {self.student_from!r}")
        if self.student_from == "task_teacher" and pretraining:
            raise ValueError(f"--student_from task_teacher needs a task teacher; --task {self.task}'s teacher is the "
                             "pre-training teacher, whose students are distilled (--student_from distilled)")
        if self.student_from == "task_teacher" and self.distill_steps is not None:
            raise ValueError("--distill_steps sets the general distillation of --student_from distilled; the students "
                             "of --student_from task_teacher start from the task teacher's layers without it")
        if not 0 <= self.target_sparsity < 1:
            raise ValueError(f"--target_sparsity must lie in [0, 1), got {self.target_sparsity}")
        if pretraining or self.train_teacher:
            self.task_teacher = ""  # retrieval's teacher is the pre-training one; --train_teacher fine-tunes in-run
        elif self.task_teacher is None:
            shipped = task_teacher_dir(self.task)
            in_run = self.task_teacher_steps is not None or not os.path.isfile(os.path.join(shipped, "config.json"))
            self.task_teacher = "" if in_run else shipped
        elif self.task_teacher and not os.path.isfile(os.path.join(self.task_teacher, "config.json")):
            raise ValueError(f"--task_teacher {self.task_teacher!r} is not a checkpoint folder (build the shipped "
                             "ones with `make task-teachers`, or pass --task_teacher '' to fine-tune one in this run)")
        if not self.train_teacher and not os.path.isfile(os.path.join(self.teacher, "config.json")):
            raise ValueError(f"--teacher {self.teacher!r} is not a checkpoint folder (build the shipped one with "
                             "`make demo-teacher`, or pass --train_teacher true)")


MODEL_ORDER = ("teacher", "student", "pruned", "student_no_kd", "pruned_no_kd", "pruned_uniform")


def _training_args(cls, output_dir: str, steps: int, profile: dict, seed: int, **kwargs):
    return cls(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=profile["batch"],
        learning_rate=kwargs.pop("learning_rate", profile["lr"]), warmup_steps=max(1, steps // 10),
        lr_scheduler_type="cosine", weight_decay=0.01, logging_steps=max(1, steps // 5), save_strategy="no",
        report_to=[], seed=seed, dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(),
        disable_tqdm=False, **kwargs,
    )


def _demo_data(profile: dict, task: str = "retrieval") -> DataArguments:
    """The demo's data for `task`: synthetic scenes at the profile's size, its held-out set and re-ranking depth, and
    any other `DataArguments` field a (task) profile names (e.g. `nlvr2_level`)."""
    names = {f.name for f in fields(DataArguments)} - {"task"}
    return DataArguments(task=task, **{key: value for key, value in profile.items() if key in names})


def _teacher_args(output_dir: str, steps: int, profile: dict, seed: int) -> DistillationArguments:
    """The teacher recipe from scratch (VLP losses, ITM negatives random → hard over the profile's warm-up)."""
    return _training_args(DistillationArguments, output_dir, steps, profile, seed,
                          itm_negatives_warmup_steps=profile["itm_negatives_warmup_steps"])


def _prune_args(output_dir: str, steps: int, profile: dict, args: DemoArguments, **task_kd) -> PruningArguments:
    """The demo's pruning schedule: target ramp over the first third, masks frozen for the last 15 %. Task-KD settings
    not given in `task_kd` take the task's official values (`Task.prune_defaults`)."""
    schedule = {"sparsity_warmup_steps": steps // 3, "freeze_masks_step": int(steps * 0.85), **task_kd}
    return _training_args(PruningArguments, output_dir, steps, profile, args.seed,
                          target_sparsity=args.target_sparsity, **schedule)


def _latency(models: dict, processor, data: DataArguments, eval_data: dict, repeats: int) -> dict:
    """Latency of every model on the task's inference path (`Task.workload`; retrieval: encode all, ITC, ITM
    re-ranking) on the same held-out batch, repeats interleaved (as `measure_latency`), and its speed-up over the
    teacher: median and range of the per-round ratios (`speedup_summary`)."""
    from ..infra.timing import measure_interleaved, speedup_summary, summarize

    task = get_task(data.task)
    batch = min(LATENCY_BATCH, task.eval_size(eval_data))
    workloads = {name: task.workload(model.eval(), processor, data, eval_data, batch) for name, model in models.items()}
    times = measure_interleaved(workloads, repeats, warmup=1)
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
    return teacher, metrics, args.teacher, _shipped_provenance(args.teacher)


def _shipped_provenance(folder: str) -> dict:
    """Where a given teacher comes from: its folder and, when it has one, its `provenance.json`."""
    provenance = {"source": os.path.abspath(folder)}
    path = os.path.join(folder, PROVENANCE_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            provenance.update(json.load(f))
    return provenance


@dataclass
class Chain:
    """What one demo chain produced: the models (teacher first) with their metrics, the expected sparsity of each
    pruned model at export, the data they were scored on, the teacher's folder and provenance, and per model the
    card texts ("recipe", "how_made", "summary"); the steps of each stage and the pruning run's task settings."""

    models: dict
    metrics: dict
    expected: dict
    data: DataArguments
    eval_data: object
    teacher_dir: str
    provenance: dict
    cards: dict
    steps: dict
    prune_settings: dict = field(default_factory=dict)
    ranks: dict = field(default_factory=dict)  # per model: retrieval's per-query ranks, other tasks' per-item scores


def run_demo(args: DemoArguments, write=lambda text: None) -> dict:
    """Runs the chain of `args.task` and writes `report.json` + Hub-ready folders; returns the report."""
    start = time.time()
    task = get_task(args.task)
    profile = demo_profile(task.name, args.quick)
    if os.path.exists(args.output_dir) and not args.overwrite:
        raise FileExistsError(f"demo: {args.output_dir} exists; pass --overwrite true to replace its models and "
                              "report, or pick another --output_dir")
    work = os.path.join(args.output_dir, "checkpoints")
    shutil.rmtree(work, ignore_errors=True)  # stage folders a stopped demo left: this run owns them (--overwrite)
    timings: dict[str, float] = {}
    # a task whose teacher is the pre-training model (retrieval) uses the shipped teacher as its task teacher
    fine_tuned = task.teacher_class is not EfficientVLMForPreTraining
    chain = (_task_chain if fine_tuned else _retrieval_chain)(args, task, work, profile, timings)
    processor = _processor(chain.teacher_dir)
    latency = _timed(timings, "latency", lambda: _latency(chain.models, processor, chain.data, chain.eval_data,
                                                          profile["latency_repeats"]))
    if fine_tuned:
        report = _task_report(chain, task, latency, args, profile, timings)
    else:
        report = _report(chain, latency, args, profile, timings)
        report["protocol"].update(task=task.name, metric=task.metric)

    teacher = chain.models["teacher"]
    reference = f"the teacher `{os.path.basename(os.path.normpath(chain.teacher_dir))}`"  # what cards measure against
    for name, model in chain.models.items():  # Hub-ready folders + report
        entry = report["models"][name]
        extra = {**{k: entry[k] for k in ("speedup", "speedup_min", "speedup_max")},
                 "speedup_runs": entry["latency_runs"], "speedup_baseline": reference, "reference_name": reference,
                 "speed_protocol": report["protocol"]["latency"], "dataset_name": "efficientvlm-synthetic-scenes",
                 **chain.cards[name]}
        _timed(timings, f"save_{name}", lambda: save_hub_ready(
            model, processor, os.path.join(args.output_dir, name),
            model_name=f"efficientvlm-demo-{name.replace('_', '-')}",
            reference_config=teacher.config, metrics=chain.metrics[name], extra=extra))
    report["stage_seconds"] = timings
    report["wall_time_s"] = time.time() - start
    with open(os.path.join(args.output_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    shutil.rmtree(work, ignore_errors=True)
    write(format_report(report))
    return report


def _retrieval_chain(args: DemoArguments, task: Task, work: str, profile: dict, timings: dict) -> Chain:
    """The shipped (or trained) pre-training teacher is the task teacher; per run (KD, and the no-KD baselines):
    general distillation → retrieval fine-tuning with task KD + modal-adaptive pruning → materialize → evaluate; and
    the uniform baseline: the KD student pruned with the same KD and steps, every layer cut to the same share."""
    data = _demo_data(profile, task.name)
    eval_data = eval_set(data)
    ranks: dict = {}

    def evaluate(name: str, model, processor) -> dict:  # the task's metrics + the per-query ranks (paired CIs)
        metrics, ranks[name] = task.evaluate(model, processor, data, eval_data, True, None, return_ranks=True)
        return {**metrics, "data": describe_eval_data(data, eval_data)}

    if args.train_teacher:
        # evaluated below with its per-query ranks, not a second time inside the teacher stage
        teacher, _, teacher_dir, provenance = _teacher(args, work, profile, data, False, timings)
        teacher_metrics = _timed(timings, "teacher_eval", lambda: evaluate("teacher", teacher,
                                                                           _processor(teacher_dir)))
    else:
        teacher_dir, provenance = args.teacher, _shipped_provenance(args.teacher)
        teacher = EfficientVLMForPreTraining.from_pretrained(teacher_dir).eval()
        teacher_metrics = _timed(timings, "teacher_eval", lambda: evaluate("teacher", teacher,
                                                                           _processor(teacher_dir)))
    processor = _processor(teacher_dir)
    models, metrics, expected = {"teacher": teacher}, {"teacher": teacher_metrics}, {}
    distill_steps = args.distill_steps or profile["distill_steps"]
    prune_steps = args.prune_steps or profile["prune_steps"]

    def prune(pruned_name: str, student_dir: str, kd: bool, **extra) -> None:
        # the demo's short schedule: a faster reg lr than the official 0.01, half the learning rate
        prune_args = _prune_args(os.path.join(work, pruned_name), prune_steps, profile, args,
                                 reg_learning_rate=DEMO_REG_LR, lambda_vlp=0.5, learning_rate=profile["lr"] / 2,
                                 **extra)
        _timed(timings, pruned_name, lambda: run_prune(
            PruneModelsArguments(student=student_dir, teacher=teacher_dir, kd=kd), data, prune_args, eval_data=False))
        models[pruned_name], expected[pruned_name] = load_pruned(prune_args.output_dir)  # materialize
        metrics[pruned_name] = _timed(timings, f"{pruned_name}_eval", lambda: evaluate(
            pruned_name, models[pruned_name], processor))

    runs = [("student", "pruned", True)] + ([("student_no_kd", "pruned_no_kd", False)] if args.baselines else [])
    for student_name, pruned_name, kd in runs:
        distill_args = _training_args(DistillationArguments, os.path.join(work, student_name), distill_steps, profile,
                                      args.seed, lambda_vlp=0.6)
        models[student_name], _ = _timed(timings, student_name, lambda: run_distill(
            StudentArguments(teacher=teacher_dir, kd=kd, **args.student_shape()), data, distill_args,
            eval_data=False))
        metrics[student_name] = _timed(timings, f"{student_name}_eval", lambda: evaluate(
            student_name, models[student_name], processor))
        prune(pruned_name, distill_args.output_dir, kd)
        if kd and args.baselines:  # the same KD student, the same KD and steps, the same share off every layer:
            # the uniform structure is fixed when the target ramp ends, so its weights train under it for the other
            # two thirds of the steps (the learned split keeps moving until 85 %)
            prune("pruned_uniform", distill_args.output_dir, True, uniform_split=True,
                  freeze_masks_step=prune_steps // 3)
    cards = {name: {"recipe": RECIPES[name], "how_made": HOW_MADE[name],
                    "summary": f"EfficientVLM demo {name.replace('_', ' ')} for image-text retrieval on synthetic "
                               "scenes."} for name in models}
    return Chain(models, metrics, expected, data, eval_data, teacher_dir, provenance, cards,
                 {"distill": distill_steps, "prune": prune_steps}, ranks=ranks)


def _task_chain(args: DemoArguments, task: Task, work: str, profile: dict, timings: dict) -> Chain:
    """The chain of a task whose teacher needs task fine-tuning (see the module docstring): the task teacher (the
    shipped one, or fine-tuned in this run), the distilled student fine-tuned on the task (unpruned) and the
    distilled student pruned on the task with task KD; with `args.baselines` also the no-KD student fine-tuned and
    pruned with the task loss only, and the KD student pruned by the same share in every layer."""
    data = _demo_data(profile, task.name)
    eval_data = eval_set(data)
    pretrained, pretrained_provenance = _pretraining_teacher(args, work, profile, timings)
    processor = _processor(pretrained)
    steps = {"distill": args.distill_steps or profile["distill_steps"],
             "student_fine_tune": args.prune_steps or profile["prune_steps"],
             "prune": args.prune_steps or profile["prune_steps"]}
    models, metrics, per_item, expected, settings = {}, {}, {}, {}, {}

    def evaluate(name: str, model) -> dict:  # the task's metrics + per-item scores (CIs, paired)
        values, per_item[name] = task.evaluate(model, processor, data, eval_data, True, None, return_per_item=True)
        metrics[name] = {**values, "data": describe_eval_data(data, eval_data)}
        return metrics[name]

    def fine_tune(name: str, init_from: str, train_steps: int) -> str:  # the task loss only, from `init_from`
        train_args = _training_args(DistillationArguments, os.path.join(work, f"{task.name}_{name}"), train_steps,
                                    profile, args.seed)
        models[name], _ = _timed(timings, name, lambda: run_teacher(TeacherArguments(init_from=init_from), data,
                                                                   train_args, eval_data=False))
        _timed(timings, f"{name}_eval", lambda: evaluate(name, models[name]))
        return train_args.output_dir

    if args.task_teacher:  # a converged task teacher (the shipped one by default)
        teacher_dir = args.task_teacher
        models["teacher"] = task.teacher_class.from_pretrained(teacher_dir).eval()
        task.prepare_model(models["teacher"], processor)
        _timed(timings, "teacher_eval", lambda: evaluate("teacher", models["teacher"]))
        provenance = {**_shipped_provenance(teacher_dir), "pretrained": pretrained_provenance}
    else:
        steps["teacher_fine_tune"] = args.task_teacher_steps or profile["task_teacher_steps"]
        domain_dir, domain = _domain_pretraining(args, work, profile, pretrained, timings)
        teacher_dir = fine_tune("teacher", domain_dir, steps["teacher_fine_tune"])
        provenance = {"source": f"{os.path.abspath(pretrained)} fine-tuned for {task.name} in this run",
                      "fine_tune_steps": steps["teacher_fine_tune"], "seed": args.seed,
                      "pretrained": pretrained_provenance}
        if domain is not None:
            provenance["domain_pretraining"], steps["domain"] = domain, domain["steps"]

    def prune(name: str, student_dir: str, kd: bool, **extra) -> None:
        # λ and cross-attention KD: the task's official values; the gates' lr at least the demo's (short schedules)
        reg_lr = max(task.prune_defaults.get("reg_learning_rate", DEMO_REG_LR), DEMO_REG_LR)
        prune_args = _prune_args(os.path.join(work, name), steps["prune"], profile, args, reg_learning_rate=reg_lr,
                                 **extra)
        _timed(timings, name, lambda: run_prune(PruneModelsArguments(student=student_dir, teacher=teacher_dir,
                                                                      kd=kd), data, prune_args, eval_data=False))
        models[name], expected[name] = load_pruned(prune_args.output_dir)  # materialize
        task.prepare_model(models[name], processor)
        _timed(timings, f"{name}_eval", lambda: evaluate(name, models[name]))
        if name == "pruned":
            settings.update({key: getattr(prune_args, key) for key in task.prune_defaults})  # as the trainer set them

    from_teacher = args.student_from == "task_teacher"
    if from_teacher:  # every other layer of the task teacher (its embeddings and task head too), no distillation
        steps.pop("distill")
        student_dir = os.path.join(work, "init_student")
        _timed(timings, "init_student",
               lambda: _student_from_task_teacher(teacher_dir, task, student_dir, args))
    runs = [("student", "pruned", True)] + ([("student_no_kd", "pruned_no_kd", False)] if args.baselines else [])
    for student_name, pruned_name, kd in runs:
        # general distillation from the pre-training teacher on image-caption pairs (task-agnostic); the no-KD
        # baseline: the same initialisation trained on the VLP losses only
        if not from_teacher:
            distill_args = _training_args(DistillationArguments, os.path.join(work, f"distilled_{student_name}"),
                                          steps["distill"], profile, args.seed, lambda_vlp=0.6)
            _timed(timings, f"distill_{student_name}", lambda: run_distill(
                StudentArguments(teacher=pretrained, kd=kd, **args.student_shape()), _demo_data(profile),
                distill_args, eval_data=False))
            student_dir = distill_args.output_dir
        if kd or not from_teacher:  # from the task teacher, a no-KD student would repeat the student (same init,
            fine_tune(student_name, student_dir, steps["student_fine_tune"])  # same task-loss fine-tuning)
        prune(pruned_name, student_dir, kd)
        if kd and args.baselines:  # the same KD student and task KD, the same share off every layer (as retrieval)
            prune("pruned_uniform", student_dir, True, uniform_split=True, freeze_masks_step=steps["prune"] // 3)
    title = task.card.title or task.name
    recipes = {**TASK_RECIPES, **({"teacher": TASK_RECIPES["teacher_shipped"]} if args.task_teacher else {}),
               **(TASK_RECIPES_FROM_TEACHER if from_teacher else {})}
    how_made = {**TASK_HOW_MADE, **(TASK_HOW_MADE_FROM_TEACHER if from_teacher else {})}
    cards = {name: {"recipe": recipes[name].format(task=title, **steps), "how_made": how_made[name],
                    "summary": f"EfficientVLM demo {name.replace('_', ' ')} for {title} on synthetic scenes."}
             for name in models}
    if "domain_pretraining" in provenance:
        domain = provenance["domain_pretraining"]
        cards["teacher"]["recipe"] += (f" Before the fine-tuning: {domain['steps']} steps of {domain['task']} "
                                       f"({domain['what']}).")
    return Chain(models, metrics, expected, data, eval_data, teacher_dir, provenance, cards, steps, settings,
                 ranks=per_item)


def _student_from_task_teacher(teacher_dir: str, task: Task, output_dir: str, args: DemoArguments) -> None:
    """`--student_from task_teacher`: `init-student --task <task>` from the task teacher into `output_dir`."""
    run_init_student(InitStudentArguments(teacher=teacher_dir, task=task.name, output_dir=output_dir, seed=args.seed,
                                          **args.student_shape()))


def _domain_pretraining(args: DemoArguments, work: str, profile: dict, pretrained: str,
                        timings: dict) -> tuple[str, dict | None]:
    """(folder the task teacher is fine-tuned from, what was run): with a profile `domain_task` and `domain_steps` > 0,
    that task's domain pre-training of the pre-training teacher first (nlvr2: X-VLM's NLVR domain pre-training, no KD,
    scored on its own held-out set); else the pre-training teacher itself and None."""
    name, steps = profile.get("domain_task"), profile.get("domain_steps", 0)
    if not name or not steps:
        return pretrained, None
    domain_task = get_task(name)
    train_args = _training_args(DistillationArguments, os.path.join(work, name), steps, profile, args.seed)
    _, metrics = _timed(timings, "domain", lambda: run_teacher(TeacherArguments(init_from=pretrained),
                                                               _demo_data(profile, name), train_args))
    return train_args.output_dir, {"task": name, "steps": steps, "what": domain_task.description,
                                   domain_task.metric: metrics[domain_task.metric], "data": metrics["data"]}


def _pretraining_teacher(args: DemoArguments, work: str, profile: dict, timings: dict) -> tuple[str, dict]:
    """(folder, provenance) of the pre-training teacher a task chain starts from: the shipped one, or one trained
    from scratch in this run (--train_teacher)."""
    if args.train_teacher:
        _, _, path, provenance = _teacher(args, work, profile, _demo_data(profile), False, timings)
        timings["pretraining_teacher"] = timings.pop("teacher")  # "teacher" times the task fine-tuning
        return path, provenance
    return args.teacher, _shipped_provenance(args.teacher)


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


PAIRED = {"student_kd_minus_no_kd": ("student", "student_no_kd"), "pruned_kd_minus_no_kd": ("pruned", "pruned_no_kd"),
          "pruned_learned_minus_uniform": ("pruned", "pruned_uniform")}
"""The paired comparisons of the retrieval report: r_mean(a) − r_mean(b) on the same held-out queries."""


UNIFORM_BASELINE = ("pruned_uniform: the KD student pruned with the same task KD and steps, every encoder held to the "
                    "target by its own multipliers and every layer cut to the same share when the target ramp ends "
                    "(--uniform_split, structure frozen at a third of the steps)")
"""How every demo report describes its uniform-split baseline (retrieval and the other tasks alike)."""


def _paired(ranks: dict, difference=None) -> dict:
    """Each `PAIRED` difference whose two models ran, with its paired bootstrap 95 % interval: over query images of
    the per-query retrieval ranks (default), or `difference(a, b)` of two models' per-item scores (other tasks)."""
    from ..metrics.confidence import paired_r_mean_difference

    difference = difference or paired_r_mean_difference
    return {name: difference(ranks[a], ranks[b]) for name, (a, b) in PAIRED.items() if a in ranks and b in ranks}


def _eval_protocol(data: DataArguments, eval_data: dict) -> dict:
    """{"name", "images", "captions_per_image", "twins_per_image"} of the held-out retrieval set."""
    per_image = {len(texts) for texts in eval_data["img2txt"]}
    twins = {len(t) for t in eval_data.get("twins", [[]])}
    return {"name": data.eval_protocol if data.dataset == "synthetic" and not data.eval_dataset else "file",
            "images": len(eval_data["img2txt"]),
            "captions_per_image": per_image.pop() if len(per_image) == 1 else sorted(per_image),
            "twins_per_image": twins.pop() if len(twins) == 1 else sorted(twins)}


def _evaluation_text(protocol: dict, profile: dict) -> str:
    twins = (f", {protocol['twins_per_image']} twins per image in the gallery (same objects rearranged, or an "
             "attribute swapped between two objects)" if protocol["twins_per_image"] else "")
    return (f"{protocol['images']} held-out synthetic scenes ({protocol['name']} protocol), "
            f"{protocol['captions_per_image']} captions each{twins}; TR counts any of an image's captions, IR is per "
            f"caption; ITM re-ranks the ITC top-{profile['itm_k']} (X-VLM match logit); 95 % CI: percentile "
            "bootstrap over query images (2000 resamples); twin accuracy: a caption's ITM score for its image above "
            "each twin's (first caption of every image)")


def _report(chain: Chain, latency, args, profile, timings) -> dict:
    from ..method.structure import count_parameters

    models, metrics, expected, provenance = chain.models, chain.metrics, chain.expected, chain.provenance
    protocol = _eval_protocol(chain.data, chain.eval_data)

    runs = latency["teacher"]["latency_runs"]
    out = {"models": {}, "protocol": {
        "latency": (
            f"{_device_text(models)}, batch of "
            f"{latency['teacher']['batch_images']} held-out images × {latency['teacher']['batch_texts']} captions "
            f"(40 tokens); retrieval path: encode all, ITC all pairs, ITM on top-{profile['itm_k']} per query; "
            f"{_runs_text(runs)}"
        ),
        "evaluation": _evaluation_text(protocol, profile),
        "profile": "quick" if args.quick else "default", "seed": args.seed, "target_sparsity": args.target_sparsity,
        "student_layers": args.student_layers or "half",
        "student_init": args.student_init,
        "steps": {"distill": args.distill_steps or profile["distill_steps"],
                  "prune": args.prune_steps or profile["prune_steps"]},
        "baselines": "student_no_kd: the same half-depth student (same init) trained on the VLP losses only for the "
                     "distillation steps; pruned_no_kd: that student pruned to the same target with the task loss "
                     f"only (no teacher); {UNIFORM_BASELINE}",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
    }, "eval_protocol": protocol, "teacher_provenance": provenance, "stage_seconds": timings}
    out["models"] = _model_entries(models, metrics, latency, expected, "r_mean",
                                   lambda model: count_parameters(model.config, ("itm",))["total"])
    out["paired"] = _paired(chain.ranks)
    return out


def _task_report(chain: Chain, task: Task, latency: dict, args: DemoArguments, profile: dict, timings: dict) -> dict:
    """The report of a task chain: the retrieval report's shape, with the task's metrics and inference path, the 95 %
    interval of every model's metric (`<metric>_ci95`, bootstrap over held-out items) and the paired differences."""
    from ..metrics.confidence import mean_ci95, paired_mean_difference

    runs, batch = latency["teacher"]["latency_runs"], latency["teacher"]["batch_images"]
    held_out = chain.metrics["teacher"].get("data", {}).get("description", "the held-out set")
    protocol = {
        "latency": f"{_device_text(chain.models)}; {task.workload_text(chain.data, batch)}; {_runs_text(runs)}",
        "evaluation": f"{task.metric} ({task.card.title or task.name}) on {held_out}; 95 % CI: percentile bootstrap "
                      "over held-out items (2000 resamples), paired for the differences",
        "task": task.name, "metric": task.metric,
        "profile": "quick" if args.quick else "default", "seed": args.seed, "target_sparsity": args.target_sparsity,
        "student_layers": args.student_layers or "half", "student_init": args.student_init,
        "steps": chain.steps,
        "prune_settings": chain.prune_settings,
        "student_from": args.student_from,
        "baselines": ("pruned_no_kd: the student from the task teacher's layers pruned to the same target with the "
                      "task loss only (no teacher); no student_no_kd: with no general distillation it would repeat "
                      f"the student; {UNIFORM_BASELINE}") if args.student_from == "task_teacher" else (
                     "student_no_kd: the same half-depth student (same init) trained on the VLP losses only for the "
                     "distillation steps, then fine-tuned on the task like the student; pruned_no_kd: the no-KD "
                     "general student pruned on the task to the same target with the task loss only (no teacher); "
                     f"{UNIFORM_BASELINE}"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
    }
    # every model of the chain is the task's model class: its real parameter count (tied weights once)
    models = _model_entries(chain.models, chain.metrics, latency, chain.expected, task.metric,
                            lambda model: sum(p.numel() for p in model.parameters()))
    for name, scores in chain.ranks.items():
        models[name][f"{task.metric}_ci95"] = mean_ci95(scores)
    blind = task.blind_baseline(chain.data, chain.eval_data) if task.blind_baseline else None
    return {"models": models, "protocol": protocol, "eval_protocol": {"name": task.name, "items": task.eval_size(
                chain.eval_data)}, "paired": _paired(chain.ranks, paired_mean_difference), "blind_baseline": blind,
            "teacher_provenance": chain.provenance, "stage_seconds": timings}


def _device_text(models: dict) -> str:
    """'<device>, <n> threads, float32, sdpa': where the latency was measured."""
    device = next(models["teacher"].parameters()).device
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})"
    return f"{device_name}, {torch.get_num_threads()} threads, float32, sdpa"


def _runs_text(runs: int) -> str:
    return (f"{runs} timed runs after 1 warm-up, all models in one process, runs interleaved round robin; latency = "
            f"median of the {runs} runs; speed-up = median (min–max) of the {runs} per-round ratios teacher / model")


def _model_entries(models, metrics, latency, expected, metric: str, params) -> dict:
    """Per model: parameters (`params(model)`), metrics, latency, sparsity and structure relative to the teacher, the
    share of the teacher's `metric`; per pruned model also its sparsity relative to its student and the expected
    sparsity at export."""
    teacher_cfg, out = models["teacher"].config, {}
    for name, model in models.items():
        entry = {"params": params(model), **metrics[name], **latency[name]}
        report = sparsity_report(model.config, teacher_cfg)
        entry["sparsity_vs_teacher"], entry["structure"] = report["sparsity"], report["structure"]
        entry[f"{metric}_fraction_of_teacher"] = entry[metric] / max(metrics["teacher"][metric], 1e-9)
        out[name] = entry
    for pruned_name, student_name in (("pruned", "student"), ("pruned_no_kd", "student_no_kd"),
                                      ("pruned_uniform", "student")):
        if pruned_name in out:
            entry = out[pruned_name]
            student = models.get(student_name, models["student"])  # no student_no_kd: the students share an init
            entry["sparsity_vs_student"] = sparsity_report(models[pruned_name].config, student.config)["sparsity"]
            entry["expected_sparsity_at_export"] = expected[pruned_name]
    return out


TABLE_COLUMNS = {"retrieval": (("TR@1", "txt_r1", 6), ("TR@5", "txt_r5", 6), ("IR@1", "img_r1", 6),
                               ("IR@5", "img_r5", 6), ("r_mean", "r_mean", 8), ("95% CI", "r_mean_ci95", 12),
                               ("ITC only", "r_mean_itc", 9), ("twin %", "twin_accuracy", 7))}
"""The metric columns of `format_report` per task (header, key, width); other tasks: their card's report keys."""


def _table_columns(task: Task) -> tuple:
    return TABLE_COLUMNS.get(task.name) or (tuple((key, key, max(8, len(key) + 2)) for key in task.card.report_keys)
                                            + (("95% CI", f"{task.metric}_ci95", 12),))


def format_report(report: dict) -> str:
    """The demo's table: per model parameters, the task's metrics (retrieval: R@K, r_mean with ITM and ITC-only),
    share of the teacher's metric, latency."""
    task = get_task(report["protocol"].get("task", "retrieval"))
    metric, columns = task.metric, _table_columns(task)
    head = (f"{'model':<15}{'params':>8}" + "".join(f"{title:>{width}}" for title, _, width in columns)
            + f"{'% teacher':>10}{'latency ms':>11}{'speedup':>8}{'[min-max]':>12}"
            "  sparsity vs student (v/t/f[/decoder], total)")
    lines = [head]
    for name in [n for n in MODEL_ORDER if n in report["models"]]:
        r = report["models"][name]
        s = r.get("sparsity_vs_student") or {}
        stacks = [m for m in ("vision", "text", "fusion", "decoder") if m in s]
        sparsity = "/".join(f"{s[m]:.2f}" for m in stacks) + f", {s['total']:.2f}" if s else "-"
        lines.append(
            f"{name:<15}{r['params'] / 1e6:>7.2f}M" + "".join(_cell(r.get(key), width) for _, key, width in columns)
            + f"{r[f'{metric}_fraction_of_teacher']:>10.1%}{r['latency_ms']:>11.1f}{r['speedup']:>8.2f}"
            f"{'[' + format(r['speedup_min'], '.2f') + '-' + format(r['speedup_max'], '.2f') + ']':>12}  {sparsity}"
        )
    p, pruned = report["protocol"], report["models"]["pruned"]
    source = report["teacher_provenance"].get("source", "?")
    lines += ["", f"Teacher: {source}.", f"Latency: {p['latency']}.", f"Evaluation: {p['evaluation']}.",
              f"Pruned keeps {pruned[f'{metric}_fraction_of_teacher']:.1%} of the teacher's {metric} at "
              f"{pruned['speedup']:.2f}x speed-up with {pruned['params'] / report['models']['teacher']['params']:.0%} "
              f"of its parameters; wall time {report['wall_time_s']:.0f} s."
              + (" Smoke run (--quick): too few steps and held-out items for these shares to be a measurement (a "
                 "share above 100 % is noise); run without --quick to measure." if p.get("profile") == "quick"
                 else ""),
              "Stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in report["stage_seconds"].items()) + "."]
    if report.get("blind_baseline"):
        blind = report["blind_baseline"]
        lines.append(f"Blind baseline ({blind['what']}): {metric} {blind[metric]:.1f}.")
    for name, d in report.get("paired", {}).items():
        lo, hi = d["ci95"]
        verdict = "beyond" if lo > 0 or hi < 0 else "inside"
        lines.append(f"Paired {name.replace('_', ' ')}: {d['mean']:+.2f} {metric}, 95% CI [{lo:+.2f}, {hi:+.2f}] "
                     f"(zero {'outside' if verdict == 'beyond' else 'inside'} the interval).")
    return "\n".join(lines)


def _cell(value, width: int) -> str:
    """A table cell: a number with one decimal, an interval as lo-hi, '-' when the model has no such value."""
    if value is None:
        return f"{'-':>{width}}"
    if isinstance(value, (list, tuple)):
        return f"{f'{value[0]:.1f}-{value[1]:.1f}':>{width}}"
    return f"{value:>{width}.1f}"


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
    "pruned_uniform": "Baseline: the distilled student pruned with the same task KD, target and steps, but every "
                      "encoder held to the target by its own multipliers and every layer cut to the same share of its "
                      "heads and FFN parameters (no learned split).",
}
HOW_MADE = {
    "teacher": "trained from scratch as the teacher of the EfficientVLM demo",
    "student": "distilled from the demo teacher into half the layers",
    "pruned": "distilled and then modal-adaptively pruned (and physically materialized)",
    "student_no_kd": "initialised from every other teacher layer and trained without distillation (baseline)",
    "pruned_no_kd": "pruned without distillation from the no-KD student (baseline)",
    "pruned_uniform": "distilled and then pruned by the same share in every layer (uniform baseline)",
}
TASK_RECIPES = {
    "teacher": "The demo's pre-training teacher (trained to convergence on synthetic scenes, see "
               "teacher_provenance) fine-tuned on {task} with the task loss for {teacher_fine_tune} steps.",
    "teacher_shipped": "The shipped {task} teacher: the demo's pre-training teacher fine-tuned on {task} until its "
                       "held-out learning curve flattened (`make task-teachers`; command, seed, data and curve in "
                       "teacher_provenance).",
    "student": "Half-depth student (layer i ← teacher layer 2i+1 per encoder), general distillation from the "
               "pre-training teacher ({distill} steps, 0.6·VLP + 0.4·KD), then fine-tuned on {task} with the task loss "
               "for {student_fine_tune} steps, unpruned.",
    "pruned": "The same distilled student fine-tuned on {task} for {prune} steps with task KD from the {task} teacher "
              "(the task's official KD settings) and hard-concrete gates on heads and FFN neurons of all encoders, one "
              "global Lagrangian target (modal-adaptive), then materialized into a smaller dense model.",
    "student_no_kd": "Baseline: the same half-depth student (same init) trained on the VLP losses only for {distill} "
                     "steps (no teacher), then fine-tuned on {task} with the task loss for {student_fine_tune} steps.",
    "pruned_no_kd": "Baseline: the no-KD general student pruned on {task} to the same target for {prune} steps with the "
                    "task loss only (no teacher).",
    "pruned_uniform": "Baseline: the distilled student pruned on {task} with the same task KD, target and steps, but "
                      "every encoder held to the target by its own multipliers and every layer cut to the same share "
                      "of its heads and FFN parameters (no learned split).",
}
TASK_HOW_MADE = {
    "teacher": "fine-tuned on the task from the EfficientVLM demo's pre-training teacher",
    "student": "distilled from the demo teacher into half the layers, then fine-tuned on the task",
    "pruned": "distilled, then fine-tuned on the task with task KD and modal-adaptively pruned (and physically "
              "materialized)",
    "student_no_kd": "initialised from every other teacher layer, trained without distillation, then fine-tuned on "
                     "the task (baseline)",
    "pruned_no_kd": "pruned on the task without distillation from the no-KD student (baseline)",
    "pruned_uniform": "distilled and then pruned on the task by the same share in every layer (uniform baseline)",
}
TASK_RECIPES_FROM_TEACHER = {
    "student": "Half-depth student built from the {task} teacher (layer i ← teacher layer 2i+1 per encoder; its "
               "embeddings and task head), no general distillation, then fine-tuned on {task} with the task loss for "
               "{student_fine_tune} steps, unpruned.",
    "pruned": "The same half-depth student from the {task} teacher's layers, fine-tuned on {task} for {prune} steps with "
              "task KD from that teacher (the task's official KD settings) and hard-concrete gates on heads and FFN "
              "neurons of all encoders, one global Lagrangian target (modal-adaptive), then materialized into a "
              "smaller dense model.",
    "pruned_no_kd": "Baseline: the same student from the {task} teacher's layers pruned on {task} to the same target for "
                    "{prune} steps with the task loss only (no teacher).",
    "pruned_uniform": "Baseline: the same student from the {task} teacher's layers pruned on {task} with the same task "
                      "KD, target and steps, but every encoder held to the target by its own multipliers and every "
                      "layer cut to the same share of its heads and FFN parameters (no learned split).",
}
"""`--student_from task_teacher`: the student cards' recipes (no student_no_kd: it would repeat the student)."""
TASK_HOW_MADE_FROM_TEACHER = {
    "student": "built from every other layer of the task teacher, then fine-tuned on the task",
    "pruned": "built from every other layer of the task teacher, then fine-tuned on the task with task KD and "
              "modal-adaptively pruned (and physically materialized)",
    "pruned_no_kd": "built from every other layer of the task teacher and pruned on the task without KD (baseline)",
    "pruned_uniform": "built from every other layer of the task teacher and pruned on the task by the same share in "
                      "every layer (uniform baseline)",
}

__all__ = ["DEMO_TEACHER_DIR", "DemoArguments", "format_report", "run_demo"]


@dataclass
class DemoTeacherArguments:
    """Arguments of `efficientvlm demo-teacher` (`make demo-teacher`, `make task-teachers`): train a shipped demo
    teacher to convergence — the pre-training teacher (`--task retrieval`), or a task teacher fine-tuned from it."""

    task: str = field(
        default="retrieval",
        metadata={"help": "retrieval: the pre-training teacher (ITC + ITM + MLM); another task: its task teacher, "
                          "fine-tuned with the task loss from --init_from (default: the shipped demo teacher)."},
    )
    output_dir: str | None = field(
        default=None, metadata={"help": "Where the Hub-ready teacher is written (default: the shipped folder of "
                                        "--task, under training/assets/)."})
    seed: int = field(default=0, metadata={"help": "Seed of data, init and ITM negatives."})
    max_steps: int = field(default=PROFILES["default"]["teacher_steps"], metadata={"help": "Step budget."})
    eval_every: int = field(default=250, metadata={"help": "Held-out evaluation interval (steps)."})
    convergence_band: float = field(
        default=1.5, metadata={"help": "Stop when the last quarter stays within ±band (points of the task's metric)."})
    init_from: str | None = field(
        default=None,
        metadata={"help": "Continue from this teacher (the binding stage: `make demo-teacher` first trains an "
                          "object teacher from scratch without twins, then continues it with twins); default: from "
                          "scratch (retrieval) or the shipped demo teacher (other tasks)."},
    )
    synthetic_twins: float = field(
        default=0.0, metadata={"help": "Share of training scenes that come with a twin in the batch (see `teacher "
                                       "--help`); 0 = independent scenes (the object stage)."}
    )
    synthetic_captions: int = field(default=1, metadata={"help": "1..N captions per training image."})
    learning_rate: float | None = field(
        default=None, metadata={"help": "Constant AdamW lr (default: the demo profile's of --task)."})
    itm_negatives_warmup_steps: int = field(
        default=PROFILES["default"]["itm_negatives_warmup_steps"],
        metadata={"help": "Random → hard ITM negatives over this many steps (0 = hard from the start)."},
    )
    eval_images: int | None = field(
        default=None,
        metadata={"help": "Held-out images (items) of the learning curve (twins protocol: a multiple of 4; default: "
                          "the demo profile's of --task)."},
    )
    eval_protocol: str = field(default="twins", metadata={"help": "Held-out set of the curve: 'twins' or 'scenes'."})

    def __post_init__(self):
        task = get_task(self.task)  # raises naming the registered tasks
        pretraining = task.teacher_class is EfficientVLMForPreTraining
        if not pretraining and self.init_from is None:
            self.init_from = DEMO_TEACHER_DIR
        if self.output_dir is None:
            self.output_dir = DEMO_TEACHER_DIR if pretraining else task_teacher_dir(self.task)
        for name in ("max_steps", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.init_from and not os.path.isfile(os.path.join(self.init_from, "config.json")):
            raise ValueError(f"--init_from {self.init_from!r} is not a checkpoint folder")


def build_demo_teacher(args: DemoTeacherArguments, command: str, write=lambda text: None) -> dict:
    """Trains a demo teacher until its held-out learning curve flattens (or the budget ends) and writes it as a
    Hub-ready folder with `provenance.json` (command, data, seed, curve) and the curve's plot: the pre-training
    teacher (from scratch, or continued from `--init_from`), or a task teacher fine-tuned from `--init_from`."""
    import tempfile

    task = get_task(args.task)
    pretraining = task.teacher_class is EfficientVLMForPreTraining
    base = demo_profile(task.name, quick=False)
    profile = {**base, "lr": args.learning_rate or base["lr"], "eval_images": args.eval_images or base["eval_images"],
               "itm_negatives_warmup_steps": args.itm_negatives_warmup_steps}
    data = _demo_data(profile, task.name)
    if pretraining:
        data.synthetic_twins, data.synthetic_captions = args.synthetic_twins, args.synthetic_captions
        data.eval_protocol = args.eval_protocol
    with tempfile.TemporaryDirectory(prefix="efficientvlm-demo-teacher-") as work:
        config_path = None if args.init_from else _write_teacher_config(work, profile, data)
        train_args = _teacher_args(os.path.join(work, "teacher"), args.max_steps, profile, args.seed)
        train_args.lr_scheduler_type = "constant_with_warmup"  # a budget, not a schedule: stopping may come early
        train_args.logging_steps = 50
        teacher_args = TeacherArguments(config=config_path, init_from=args.init_from, eval_every=args.eval_every,
                                        stop_when_converged=True, convergence_band=args.convergence_band)
        start = time.time()
        held_out = eval_set(data)  # the curve's, the final evaluation's and the blind baseline's
        model, metrics = run_teacher(teacher_args, data, train_args, held_out)
        with open(os.path.join(train_args.output_dir, "learning_curve.json")) as f:
            curve = json.load(f)
        held_out_text = metrics.get("data", {}).get("description", f"{profile['eval_images']} held-out items")
        if pretraining:
            data_text = (f"fresh synthetic scenes every step ({profile['image_size']} px, batch {profile['batch']}; "
                         f"twin share {data.synthetic_twins}, 1-{data.synthetic_captions} captions per image); "
                         f"held-out: {profile['eval_images']} images, protocol {data.eval_protocol} (eval seed "
                         f"{data.eval_seed}), ITM re-ranks the ITC top-{profile['itm_k']}")
            recipe = (f"ITC + ITM + MLM {'from ' + args.init_from if args.init_from else 'from scratch'}, AdamW lr "
                      f"{profile['lr']} (constant after {train_args.warmup_steps} warm-up steps), ITM negatives "
                      f"random → hard over {profile['itm_negatives_warmup_steps']} steps")
        else:
            data_text = (f"fresh synthetic {task.name} items every step ({profile['image_size']} px, batch "
                         f"{profile['batch']}); held-out: {held_out_text}")
            recipe = (f"the {task.name} task loss from {args.init_from}, AdamW lr {profile['lr']} (constant after "
                      f"{train_args.warmup_steps} warm-up steps)")
        provenance = {
            "command": command, "task": task.name, "seed": args.seed, "steps_trained": curve["curve"][-1]["step"],
            "step_budget": args.max_steps, "train_seconds": round(time.time() - start, 1), "data": data_text,
            "recipe": recipe,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, torch "
                       f"{torch.__version__}",
            "metrics": metrics, "learning_curve": curve,
        }
        if task.blind_baseline:  # what the teacher must clearly beat: the best predictor that ignores the image
            provenance["blind_baseline"] = task.blind_baseline(data, held_out)
        if args.init_from:
            provenance["initialised_from"] = _shipped_provenance(args.init_from)
        provenance_path = os.path.join(work, PROVENANCE_FILE)
        with open(provenance_path, "w") as f:
            json.dump(provenance, f, indent=2)
        points = ", ".join(f"{p['step']}: {p[task.metric]:.1f}" for p in curve["curve"])
        card_recipe = (f"`{command}` (seed {args.seed}): {recipe}; {data_text}. Held-out {task.metric} by step: "
                       f"{points}. Rule: {curve['rule']} — {'met' if curve['converged'] else 'NOT met'}"
                       f"{' at step ' + str(curve['converged_at_step']) if curve['converged_at_step'] else ''}.\n\n"
                       "![learning curve](learning_curve.png)")
        name = "teacher" if pretraining else f"{task.name}-teacher"
        title = task.card.title or task.name
        summary = ("The teacher the EfficientVLM demo starts from: a 12/6/6-layer X-VLM-style model trained to "
                   "convergence on synthetic scenes." if pretraining else
                   f"The {title} teacher of `efficientvlm demo --task {task.name}`: the demo teacher fine-tuned on "
                   "synthetic scenes until its held-out curve flattened.")
        save_hub_ready(model, _processor(train_args.output_dir), args.output_dir,
                       model_name=f"efficientvlm-demo-{name}",
                       metrics=metrics, files={PROVENANCE_FILE: provenance_path, "learning_curve.png": os.path.join(
                           train_args.output_dir, "learning_curve.png")},
                       extra={"recipe": card_recipe, "how_made": HOW_MADE["teacher"] if pretraining else
                              TASK_HOW_MADE["teacher"], "dataset_name": "efficientvlm-synthetic-scenes",
                              "summary": summary})
    if os.path.dirname(os.path.realpath(args.output_dir)) == os.path.dirname(os.path.realpath(DEMO_TEACHER_DIR)):
        copy_remote_code(args.output_dir)  # a shipped folder holds real copies of the remote code
    write(json.dumps({k: provenance[k] for k in ("steps_trained", "train_seconds", "metrics")}, indent=2))
    return provenance


def copy_remote_code(folder: str) -> list[str]:
    """Writes the library's remote-code files (`modeling_efficientvlm/*.py` but `__init__.py`) into `folder` as real
    files, replacing older copies or links, and returns their names. The shipped teacher must load with
    `trust_remote_code` from a copy of its folder (`cp -r`, a zip), which relative links break; its copies are kept
    equal to the library byte for byte by a test, and `make remote-code` rewrites them after an edit of the library."""
    import modeling_efficientvlm

    library = os.path.dirname(os.path.abspath(modeling_efficientvlm.__file__))
    names = sorted(n for n in os.listdir(library) if n.endswith(".py") and n != "__init__.py")
    for name in names:
        target = os.path.join(folder, name)
        if os.path.lexists(target):
            os.remove(target)  # a link would make copyfile write through it into the library
        shutil.copyfile(os.path.join(library, name), target)
    return names


@dataclass
class DemoSummaryArguments:
    """Arguments of `efficientvlm demo-summary`: one table over the report.json files of several demo seeds."""

    reports: list[str] = field(default_factory=list, metadata={"help": "report.json files of `demo` runs (seeds)."})
    output_dir: str | None = field(default=None, metadata={"help": "Also write summary.json + summary.md here."})

    def __post_init__(self):
        if len(self.reports) < 1:
            raise ValueError("--reports needs at least one report.json")
        for path in self.reports:
            if not os.path.isfile(path):
                raise ValueError(f"--reports: {path} is not a file")


def summarize_seeds(reports: list[dict]) -> dict:
    """Per model: r_mean (and its 95 % CI) and twin accuracy per seed, mean and spread (max − min), speed-up range,
    parameters; per paired comparison: the difference and its CI per seed, the mean difference and how many seeds'
    intervals exclude zero. Reports must share the protocol (task, evaluation set, target)."""
    keys = [(r["protocol"].get("task"), json.dumps(r.get("eval_protocol"), sort_keys=True),
             r["protocol"].get("target_sparsity"), json.dumps(r["protocol"].get("steps"), sort_keys=True),
             r["protocol"].get("student_layers", "half")) for r in reports]
    if len(set(keys)) != 1:
        raise ValueError(f"the reports differ in task / evaluation set / target / steps / student depth: "
                         f"{sorted(set(keys))}")
    metric = reports[0]["protocol"].get("metric", "r_mean")
    seeds = [r["protocol"].get("seed") for r in reports]
    models = {}
    for name in [n for n in MODEL_ORDER if all(n in r["models"] for r in reports)]:
        entries = [r["models"][name] for r in reports]
        values = [e[metric] for e in entries]
        models[name] = {
            "per_seed": values, "mean": sum(values) / len(values), "spread": max(values) - min(values),
            "ci95_per_seed": [e.get(f"{metric}_ci95") for e in entries],
            "twin_accuracy_per_seed": [e.get("twin_accuracy") for e in entries],
            "fraction_of_teacher_mean": sum(e[f"{metric}_fraction_of_teacher"] for e in entries) / len(entries),
            "speedup_range": [min(e["speedup"] for e in entries), max(e["speedup"] for e in entries)],
            "params_range": [min(e["params"] for e in entries), max(e["params"] for e in entries)],
            "sparsity_vs_student": [e.get("sparsity_vs_student", {}).get("total") for e in entries],
        }
    paired = {}
    for name in [n for n in PAIRED if all(n in r.get("paired", {}) for r in reports)]:
        runs = [r["paired"][name] for r in reports]
        paired[name] = {"per_seed": [d["mean"] for d in runs], "ci95_per_seed": [d["ci95"] for d in runs],
                        "mean": sum(d["mean"] for d in runs) / len(runs),
                        "seeds_excluding_zero": sum(d["ci95"][0] > 0 or d["ci95"][1] < 0 for d in runs)}
    return {"seeds": seeds, "metric": metric, "eval_protocol": reports[0].get("eval_protocol"), "models": models,
            "paired": paired}


def format_seed_summary(summary: dict) -> str:
    """The summary as two markdown tables (models; paired differences); the twin-accuracy column where the reports
    have one (retrieval)."""
    seeds = " / ".join(str(s) for s in summary["seeds"])
    twins = any(t is not None for m in summary["models"].values() for t in m["twin_accuracy_per_seed"])
    lines = [f"| model | {summary['metric']} seeds {seeds} | mean | spread | 95 % CI per seed |"
             + (" twin % |" if twins else "") + " % of teacher | speed-up vs teacher | params |",
             "|---|---|---|---|---|" + ("---|" if twins else "") + "---|---|---|"]
    for name, m in summary["models"].items():
        cis = ", ".join("–" if ci is None else f"{ci[0]:.1f}–{ci[1]:.1f}" for ci in m["ci95_per_seed"])
        twin = " / ".join("–" if t is None else f"{t:.1f}" for t in m["twin_accuracy_per_seed"])
        lines.append(f"| {name} | {' / '.join(f'{v:.1f}' for v in m['per_seed'])} | {m['mean']:.1f} | "
                     f"{m['spread']:.1f} | {cis} |" + (f" {twin} |" if twins else "")
                     + f" {m['fraction_of_teacher_mean']:.1%} | "
                     f"{m['speedup_range'][0]:.2f}–{m['speedup_range'][1]:.2f}× | "
                     f"{m['params_range'][0] / 1e6:.2f}–{m['params_range'][1] / 1e6:.2f} M |")
    if summary["paired"]:
        lines += ["", "| paired difference (same queries) | per seed [95 % CI] | mean | seeds whose CI excludes 0 |",
                  "|---|---|---|---|"]
        for name, d in summary["paired"].items():
            per = "; ".join(f"{v:+.2f} [{lo:+.2f}, {hi:+.2f}]"
                            for v, (lo, hi) in zip(d["per_seed"], d["ci95_per_seed"]))
            lines.append(f"| {name} | {per} | {d['mean']:+.2f} | {d['seeds_excluding_zero']} of {len(d['per_seed'])} |")
    return "\n".join(lines)


def run_demo_summary(args: DemoSummaryArguments, write=lambda text: None) -> dict:
    reports = []
    for path in args.reports:
        with open(path) as f:
            reports.append(json.load(f))
    summary = summarize_seeds(reports)
    text = format_seed_summary(summary)
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        with open(os.path.join(args.output_dir, "summary.md"), "w") as f:
            f.write(text + "\n")
    write(text)
    return summary
