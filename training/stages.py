"""The pipeline stages behind the CLI: teacher, distill, prune, evaluate. Each is a Trainer run configured by
dataclasses that `HfArgumentParser` reads from flags or a JSON/YAML file."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from modeling_efficientvlm import (
    EfficientVLMConfig,
    EfficientVLMForImageTextRetrieval,
    EfficientVLMForPreTraining,
    EfficientVLMForVisualReasoning,
)
from modeling_efficientvlm.processing_efficientvlm import EfficientVLMProcessor, build_image_processor

from .benchmark import PRESETS
from .data import NLVR2_LEVELS
from .student import init_student_from_teacher
from .trainer import (
    DistillationArguments,
    EfficientVLMDistillationTrainer,
    EfficientVLMPruningTrainer,
    GatedModel,
    PruningArguments,
    make_gated_model,
)

METRICS_FILE = "eval_results.json"
TASKS = {"retrieval": EfficientVLMForImageTextRetrieval, "nlvr2": EfficientVLMForVisualReasoning}
"""Fine-tuning tasks and their model classes."""
PRIMARY_METRIC = {"retrieval": "r_mean", "nlvr2": "accuracy"}


@dataclass
class DataArguments:
    """The task and where its data come from."""

    task: str = field(
        default="retrieval",
        metadata={"help": "'retrieval' (image-caption pairs; R@K, r_mean) or 'nlvr2' (two images + a statement → "
                          "true/false; accuracy). General distillation always uses image-caption pairs."},
    )
    dataset: str = field(
        default="synthetic",
        metadata={"help": "'synthetic' (built-in rendered scenes) or a JSON file: ALBEF/X-VLM image-caption pairs "
                          "(retrieval) or X-VLM NLVR2 records (nlvr2)."},
    )
    image_root: str | None = field(default=None, metadata={"help": "Folder the JSON's relative image paths start from."})
    eval_dataset: str | None = field(
        default=None,
        metadata={"help": "Test JSON (ALBEF retrieval format, or X-VLM NLVR2 format with --task nlvr2); default: a "
                          "held-out synthetic set."},
    )
    tokenizer: str | None = field(
        default=None, metadata={"help": "Tokenizer dir (BERT WordPiece); default: the synthetic-caption vocabulary."}
    )
    image_size: int = field(default=64, metadata={"help": "Image size in pixels."})
    nlvr2_level: str = field(
        default="hard",
        metadata={"help": "Synthetic NLVR2 difficulty: 'easy' ('there is ...' statements, independent random scenes) "
                          "or 'hard' (existence / count / relation statements, images from one scene's family)."},
    )
    max_length: int = field(default=40, metadata={"help": "Maximum caption length in tokens."})
    mlm_probability: float = field(default=0.25, metadata={"help": "MLM masking probability (0 disables MLM)."})
    max_masks: int = field(default=8, metadata={"help": "At most this many masked tokens per caption."})
    eval_images: int = field(
        default=100, metadata={"help": "Size of the held-out synthetic set (images for retrieval, items for nlvr2)."}
    )
    eval_seed: int = field(default=10_000, metadata={"help": "Seed of the held-out synthetic set (disjoint stream)."})
    itm_k: int = field(default=16, metadata={"help": "ITM re-ranking candidates per query in evaluation (0 = ITC)."})

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"--task must be one of {sorted(TASKS)}, got {self.task!r}")
        if self.nlvr2_level not in NLVR2_LEVELS:
            raise ValueError(f"--nlvr2_level must be one of {NLVR2_LEVELS}, got {self.nlvr2_level!r}")
        if self.dataset != "synthetic" and not os.path.isfile(self.dataset):
            raise ValueError(f"--dataset must be 'synthetic' or an existing JSON file, got {self.dataset!r}")
        if self.dataset != "synthetic" and not self.tokenizer:
            raise ValueError("--tokenizer is required with a JSON dataset (the synthetic vocabulary only covers scenes)")
        if not 0.0 <= self.mlm_probability < 1.0:
            raise ValueError(f"--mlm_probability must lie in [0, 1), got {self.mlm_probability}")


@dataclass
class TeacherArguments:
    """How the teacher is built."""

    preset: str = field(default="demo", metadata={"help": f"Config preset: one of {sorted(PRESETS)}."})
    config: str | None = field(default=None, metadata={"help": "A config.json to build the teacher from instead."})
    init_from: str | None = field(default=None, metadata={"help": "Continue from this EfficientVLM checkpoint dir."})
    vision_model: str | None = field(default=None, metadata={"help": "Init the vision tower from a CLIP/ViT dir."})
    text_model: str | None = field(default=None, metadata={"help": "Init text+fusion from a BERT dir."})
    num_text_layers: int | None = field(default=None, metadata={"help": "BERT layers for the text encoder."})

    def __post_init__(self):
        if bool(self.vision_model) != bool(self.text_model):
            raise ValueError("--vision_model and --text_model go together (X-VLM init needs both towers)")


@dataclass
class StudentArguments:
    """Which teacher to distil and how deep the student is."""

    teacher: str = field(default="", metadata={"help": "Teacher checkpoint dir (required)."})
    vision_layers: int | None = field(default=None, metadata={"help": "Student vision depth (default: half)."})
    text_layers: int | None = field(default=None, metadata={"help": "Student text depth (default: half)."})
    fusion_layers: int | None = field(default=None, metadata={"help": "Student fusion depth (default: half)."})
    layer_map: str | None = field(
        default=None,
        metadata={"help": "Teacher layer per student layer, e.g. 'vision=1,3,5,7,9,11;text=1,3,5;fusion=1,3,5'."},
    )

    def __post_init__(self):
        if not self.teacher or not os.path.isdir(self.teacher):
            raise ValueError(f"--teacher must be an existing checkpoint dir, got {self.teacher!r}")

    def depths(self) -> dict[str, int]:
        values = {"vision": self.vision_layers, "text": self.text_layers, "fusion": self.fusion_layers}
        return {k: v for k, v in values.items() if v is not None}

    def parsed_layer_map(self) -> dict[str, list[int]]:
        if not self.layer_map:
            return {}
        out = {}
        for part in self.layer_map.split(";"):
            name, _, values = part.partition("=")
            try:
                out[name.strip()] = [int(v) for v in values.split(",") if v.strip()]
            except ValueError as error:
                raise ValueError(f"--layer_map entry {part!r} must look like vision=1,3,5") from error
        return out


@dataclass
class PruneArguments:
    """The student to prune and its task teacher."""

    student: str = field(default="", metadata={"help": "Distilled student checkpoint dir (required)."})
    teacher: str = field(default="", metadata={"help": "Task-tuned teacher checkpoint dir for task KD (required)."})

    def __post_init__(self):
        for name in ("student", "teacher"):
            path = getattr(self, name)
            if not path or not os.path.isdir(path):
                raise ValueError(f"--{name} must be an existing checkpoint dir, got {path!r}")


# ------------------------------------------------------------------------------------------------------- helpers
def load_processor(data: DataArguments, path: str | None = None) -> EfficientVLMProcessor:
    """The processor saved with a checkpoint, else one from --tokenizer, else the synthetic vocabulary."""
    if path and os.path.isfile(os.path.join(path, "processor_config.json")):
        return EfficientVLMProcessor.from_pretrained(path)
    if data.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(data.tokenizer)
    else:
        from .tokenization import synthetic_tokenizer

        tokenizer = synthetic_tokenizer()
    return EfficientVLMProcessor(build_image_processor(data.image_size), tokenizer, max_length=data.max_length)


def build_datasets(data: DataArguments, processor, seed: int, mlm: bool, task: str | None = None):
    """(train dataset, collator) for the configured task and data source (`task` overrides `data.task`)."""
    from .collators import NLVR2Collator, RetrievalCollator

    if (task or data.task) == "nlvr2":
        collator = NLVR2Collator(processor, max_length=data.max_length)
        if data.dataset == "synthetic":
            from .data import SyntheticNLVR2Dataset

            return SyntheticNLVR2Dataset(seed=seed, image_size=data.image_size, level=data.nlvr2_level), collator
        from .datasets_io import load_nlvr2_json

        return load_nlvr2_json(data.dataset, data.image_root), collator
    collator = RetrievalCollator(
        processor, max_length=data.max_length, mlm_probability=data.mlm_probability if mlm else 0.0,
        max_masks=data.max_masks,
    )
    if data.dataset == "synthetic":
        from .data import SyntheticRetrievalDataset

        return SyntheticRetrievalDataset(seed=seed, image_size=data.image_size), collator
    from .datasets_io import load_albef_json

    return load_albef_json(data.dataset, data.image_root, split_captions=True), collator


def eval_set(data: DataArguments):
    """The held-out set of the task: retrieval {images, captions, img2txt, txt2img}, or a list of NLVR2 items."""
    if data.task == "nlvr2":
        if data.eval_dataset:
            from .datasets_io import load_nlvr2_json

            return load_nlvr2_json(data.eval_dataset, data.image_root)
        from .data import make_nlvr2_eval_set

        return make_nlvr2_eval_set(data.eval_images, seed=data.eval_seed, image_size=data.image_size,
                                   level=data.nlvr2_level)
    if data.eval_dataset:
        from .datasets_io import load_retrieval_eval_set

        return load_retrieval_eval_set(data.eval_dataset, data.image_root)
    from .data import make_retrieval_eval_set

    return make_retrieval_eval_set(data.eval_images, seed=data.eval_seed, image_size=data.image_size)


def evaluate_model(
    model, processor, data: DataArguments, eval_data=None, show_progress=True, pruning_masks=None
) -> dict:
    """The task's metrics on the held-out set (with masks: the gated model at export masks).

    retrieval: R@1/5/10 (TR/IR) and r_mean; nlvr2: {"accuracy"} (percent).
    """
    from .evaluation import evaluate_nlvr2, evaluate_retrieval

    eval_data = eval_set(data) if eval_data is None else eval_data
    if data.task == "nlvr2":
        return evaluate_nlvr2(model, eval_data, processor, show_progress=show_progress, pruning_masks=pruning_masks,
                              max_length=data.max_length)
    return evaluate_retrieval(
        model, eval_data["images"], eval_data["captions"], eval_data["img2txt"], eval_data["txt2img"], processor,
        k=data.itm_k, show_progress=show_progress, pruning_masks=pruning_masks,
    )


def load_task_model(path: str, task: str):
    """The checkpoint at `path` as the task's model class (pre-training checkpoints load; new heads are initialised)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
    return TASKS[task].from_pretrained(path)


def save_metrics(path: str, metrics: dict) -> None:
    with open(os.path.join(path, METRICS_FILE), "w") as f:
        json.dump(metrics, f, indent=2)


def teacher_config(teacher: TeacherArguments, data: DataArguments, vocab_size: int) -> EfficientVLMConfig:
    if teacher.config:
        return EfficientVLMConfig.from_pretrained(teacher.config)
    if teacher.preset not in PRESETS:
        raise ValueError(f"--preset must be one of {sorted(PRESETS)}, got {teacher.preset!r}")
    if teacher.preset == "demo":
        return PRESETS["demo"](image_size=data.image_size, vocab_size=vocab_size)
    return PRESETS[teacher.preset]()


# -------------------------------------------------------------------------------------------------------- stages
def run_teacher(teacher: TeacherArguments, data: DataArguments, args: DistillationArguments, eval_data=None):
    """Pre-trains (or fine-tunes) a teacher with the VLP losses: ITC + ITM with hard negatives + MLM.

    With `data.task == "nlvr2"` it fine-tunes an `EfficientVLMForVisualReasoning` on NLVR2 items with the task loss
    (usually from a pre-trained teacher, `--init_from`); the result is the task teacher of `prune --task nlvr2`.
    """
    if teacher.text_model and not data.tokenizer:  # the BERT's own vocabulary, not the synthetic one
        data.tokenizer = teacher.text_model
    processor = load_processor(data, teacher.init_from)
    model_cls = EfficientVLMForVisualReasoning if data.task == "nlvr2" else EfficientVLMForPreTraining
    if teacher.init_from:
        model = model_cls.from_pretrained(teacher.init_from)
    elif teacher.vision_model or teacher.text_model:
        from .convert import from_vision_text_pretrained

        model = from_vision_text_pretrained(
            teacher.vision_model, teacher.text_model, teacher.num_text_layers,
            vision_config={"image_size": data.image_size},
        )
        if model_cls is not EfficientVLMForPreTraining:  # same weight names: keep the encoders, add the task head
            task_model = model_cls(model.config)
            task_model.load_state_dict(model.state_dict(), strict=False)
            model = task_model
    else:
        torch.manual_seed(args.seed)
        model = model_cls(teacher_config(teacher, data, len(processor.tokenizer)))
    return _train_and_evaluate(EfficientVLMDistillationTrainer, model, None, processor, data, args, 0, eval_data)


def run_distill(student_args: StudentArguments, data: DataArguments, args: DistillationArguments, eval_data=None):
    """General distillation: half-depth student initialised from the teacher, VLP + KD on image-caption pairs."""
    if data.task != "retrieval":
        raise ValueError(
            f"distill is general (task-agnostic) distillation on image-caption pairs; --task {data.task} applies to "
            "teacher fine-tuning and prune"
        )
    teacher = EfficientVLMForPreTraining.from_pretrained(student_args.teacher)
    processor = load_processor(data, student_args.teacher)
    student = init_student_from_teacher(teacher, student_args.depths(), student_args.parsed_layer_map())
    return _train_and_evaluate(EfficientVLMDistillationTrainer, student, teacher, processor, data, args, 1, eval_data)


def run_prune(prune: PruneArguments, data: DataArguments, args: PruningArguments, eval_data=None):
    """Task fine-tuning (retrieval or NLVR2) with task KD + modal-adaptive L0 pruning; saves the student and its gates.

    The student may be a general-distillation (pre-training) checkpoint: the task head is added (NLVR2: initialised).
    Evaluation (when asked) runs the gated student at its deterministic (export) masks.
    """
    teacher = load_task_model(prune.teacher, data.task)
    processor = load_processor(data, prune.student)
    torch.manual_seed(args.seed)  # a new task head (NLVR2) starts the same in every run with this seed
    student = load_task_model(prune.student, data.task)
    gated = make_gated_model(student, args)
    _, metrics = _train_and_evaluate(EfficientVLMPruningTrainer, gated, teacher, processor, data, args, 2, eval_data)
    return gated, metrics


def _train_and_evaluate(trainer_cls, model, teacher, processor, data, args, seed_offset: int, eval_data):
    """Trains with `trainer_cls`, saves the final model, evaluates the task on the held-out set (unless False)."""
    mlm = args.use_mlm and not isinstance(model, GatedModel)
    train, collator = build_datasets(data, processor, args.seed + seed_offset, mlm=mlm)
    trainer = trainer_cls(
        model=model, args=args, train_dataset=train, data_collator=collator, processing_class=processor,
        teacher_model=teacher,
    )
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(args.output_dir)
    model.eval()
    metrics = {}
    if eval_data is not False:
        student, masks = (model.student, model.l0.deterministic_masks()) if isinstance(model, GatedModel) else (model, None)
        metrics = evaluate_model(student, processor, data, eval_data, pruning_masks=masks)
        if args.should_save:
            save_metrics(args.output_dir, metrics)
    return model, metrics
