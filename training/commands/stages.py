"""The pipeline stages behind the CLI: teacher, distill, prune, evaluate. Each is a Trainer run configured by
dataclasses that `HfArgumentParser` reads from flags or a JSON/YAML file."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field

import torch

from modeling_efficientvlm import ITM_SCORES, EfficientVLMConfig, EfficientVLMForPreTraining
from modeling_efficientvlm.processing_efficientvlm import EfficientVLMProcessor, build_image_processor

from ..data.nlvr2_dataset import NLVR2_LEVELS
from ..data.retrieval_dataset import EVAL_PROTOCOLS
from ..method.arguments import DistillationArguments, PruningArguments
from ..method.student import (
    init_student_from_teacher, load_layer_map, reinitialized, resolve_layer_map, save_layer_map,
)
from ..method.trainers import (
    EfficientVLMDistillationTrainer,
    EfficientVLMPruningTrainer,
    GatedModel,
    make_gated_model,
)
from ..tasks import TASKS, check_has_path, get_task
from ..tasks.captioning import CAPTION_LENGTHS
from ..infra.runs import FINAL_STAGING, atomic_directory, check_output_dir, owns_output_dir, publish_files
from ..infra.presets import PRESETS, preset_config

METRICS_FILE = "eval_results.json"


@dataclass
class DataSourceArguments:
    """The task and where its data come from: what evaluation reads (training adds `DataArguments`' options)."""

    task: str = field(
        default="retrieval",
        metadata={"help": "; ".join(f"'{name}': {task.description}" for name, task in TASKS.items())
                  + ". General distillation always uses image-caption pairs."},
    )
    dataset: str = field(
        default="synthetic",
        metadata={"help": "'synthetic' (built-in rendered scenes) or a JSON file: ALBEF/X-VLM image-caption pairs "
                          "(retrieval; captioning: the same or COCO Karpathy records) or X-VLM NLVR2 records (nlvr2)."},
    )
    image_root: str | None = field(
        default=None,
        metadata={"help": "Folder the JSON's relative image paths start from (default: the working directory)."},
    )
    eval_dataset: str | None = field(
        default=None,
        metadata={"help": "Test JSON (ALBEF retrieval format, or X-VLM NLVR2 format with --task nlvr2); default: part "
                          "of a JSON --dataset held out from training (--holdout_fraction), or a held-out synthetic "
                          "set."},
    )
    tokenizer: str | None = field(
        default=None,
        metadata={"help": "Tokenizer dir (BERT WordPiece); default: a checkpoint's saved tokenizer, else the "
                          "synthetic-caption vocabulary (required with JSON data and no checkpoint tokenizer)."},
    )
    force_tokenizer: bool = field(
        default=False,
        metadata={"help": "Use --tokenizer even where it differs from the tokenizer saved with the checkpoint (refused "
                          "by default: the model's embedding rows belong to its own token ids)."},
    )
    image_size: int = field(default=64, metadata={"help": "Image size in pixels (and of the synthetic scenes)."})
    nlvr2_level: str = field(
        default="hard",
        metadata={"help": "Synthetic NLVR2 difficulty: 'easy' ('there is ...' statements, independent random scenes) "
                          "or 'hard' (existence / count / relation statements, images from one scene's family)."},
    )
    max_length: int = field(default=40, metadata={"help": "Maximum caption length in tokens."})
    eval_images: int = field(
        default=100,
        metadata={"help": "Size of the held-out synthetic set (images for retrieval and captioning, items for nlvr2)."},
    )
    eval_protocol: str = field(
        default="twins",
        metadata={"help": "Held-out synthetic retrieval set: 'twins' (COCO-style: 5 distinct captions per image, and "
                          "every image has 3 twins in the gallery — the same objects rearranged or with an attribute "
                          "swapped between two objects — so ranking needs relations and binding; a multiple of 4 "
                          "--eval_images keeps every group whole) or 'scenes' (the earlier set: one caption per "
                          "image)."},
    )
    eval_seed: int = field(
        default=10_000,
        metadata={"help": "Seed of the held-out synthetic set (disjoint stream) and of the held-out share of a JSON "
                          "--dataset."},
    )
    itm_k: int = field(default=16, metadata={"help": "ITM re-ranking candidates per query in evaluation (0 = ITC)."})
    itm_score: str = field(
        default="match_logit",
        metadata={"help": f"How ITM re-ranking scores a pair, one of {ITM_SCORES}: X-VLM's match logit (default), "
                          "the match log-odds, ALBEF's match logit + ITC cosine, or the match probability."},
    )
    reuse_image_kv: bool = field(
        default=True,
        metadata={"help": "Retrieval ITM re-ranking engine: project each image's cross-attention keys / values once "
                          "for all its candidate texts (default); False = one full fusion pass per (image, text) "
                          "pair, as the official X-VLM code runs it (the same scores, slower)."},
    )
    caption_lengths: str = field(
        default="official",
        metadata={"help": "Captioning decode lengths: 'official' (X-VLM Captioning.yaml: max_length 20, min_length 5, "
                          "totals that include the prompt '[CLS] a picture of', i.e. 1-16 new tokens) or 'new_tokens' "
                          "(5-20 tokens after the prompt)."},
    )

    def __post_init__(self):
        get_task(self.task)  # raises naming the registered tasks
        if self.caption_lengths not in CAPTION_LENGTHS:
            raise ValueError(f"--caption_lengths must be one of {tuple(CAPTION_LENGTHS)}, got {self.caption_lengths!r}")
        if self.itm_score not in ITM_SCORES:
            raise ValueError(f"--itm_score must be one of {ITM_SCORES}, got {self.itm_score!r}")
        if self.eval_protocol not in EVAL_PROTOCOLS:
            raise ValueError(f"--eval_protocol must be one of {EVAL_PROTOCOLS}, got {self.eval_protocol!r}")
        if self.nlvr2_level not in NLVR2_LEVELS:
            raise ValueError(f"--nlvr2_level must be one of {NLVR2_LEVELS}, got {self.nlvr2_level!r}")
        if self.dataset != "synthetic" and not os.path.isfile(self.dataset):
            raise ValueError(f"--dataset must be 'synthetic' or an existing JSON file, got {self.dataset!r}")
        if self.eval_dataset and not os.path.isfile(self.eval_dataset):
            raise ValueError(f"--eval_dataset must be an existing JSON file, got {self.eval_dataset!r}")


@dataclass
class DataArguments(DataSourceArguments):
    """The data source plus what only training reads: MLM masking and the held-out share of a JSON dataset."""

    mlm_probability: float = field(default=0.25, metadata={"help": "MLM masking probability (0 disables MLM)."})
    max_masks: int = field(default=8, metadata={"help": "At most this many masked tokens per caption."})
    synthetic_twins: float = field(
        default=0.5,
        metadata={"help": "Synthetic image-caption training: share of scenes that come with a twin (the same objects "
                          "rearranged, or an attribute swapped between two objects) in the same batch, the hard "
                          "negative that teaches relations and binding (0: independent scenes)."},
    )
    synthetic_captions: int = field(
        default=2,
        metadata={"help": "Synthetic image-caption training: each image yields 1 to this many distinct captions in one "
                          "batch (COCO-style; ITC targets and ITM negatives follow the image ids)."},
    )
    holdout_fraction: float = field(
        default=0.1,
        metadata={"help": "Without --eval_dataset, a JSON --dataset is split: this share of its images (retrieval) "
                          "or items (nlvr2), at least 1 and at most --holdout_max, drawn with --eval_seed, is held "
                          "out for evaluation and never trained on (the same share in every stage)."},
    )
    holdout_max: int = field(default=1000, metadata={"help": "At most this many held-out images / items."})

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.mlm_probability < 1.0:
            raise ValueError(f"--mlm_probability must lie in [0, 1), got {self.mlm_probability}")
        if not 0.0 <= self.synthetic_twins <= 1.0 or self.synthetic_captions < 1:
            raise ValueError(f"--synthetic_twins must lie in [0, 1] and --synthetic_captions be >= 1, got "
                             f"{self.synthetic_twins} and {self.synthetic_captions}")
        if not 0.0 < self.holdout_fraction < 1.0 or self.holdout_max < 1:
            raise ValueError(f"--holdout_fraction must lie in (0, 1) and --holdout_max be >= 1, got "
                             f"{self.holdout_fraction} and {self.holdout_max}")


@dataclass
class EvaluateArguments(DataSourceArguments):
    """The checkpoint to score and the data to score it on (`efficientvlm evaluate`)."""

    model: str = field(default="", metadata={"help": "Checkpoint dir to evaluate (required)."})
    dataset: str = field(
        default="synthetic",
        metadata={"help": "What to score: 'synthetic' (built-in rendered scenes) or a test JSON (ALBEF image-caption "
                          "pairs, or X-VLM NLVR2 records with --task nlvr2), all of it; same as --eval_dataset."},
    )
    eval_dataset: str | None = field(default=None, metadata={"help": "Same as --dataset (a test JSON)."})
    image_size: int | None = field(
        default=None,
        metadata={"help": "Size of the synthetic scenes in pixels; default: the checkpoint's image size (images are "
                          "always resized to the checkpoint's size)."},
    )

    def __post_init__(self):
        if not self.model or not os.path.isdir(self.model):
            raise ValueError(f"--model must be an existing checkpoint dir, got {self.model!r}")
        if self.dataset != "synthetic" and self.eval_dataset and (
                os.path.realpath(self.dataset) != os.path.realpath(self.eval_dataset)):
            raise ValueError(f"evaluate scores one data set, but --dataset {self.dataset!r} and --eval_dataset "
                             f"{self.eval_dataset!r} differ; give one of them")
        if self.dataset != "synthetic":
            self.eval_dataset = self.dataset  # both flags mean "score this file"
        super().__post_init__()
        if self.image_size is None:  # the checkpoint's own input size
            self.image_size = EfficientVLMConfig.from_pretrained(self.model).vision_config.image_size


@dataclass
class TeacherArguments:
    """How the teacher is built."""

    preset: str = field(default="demo", metadata={"help": f"Config preset: one of {sorted(PRESETS)}."})
    config: str | None = field(default=None, metadata={"help": "A config.json to build the teacher from instead."})
    init_from: str | None = field(default=None, metadata={"help": "Continue from this EfficientVLM checkpoint dir."})
    vision_model: str | None = field(default=None, metadata={"help": "Init the vision tower from a CLIP/ViT dir."})
    text_model: str | None = field(default=None, metadata={"help": "Init text+fusion from a BERT dir."})
    num_text_layers: int | None = field(default=None, metadata={"help": "BERT layers for the text encoder."})
    eval_every: int = field(
        default=0,
        metadata={"help": "Evaluate the held-out set every N steps (0 = only at the end); writes learning_curve.json "
                          "and learning_curve.png beside the model."},
    )
    stop_when_converged: bool = field(
        default=False,
        metadata={"help": "With --eval_every: stop once the last quarter of the learning curve stays within "
                          "±--convergence_band of its mean (at least 8 points; retrieval: and ITM re-ranking beats ITC "
                          "alone); --max_steps is then the budget."},
    )
    convergence_band: float = field(default=1.5, metadata={"help": "Half-width of the convergence band (points)."})

    def __post_init__(self):
        if bool(self.vision_model) != bool(self.text_model):
            raise ValueError("--vision_model and --text_model go together (X-VLM init needs both towers)")
        if self.eval_every < 0 or (self.stop_when_converged and not self.eval_every):
            raise ValueError("--eval_every must be >= 0, and > 0 with --stop_when_converged")


STUDENT_INITS = ("teacher_layers", "random")


@dataclass
class StudentShapeArguments:
    """Which teacher a student is built from, how deep it is and how it starts (`distill`, `init-student`)."""

    teacher: str = field(default="", metadata={"help": "Teacher checkpoint dir (required)."})
    vision_layers: int | None = field(default=None, metadata={"help": "Student vision depth (default: half)."})
    text_layers: int | None = field(default=None, metadata={"help": "Student text depth (default: half)."})
    fusion_layers: int | None = field(default=None, metadata={"help": "Student fusion depth (default: half)."})
    layer_map: str | None = field(
        default=None,
        metadata={"help": "Teacher layer per student layer, e.g. 'vision=1,3,5,7,9,11;text=1,3,5;fusion=1,3,5'."},
    )
    student_init: str = field(
        default="teacher_layers",
        metadata={"help": "'teacher_layers' (the paper: every other teacher layer, or --layer_map) or 'random' (the "
                          "same student structure, freshly initialised with --seed: an ablation of the initialisation; "
                          "the layer map still pairs layers for KD)."},
    )

    def __post_init__(self):
        if not self.teacher or not os.path.isdir(self.teacher):
            raise ValueError(f"--teacher must be an existing checkpoint dir, got {self.teacher!r}")
        if self.student_init not in STUDENT_INITS:
            raise ValueError(f"--student_init must be one of {STUDENT_INITS}, got {self.student_init!r}")

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
class StudentArguments(StudentShapeArguments):
    """Which teacher to distil and how deep the student is."""

    kd: bool = field(
        default=True,
        metadata={"help": "false: the same half-depth student (same init) trained on the VLP losses only, no teacher "
                          "forward — the no-KD baseline."},
    )


@dataclass
class InitStudentArguments(StudentShapeArguments):
    """`efficientvlm init-student`: the student built from a teacher's layers, written as a checkpoint, untrained."""

    task: str = field(
        default="retrieval",
        metadata={"help": "The teacher's task: retrieval for the pre-training teacher (the start of `distill`), or a "
                          "task whose teacher is fine-tuned on it (nlvr2, vqa, captioning: the student keeps the task "
                          "head; the start of `prune --student` without general distillation)."},
    )
    output_dir: str = field(default="", metadata={"help": "Where the student is written (required)."})
    seed: int = field(default=0, metadata={"help": "Seed of --student_init random."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a model already in --output_dir."})

    def __post_init__(self):
        super().__post_init__()
        get_task(self.task)  # raises naming the registered tasks
        if not self.output_dir:
            raise ValueError("--output_dir is required: the folder the student is written to")


@dataclass
class PruneModelsArguments:
    """The student to prune and its task teacher."""

    student: str = field(default="", metadata={"help": "Distilled student checkpoint dir (required)."})
    teacher: str = field(default="", metadata={"help": "Task-tuned teacher checkpoint dir for task KD (required)."})
    kd: bool = field(
        default=True,
        metadata={"help": "false: prune with the task loss + Lagrangian only, no teacher (the no-KD baseline)."},
    )

    def __post_init__(self):
        for name in ("student", "teacher") if self.kd else ("student",):
            path = getattr(self, name)
            if not path or not os.path.isdir(path):
                raise ValueError(f"--{name} must be an existing checkpoint dir, got {path!r}")


# ------------------------------------------------------------------------------------------------------- helpers
def load_processor(data: DataSourceArguments, path: str | None = None) -> EfficientVLMProcessor:
    """The processor a stage trains or evaluates with.

    With a checkpoint `path`: its saved processor (its tokenizer replaced by `--tokenizer` when one is given), or,
    when it saved none, one built at the checkpoint's image size. Without: one from `--tokenizer` (or the synthetic
    vocabulary, synthetic data only) at `--image_size`.
    """
    tokenizer = None
    if data.tokenizer:
        from transformers import AutoTokenizer

        from ..data.tokenization import check_tokenizer_source

        check_tokenizer_source(data.tokenizer)
        tokenizer = AutoTokenizer.from_pretrained(data.tokenizer)
    if path and os.path.isfile(os.path.join(path, "processor_config.json")):
        processor = EfficientVLMProcessor.from_pretrained(path)
        if tokenizer is not None:
            _check_same_tokenizer(processor.tokenizer, tokenizer, path, data)
            processor.tokenizer = tokenizer
        return processor
    if tokenizer is None:
        if data.dataset != "synthetic" or data.eval_dataset:
            raise ValueError("--tokenizer is required with JSON data unless the checkpoint saved one (the synthetic "
                             "vocabulary only covers the built-in scenes)")
        from ..data.tokenization import synthetic_tokenizer

        tokenizer = synthetic_tokenizer()
    image_size = data.image_size
    if path and os.path.isfile(os.path.join(path, "config.json")):
        image_size = EfficientVLMConfig.from_pretrained(path).vision_config.image_size
    return EfficientVLMProcessor(build_image_processor(image_size), tokenizer, max_length=data.max_length)


def _check_same_tokenizer(saved, given, path: str, data: DataSourceArguments) -> None:
    """Refuses a --tokenizer whose vocabulary differs from the one saved with the checkpoint at `path` (the model's
    embedding rows belong to the saved token ids: other ids give a score that means nothing) unless
    --force_tokenizer."""
    if getattr(data, "force_tokenizer", False):
        return
    ours, theirs = saved.get_vocab(), given.get_vocab()
    if ours == theirs:
        return
    differing = sorted(set(ours.items()) ^ set(theirs.items()), key=lambda item: item[1])[:1]
    example = f", e.g. {differing[0][0]!r}" if differing else ""
    raise ValueError(f"--tokenizer {data.tokenizer} ({len(theirs)} tokens) is not the tokenizer saved with {path} "
                     f"({len(ours)} tokens; ids differ{example}): the model would read other token ids than it was "
                     "trained on; drop --tokenizer to use the saved one, or pass --force_tokenizer true")


def check_vocab(config: EfficientVLMConfig, processor: EfficientVLMProcessor | None, where: str) -> None:
    """Raises ValueError when the processor's tokenizer has more tokens than the model's text embedding has rows
    (ids past the end would fail as an IndexError inside the embedding). A None processor has nothing to check.

    Args:
        config: the model's config (`text_config.vocab_size` rows).
        processor: the processor the model is fed with.
        where: the stage and flag, e.g. "distill --teacher out/teacher", named in the message.
    """
    if processor is None:
        return
    tokens, rows = len(processor.tokenizer), config.text_config.vocab_size
    if tokens > rows:
        raise ValueError(f"{where}: the tokenizer has {tokens} tokens but the model's text embedding has only {rows} "
                         "(text_config.vocab_size); use the tokenizer the model was trained with (its saved processor, "
                         f"or --tokenizer) or one with at most {rows} tokens")


def build_datasets(data: DataArguments, processor, seed: int, mlm: bool, task: str | None = None):
    """(train dataset, collator) for the configured task and data source (`task` overrides `data.task`)."""
    return get_task(task or data.task).train_data(data, processor, seed, mlm)


def eval_set(data: DataArguments):
    """The task's held-out set (`--eval_dataset` or held-out synthetic data)."""
    return get_task(data.task).eval_data(data)


def evaluate_model(
    model, processor, data: DataSourceArguments, eval_data=None, *, show_progress=True, pruning_masks=None
) -> dict:
    """The task's metrics on the held-out set (with masks: the gated model at export masks), and under "data" which
    data they were computed on (`describe_eval_data`)."""
    eval_data = eval_set(data) if eval_data is None else eval_data
    metrics = get_task(data.task).evaluate(model, processor, data, eval_data, show_progress, pruning_masks)
    return {**metrics, "data": describe_eval_data(data, eval_data)}


def describe_eval_data(data: DataSourceArguments, held_out) -> dict:
    """Which data a held-out set built by `eval_set(data)` holds: a one-line "description", its "source" (a JSON
    path or "synthetic") and its size ("images" and "captions" for retrieval, "items" for NLVR2)."""
    size = get_task(data.task).eval_size(held_out)
    counts = {"images": size, "captions": len(held_out["captions"])} if isinstance(held_out, dict) else {"items": size}
    count_text = ", ".join(f"{value} {key}" for key, value in counts.items())
    if data.eval_dataset:
        source, text = os.path.abspath(data.eval_dataset), f"{data.eval_dataset}: {count_text}"
    elif data.dataset != "synthetic":
        source = os.path.abspath(data.dataset)
        text = (f"{count_text} of {data.dataset} held out from training (--holdout_fraction "
                f"{data.holdout_fraction}, at most --holdout_max {data.holdout_max}, seed {data.eval_seed})")
    else:
        source = "synthetic"
        protocol = f" ({data.eval_protocol} protocol)" if data.task == "retrieval" else ""
        text = f"built-in synthetic scenes{protocol}, {count_text}, seed {data.eval_seed}, {data.image_size} px"
        if data.task == "retrieval":
            counts["protocol"] = data.eval_protocol
    return {"description": text, "source": source, **counts}


def evaluate_checkpoint(args: EvaluateArguments) -> dict:
    """`efficientvlm evaluate`: the checkpoint's metrics on the data it is pointed at, with its own processor
    (tokenizer and image size) unless `--tokenizer` overrides it; "data" says what was scored."""
    processor = load_processor(args, args.model)
    model = load_task_model(args.model, args.task).eval()
    check_vocab(model.config, processor, f"evaluate --model {args.model}")
    get_task(args.task).prepare_model(model, processor, args)
    return evaluate_model(model, processor, args)


def load_task_model(path: str, task: str):
    """The checkpoint at `path` as the task's model class (pre-training checkpoints load; new heads are initialised)."""
    return get_task(task).model_class.from_pretrained(path)


def save_metrics(path: str, metrics: dict) -> None:
    with open(os.path.join(path, METRICS_FILE), "w") as f:
        json.dump(metrics, f, indent=2)


def teacher_config(teacher: TeacherArguments, data: DataArguments, vocab_size: int) -> EfficientVLMConfig:
    """The new teacher's config: `--config` as it is, else the preset at `--image_size` with `vocab_size` tokens."""
    if teacher.config:
        config = EfficientVLMConfig.from_pretrained(teacher.config)
        if config.vision_config.image_size != data.image_size:
            raise ValueError(f"--config {teacher.config} takes {config.vision_config.image_size}-pixel images but "
                             f"--image_size is {data.image_size}; pass --image_size {config.vision_config.image_size}")
        return config
    return preset_config(teacher.preset, data.image_size, vocab_size)


# -------------------------------------------------------------------------------------------------------- stages
def _data_inputs(data: DataSourceArguments) -> dict[str, str | None]:
    """The folders a stage reads through its data arguments that its saves would write over: a local --tokenizer
    (the processor is saved into --output_dir). Data files are only read, never replaced."""
    return {"--tokenizer": data.tokenizer if data.tokenizer and os.path.isdir(data.tokenizer) else None}


@owns_output_dir("teacher", inputs=lambda teacher, data, **_: {
    "--init_from": teacher.init_from, "--config": teacher.config, "--vision_model": teacher.vision_model,
    "--text_model": teacher.text_model, **_data_inputs(data)})
def run_teacher(teacher: TeacherArguments, data: DataArguments, args: DistillationArguments, eval_data=None):
    """Pre-trains (or fine-tunes) a teacher with the VLP losses: ITC + ITM with hard negatives + MLM.

    With another `data.task` (e.g. "nlvr2") it fine-tunes that task's teacher class with the task loss (usually from
    a pre-trained teacher, `--init_from`); the result is the task teacher of `prune --task <task>`. A student
    fine-tuned this way keeps its recorded layer map.
    """
    if teacher.text_model and not data.tokenizer:  # the BERT's own vocabulary, not the synthetic one
        data.tokenizer = teacher.text_model
    processor = load_processor(data, teacher.init_from)
    task = get_task(data.task)
    model_cls = task.teacher_class
    if teacher.init_from:
        model = model_cls.from_pretrained(teacher.init_from)
    elif teacher.vision_model or teacher.text_model:
        from ..method.initializers import from_vision_text_pretrained

        model = from_vision_text_pretrained(
            teacher.vision_model, teacher.text_model, teacher.num_text_layers,
            vision_config={"image_size": data.image_size},
        )
        if model_cls is not EfficientVLMForPreTraining:
            # through the task class's own from_pretrained, which converts a pre-training checkpoint (NLVR2
            # duplicates the fusion layers, VQA builds its answer decoder from them) and adds the task head
            with tempfile.TemporaryDirectory(prefix="efficientvlm-init-") as folder:
                model.save_pretrained(folder)
                model = model_cls.from_pretrained(folder)
    else:
        torch.manual_seed(args.seed)
        model = model_cls(teacher_config(teacher, data, len(processor.tokenizer)))
    built_from = [("--init_from", teacher.init_from), ("--config", teacher.config),
                  ("--text_model", teacher.text_model), ("--preset", teacher.preset)]
    check_vocab(model.config, processor, "teacher {} {}".format(*next(pair for pair in built_from if pair[1])))
    task.prepare_model(model, processor, data)
    callbacks = []
    if teacher.eval_every:
        from ..infra.learning_curve import HeldOutCurveCallback

        held_out = eval_set(data) if eval_data in (None, False) else eval_data
        curve = HeldOutCurveCallback(
            lambda net: evaluate_model(net, processor, data, held_out, show_progress=False), task.metric,
            teacher.eval_every, teacher.stop_when_converged, teacher.convergence_band,
            require_itm_gain=data.itm_k > 0,  # where the task reports an ITC-only value (retrieval)
        )
        callbacks.append(curve)
    result = _train_and_evaluate(EfficientVLMDistillationTrainer, model, None, processor, data, args, 0, eval_data,
                                 layer_map=load_layer_map(teacher.init_from), callbacks=callbacks)
    if callbacks and args.should_save:
        from ..infra.learning_curve import write_curve

        write_curve(callbacks[0].summary(), args.output_dir)
    return result


@owns_output_dir("distill", inputs=lambda student_args, data, **_: {
    "--teacher": student_args.teacher, **_data_inputs(data)})
def run_distill(student_args: StudentArguments, data: DataArguments, args: DistillationArguments, eval_data=None):
    """General distillation: half-depth student initialised from the teacher, VLP + KD on image-caption pairs."""
    if data.task != "retrieval":
        raise ValueError(
            f"distill is general (task-agnostic) distillation on image-caption pairs; --task {data.task} applies to "
            "teacher fine-tuning and prune"
        )
    teacher = EfficientVLMForPreTraining.from_pretrained(student_args.teacher)
    processor = load_processor(data, student_args.teacher)
    check_vocab(teacher.config, processor, f"distill --teacher {student_args.teacher}")
    student = init_student_from_teacher(teacher, student_args.depths(), student_args.parsed_layer_map())
    if student_args.student_init == "random":
        student = reinitialized(student, seed=args.seed)
    # the map the student was initialised with is the one every KD term uses, and it is saved beside the student
    layer_map = resolve_layer_map(student.config, teacher.config, student_args.parsed_layer_map())
    return _train_and_evaluate(EfficientVLMDistillationTrainer, student, teacher if student_args.kd else None,
                               processor, data, args, 1, eval_data, layer_map=layer_map)


def run_init_student(args: InitStudentArguments) -> dict:
    """Builds the half-depth (or --*_layers / --layer_map) student from the teacher's layers and writes it with the
    teacher's processor and the layer map (every later KD stage pairs layers by it), atomically: a failed write
    leaves no folder. Returns what was written (folder, parameters of both, layer map)."""
    check_output_dir(args.output_dir, "init-student", {"--teacher": args.teacher}, overwrite=args.overwrite)
    if os.path.isdir(args.output_dir) and os.listdir(args.output_dir) and not args.overwrite:
        raise FileExistsError(f"init-student: {args.output_dir} exists and is not empty; pass --overwrite true to "
                              "replace it, or pick another --output_dir")
    task = get_task(args.task)
    teacher = task.teacher_class.from_pretrained(args.teacher)
    processor = load_processor(DataArguments(task=args.task), args.teacher)
    check_vocab(teacher.config, processor, f"init-student --teacher {args.teacher}")
    student = init_student_from_teacher(teacher, args.depths(), args.parsed_layer_map())
    if args.student_init == "random":
        student = reinitialized(student, seed=args.seed)
    layer_map = resolve_layer_map(student.config, teacher.config, args.parsed_layer_map())
    with atomic_directory(args.output_dir) as folder:
        student.save_pretrained(folder)
        processor.save_pretrained(folder)
        save_layer_map(folder, layer_map)
    return {"output_dir": args.output_dir, "params": sum(p.numel() for p in student.parameters()),
            "teacher_params": sum(p.numel() for p in teacher.parameters()), "layer_map": layer_map}


@owns_output_dir("prune", inputs=lambda prune, data, args, **_: {
    "--student": prune.student, "--teacher": prune.teacher if prune.kd else None,
    "--latency_table": getattr(args, "latency_table", None), **_data_inputs(data)})
def run_prune(prune: PruneModelsArguments, data: DataArguments, args: PruningArguments, eval_data=None):
    """Task fine-tuning with task KD + modal-adaptive L0 pruning; saves the student and its gates.

    The student may be a general-distillation (pre-training) checkpoint: the task head is added (NLVR2: initialised).
    KD pairs student and teacher layers by the layer map recorded with the student (default map if it has none).
    Task-KD settings left unset take the task's official values (`Task.prune_defaults`).
    Evaluation (when asked) runs the gated student at its deterministic (export) masks.
    """
    teacher = load_task_model(prune.teacher, data.task) if prune.kd else None
    processor = load_processor(data, prune.student)
    torch.manual_seed(args.seed)  # a new task head (NLVR2) starts the same in every run with this seed
    student = load_task_model(prune.student, data.task)
    check_vocab(student.config, processor, f"prune --student {prune.student}")
    task = get_task(data.task)  # resolved here; the method layer gets the Task
    task.prepare_model(student, processor, data)
    if teacher is not None:
        check_vocab(teacher.config, processor, f"prune --teacher {prune.teacher}")
    if not args.latency_table and (args.budget == "flops" or args.budget == "latency" and args.world_size <= 1):
        check_has_path(task)  # the budget needs the task's path: raises naming the tasks that have one
    gated = make_gated_model(student, args, task)
    _, metrics = _train_and_evaluate(EfficientVLMPruningTrainer, gated, teacher, processor, data, args, 2, eval_data,
                                     layer_map=load_layer_map(prune.student))
    return gated, metrics


def _check_not_empty(data: DataArguments, train) -> None:
    """Raises naming the training file when no training record is left (the Trainer would fail with
    `num_samples=0`, naming no file)."""
    try:
        size = len(train)
    except TypeError:  # a synthetic stream has no length and never runs dry
        return
    if size == 0:
        held_out = "" if data.eval_dataset else (
            f" after holding out --holdout_fraction {data.holdout_fraction} of its images / items for evaluation "
            "(give a separate --eval_dataset, or more records)")
        raise ValueError(f"--dataset {data.dataset}: no training records{held_out}")


def _train_and_evaluate(trainer_cls, model, teacher, processor, data, args, seed_offset: int, eval_data,
                        layer_map=None, callbacks=None):
    """Trains with `trainer_cls` on the task's loss step, saves the final model, evaluates the task on the held-out
    set (unless `eval_data` is False).

    The final model is saved into a staging dir inside output_dir and its files are then renamed into place, so an
    interrupted save leaves no half-written file at the top (the stage's run record, written last by
    `owns_output_dir`, says whether the folder is complete)."""
    task = get_task(data.task)
    mlm = args.use_mlm and not isinstance(model, GatedModel)
    # every data file the run reads is loaded and checked (records, fields, image headers, answer list) before the
    # first step: a bad evaluation file fails now, naming the file and record, not after the whole training run
    train, collator = build_datasets(data, processor, args.seed + seed_offset, mlm=mlm)
    _check_not_empty(data, train)
    if eval_data is None:
        eval_data = eval_set(data)
        if task.eval_size(eval_data) == 0:
            raise ValueError(f"{data.eval_dataset or data.dataset}: the evaluation set is empty")
    trainer = trainer_cls(
        model=model, args=args, train_dataset=train, data_collator=collator, processing_class=processor,
        teacher_model=teacher, task=task, layer_map=layer_map, callbacks=callbacks or None,
    )
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    staging = os.path.join(args.output_dir, FINAL_STAGING)
    if args.should_save:
        shutil.rmtree(staging, ignore_errors=True)  # left by a killed run
    trainer.save_model(staging)
    if args.should_save:
        publish_files(staging, args.output_dir)
    model.eval()
    metrics = {}
    if eval_data is not False:
        gated = isinstance(model, GatedModel)
        student, masks = (model.student, model.l0.deterministic_masks()) if gated else (model, None)
        metrics = evaluate_model(student, processor, data, eval_data, pruning_masks=masks)
        if args.should_save:
            save_metrics(args.output_dir, metrics)
    return model, metrics
