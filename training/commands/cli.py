"""`efficientvlm` command line: one sub-command per stage, arguments from flags or a JSON/YAML file.

Every sub-command parses dataclasses with `HfArgumentParser`, so `efficientvlm <command> --help` lists each option
with its meaning, and `efficientvlm <command> config.yaml` reads the same options from a file.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import errno
import io
import json
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable
from types import FrameType
from typing import get_type_hints

from transformers import HfArgumentParser, TrainingArguments

DESCRIPTIONS = {
    "teacher": "Pre-train a teacher with ITC + ITM (hard negatives) + MLM, or fine-tune one on a task (--task{tasks}).",
    "distill": "General distillation into a half-depth student (VLP losses + attention/hidden/logit KD).",
    "init-student": "Build a half-depth student from a teacher's layers (the pre-training teacher, or a task teacher "
                    "with --task: its task head too), untrained: the start of distill or prune.",
    "prune": "Task fine-tuning (--task{tasks}) with task KD and modal-adaptive L0 pruning to a target sparsity.",
    "export": "Materialize a pruned checkpoint into a smaller dense model; write a Hub-ready folder + model card.",
    "evaluate": "A checkpoint's task metrics (--task{tasks}) on built-in synthetic or JSON data.",
    "bench": "Parameters, FLOPs and latency of teacher vs student vs pruned student on a task's inference path "
             "(--task{tasks}; stated protocol).",
    "push": "Upload a Hub-ready folder to a Hugging Face Hub repo.",
    "demo": "Run the whole chain (--task{tasks}) on built-in synthetic data; writes report.json + Hub-ready "
            "folders.",
    "demo-teacher": "Train the demo's teacher until its held-out learning curve flattens (objects from scratch, or "
                    "--init_from + twins: binding); `make demo-teacher` runs both stages of the shipped one.",
    "demo-summary": "One table over several demo seeds: mean, spread and CIs per model, paired differences.",
    "convert-xvlm": "Convert an X-VLM / EfficientVLM .pth checkpoint into a Hub-ready folder.",
    "build-tuxpaint": "Build an ALBEF-format JSON from the Debian tuxpaint-stamps-default package.",
    "compare-splits": "Uniform vs manual vs learned (modal-adaptive) split at equal total sparsity: metric, params, "
                      "latency, split.",
    "latency-table": "Measure per-unit latency of a student's sub-layers on its task's path (for prune --budget "
                     "latency).",
    "analyze-modules": "Module sensitivity: prune one encoder at increasing ratios (+ optional recovery), table + plot.",
    "index": "Embed an image gallery once into an index folder (resumable; RANK / WORLD_SIZE build shards).",
    "search": "Query an index with a text (ITC top-k, ITM re-ranking of --rerank_k) or an image; prints JSON.",
    "app": "Write a Gradio demo page for a model as a Space-ready folder (search a --gallery / --index, classify, "
           "caption, VQA: what the model can do); --serve runs it here (the `app` extra).",
    "push-space": "Upload an app folder (from `efficientvlm app`) as a Hugging Face Space that loads the model repo.",
}


def describe(command: str, registry: bool = False) -> str:
    """The command's one-line description; with `registry`, its `{tasks}` lists the registered tasks (importing the
    registry imports torch: the top-level `--help` stays fast and says "--task T")."""
    if registry:
        from ..tasks import TASKS

        tasks = ": " + " | ".join(TASKS)
    else:
        tasks = " T"
    return DESCRIPTIONS[command].format(tasks=tasks)


def _write(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


TRAINER_GROUP = "Trainer options (transformers.TrainingArguments)"
HELP_EPILOGUE = ("Each --snake_case option is also accepted as --kebab-case. A config.json / config.yaml holds the "
                 "same options as keys. `efficientvlm --debug ...` shows tracebacks.")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Lists each option once, as `--snake_case` (the `--kebab-case` aliases HfArgumentParser adds still parse), and
    appends "(default: ...)" only where the default says something the help text does not already say."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.nargs == 0 or action.default is None or action.default == "" or "default" in text.lower():
            return text
        return super()._get_help_string(action)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if len(action.option_strings) > 1 and all(o.startswith("--") for o in action.option_strings):
            action = copy.copy(action)
            action.option_strings = action.option_strings[:1]
        return super()._format_action_invocation(action)


def _group_title(cls: type) -> str:
    """The first line of the class's own docstring (its name when it has none), as an argument-group title."""
    doc = (cls.__dict__.get("__doc__") or "").strip()
    if not doc or doc.startswith(f"{cls.__name__}("):  # dataclasses write the signature when there is no docstring
        return cls.__name__
    return doc.splitlines()[0].strip().rstrip(".")


def _declaring_class(dtype: type, name: str) -> type:
    """The most derived class in `dtype`'s MRO whose own annotations declare the field `name`."""
    return next(c for c in dtype.__mro__ if name in c.__dict__.get("__annotations__", {}))


class GroupedArgumentParser(HfArgumentParser):
    """`HfArgumentParser` whose `--help` shows one argument group per dataclass, in the order given, Trainer last.

    A `TrainingArguments` subclass is split: the fields each of its own classes adds form one group per class (most
    derived first: the pruning fields before the distillation weights they extend); the fields `TrainingArguments`
    defines go to a final "Trainer options" group, after every other group.
    """

    def __init__(self, dataclass_types, **kwargs):
        self._trainer_fields: list[dataclasses.Field] = []
        super().__init__(dataclass_types, formatter_class=_HelpFormatter, **kwargs)
        if self._trainer_fields:
            group = self.add_argument_group(TRAINER_GROUP)
            for field in self._trainer_fields:
                self._parse_dataclass_field(group, field)

    def _add_dataclass_arguments(self, dtype: type) -> None:
        hints = get_type_hints(dtype)
        is_trainer = issubclass(dtype, TrainingArguments)
        owned: dict[type, list[dataclasses.Field]] = {}
        for field in dataclasses.fields(dtype):
            if not field.init:
                continue
            field.type = hints[field.name]
            if is_trainer and field.name in TrainingArguments.__dataclass_fields__:
                self._trainer_fields.append(field)
                continue
            # a plain dataclass is one group; a Trainer subclass one group per class that declares fields
            owner = _declaring_class(dtype, field.name) if is_trainer else dtype
            owned.setdefault(owner, []).append(field)
        for owner in sorted(owned, key=dtype.__mro__.index):  # most derived class first
            title = getattr(owner, "_argument_group_name", None) or _group_title(owner)
            group = self.add_argument_group(title)
            for field in owned[owner]:
                self._parse_dataclass_field(group, field)


def _parse(command: str, types: tuple, argv: list[str]):
    parser = GroupedArgumentParser(
        types, prog=f"efficientvlm {command}", description=describe(command, registry=True), epilog=HELP_EPILOGUE,
        usage=f"efficientvlm [--debug] {command} [options | config.json | config.yaml]",
    )
    _task_defaults_in_help(parser)
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(argv[0])
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(argv[0])
    return parser.parse_args_into_dataclasses(argv)


def _task_defaults_in_help(parser: argparse.ArgumentParser) -> None:
    """Options whose default is the task's official value (`Task.prune_defaults`) list it per registered task."""
    from ..method.arguments import TASK_DEFAULT
    from ..tasks import TASKS

    for action in parser._actions:
        if action.help and TASK_DEFAULT in action.help:
            values = [f"{name} {_value(task.prune_defaults[action.dest])}" for name, task in TASKS.items()
                      if action.dest in task.prune_defaults]
            action.help = action.help.replace(TASK_DEFAULT, "default per task: " + ", ".join(values))


def _value(value) -> str:
    return {True: "on", False: "off"}.get(value, str(value)) if isinstance(value, bool) else str(value)


def _teacher(argv: list[str]) -> None:
    from .stages import DataArguments, TeacherArguments, run_teacher
    from ..method.arguments import DistillationArguments

    teacher, args, data = _parse("teacher", (TeacherArguments, DistillationArguments, DataArguments), argv)
    _, metrics = run_teacher(teacher, data, args)
    _write(json.dumps(metrics, indent=2))


def _distill(argv: list[str]) -> None:
    from .stages import DataArguments, StudentArguments, run_distill
    from ..method.arguments import DistillationArguments

    student, args, data = _parse("distill", (StudentArguments, DistillationArguments, DataArguments), argv)
    _, metrics = run_distill(student, data, args)
    _write(json.dumps(metrics, indent=2))


def _init_student(argv: list[str]) -> None:
    from .stages import InitStudentArguments, run_init_student

    (args,) = _parse("init-student", (InitStudentArguments,), argv)
    _write(json.dumps(run_init_student(args), indent=2))


def _prune(argv: list[str]) -> None:
    from .stages import DataArguments, PruneModelsArguments, run_prune
    from ..method.arguments import PruningArguments

    prune, args, data = _parse("prune", (PruneModelsArguments, PruningArguments, DataArguments), argv)
    gated, metrics = run_prune(prune, data, args)
    sparsity = {k: round(float(v.detach()), 4) for k, v in gated.l0.expected_sparsity().items()}
    _write(json.dumps({"expected_sparsity": sparsity, "eval": metrics}, indent=2))


def _export(argv: list[str]) -> None:
    from .export import ExportArguments, run_export

    (args,) = _parse("export", (ExportArguments,), argv)
    report = run_export(args)
    _write(json.dumps({k: report[k] for k in ("params", "reference_params", "sparsity")}, indent=2))


def _evaluate(argv: list[str]) -> None:
    from .stages import EvaluateArguments, evaluate_checkpoint

    (args,) = _parse("evaluate", (EvaluateArguments,), argv)
    _write(json.dumps(evaluate_checkpoint(args), indent=2))


def _bench(argv: list[str]) -> None:
    from .bench import BenchArguments, format_table, run_benchmark, write_json

    (args,) = _parse("bench", (BenchArguments,), argv)
    result = run_benchmark(args, progress=lambda name: logging.getLogger(__name__).info("benchmarking %s", name))
    _write(format_table(result))
    if args.output_json:
        write_json(result, args.output_json)


def _push(argv: list[str]) -> None:
    from .push import PushArguments, push_folder

    (args,) = _parse("push", (PushArguments,), argv)
    _write(push_folder(args))


def _demo(argv: list[str]) -> None:
    from .demo import DemoArguments, run_demo

    (args,) = _parse("demo", (DemoArguments,), argv)
    run_demo(args, write=_write)


def _demo_summary(argv: list[str]) -> None:
    from .demo import DemoSummaryArguments, run_demo_summary

    (args,) = _parse("demo-summary", (DemoSummaryArguments,), argv)
    run_demo_summary(args, write=_write)


def _demo_teacher(argv: list[str]) -> None:
    from .demo import DemoTeacherArguments, build_demo_teacher

    (args,) = _parse("demo-teacher", (DemoTeacherArguments,), argv)
    build_demo_teacher(args, command=" ".join(["efficientvlm", "demo-teacher", *argv]), write=_write)


def _convert(argv: list[str]) -> None:
    from .convert import ConvertXVLMArguments, run_convert_xvlm

    (args,) = _parse("convert-xvlm", (ConvertXVLMArguments,), argv)
    run_convert_xvlm(args)
    _write(f"wrote {args.output_dir}")


def _tuxpaint(argv: list[str]) -> None:
    from dataclasses import dataclass, field

    from ..data.files import build_tuxpaint_json

    @dataclass
    class TuxpaintArguments:
        """Arguments of `efficientvlm build-tuxpaint`."""

        output_json: str = field(default="tuxpaint.json", metadata={"help": "Where to write the ALBEF JSON."})
        stamps_dir: str = field(default="/usr/share/tuxpaint/stamps", metadata={"help": "The stamps folder."})

    (args,) = _parse("build-tuxpaint", (TuxpaintArguments,), argv)
    build_tuxpaint_json(stamps_dir=args.stamps_dir, output_json=args.output_json)
    _write(f"wrote {args.output_json}")


def _index(argv: list[str]) -> None:
    from .index import IndexArguments, build_index

    (args,) = _parse("index", (IndexArguments,), argv)
    _write(json.dumps(build_index(args), indent=2))


def _search(argv: list[str]) -> None:
    from .index import SearchArguments, run_search

    (args,) = _parse("search", (SearchArguments,), argv)
    _write(json.dumps(run_search(args), indent=2))


def _app(argv: list[str]) -> None:
    from .app import AppArguments, run_app

    (args,) = _parse("app", (AppArguments,), argv)
    run_app(args, write=_write)


def _push_space(argv: list[str]) -> None:
    from .app import SpaceArguments, push_space

    (args,) = _parse("push-space", (SpaceArguments,), argv)
    _write(push_space(args))


def _analyze(argv: list[str]) -> None:
    from .analysis import AnalyzeArguments, run_analysis
    from .stages import DataArguments

    args, data = _parse("analyze-modules", (AnalyzeArguments, DataArguments), argv)
    run_analysis(args, data, write=_write)


def _compare(argv: list[str]) -> None:
    from .compare import CompareArguments, run_compare
    from .stages import DataArguments, PruneModelsArguments
    from ..method.arguments import PruningArguments

    compare, prune, args, data = _parse(
        "compare-splits", (CompareArguments, PruneModelsArguments, PruningArguments, DataArguments), argv
    )
    run_compare(compare, prune, data, args, write=_write)


def _latency_table(argv: list[str]) -> None:
    from .latency_table import LatencyTableArguments, run_latency_table

    (args,) = _parse("latency-table", (LatencyTableArguments,), argv)
    _write(run_latency_table(args))


COMMANDS: dict[str, Callable[[list[str]], None]] = {
    "teacher": _teacher,
    "distill": _distill,
    "init-student": _init_student,
    "prune": _prune,
    "export": _export,
    "evaluate": _evaluate,
    "bench": _bench,
    "push": _push,
    "demo": _demo,
    "demo-teacher": _demo_teacher,
    "demo-summary": _demo_summary,
    "convert-xvlm": _convert,
    "build-tuxpaint": _tuxpaint,
    "analyze-modules": _analyze,
    "compare-splits": _compare,
    "latency-table": _latency_table,
    "index": _index,
    "search": _search,
    "app": _app,
    "push-space": _push_space,
}


# ------------------------------------------------------------------------------------------------------- errors
DEBUG_ENV = "EFFICIENTVLM_DEBUG"
USER_ERRORS = (ValueError, FileExistsError, FloatingPointError)  # raised by our checks; their message is the cause
_DISK_FULL_TEXT = re.compile(  # errno 28 as the Rust (safetensors) and C++ (torch.save) writers report it
    r"No space left on device|os error 28|StorageFull|basic_ios::clear|iostream error|"
    r"PytorchStreamWriter failed writing|file write failed|unexpected pos \d+ vs \d+"
)
_MISSING_FILE_TEXT = re.compile(r"does not appear to have a file named|no file named", re.IGNORECASE)
_SIZE_MISMATCH_TEXT = re.compile(r"size mismatch for ([^:\s]+): ([^\n]*)")
_WRITTEN_PATH_NAMES = ("filename", "f", "file", "path", "save_directory", "output_dir")  # torch.save, save_file, ...


def _frames(error: BaseException) -> list[FrameType]:
    """The frames the error passed through, innermost first."""
    frames, tb = [], error.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    return frames[::-1]


def _local_path(error: BaseException, names: tuple[str, ...] = (), suffix: str = "") -> str | None:
    """The innermost path held by a local variable named in `names` (any name when empty) ending in `suffix`."""
    for frame in _frames(error):
        for name, value in frame.f_locals.items():
            if names and name not in names:
                continue
            if isinstance(value, io.IOBase):  # an open file: its path
                value = getattr(value, "name", None)
            if isinstance(value, (str, os.PathLike)) and os.fspath(value).endswith(suffix):
                return os.fspath(value)
    return None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _disk_full(error: BaseException) -> str | None:
    """"disk full while writing <path>" for ENOSPC, or the texts torch / safetensors turn it into."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        detail = ""
    elif _DISK_FULL_TEXT.search(str(error)):
        detail = f" ({_one_line(str(error))})"
    else:
        return None
    path = getattr(error, "filename", None) or _local_path(error, _WRITTEN_PATH_NAMES)
    return f"disk full while writing {path or 'a file (path unknown)'}{detail}"


def _os_error(error: OSError) -> str:
    """A missing file, a denied permission, ... named with its path."""
    if error.errno is not None and error.filename is not None:
        cause = {errno.ENOENT: "file not found", errno.EACCES: "permission denied", errno.EPERM: "permission denied"}
        target = error.filename if error.filename2 is None else f"{error.filename} -> {error.filename2}"
        return f"{cause.get(error.errno, error.strerror or os.strerror(error.errno))}: {target}"
    text = _one_line(str(error))
    if _MISSING_FILE_TEXT.search(text):  # transformers: "<dir> does not appear to have a file named config.json."
        return "missing file: " + re.sub(r"^Error\s+", "", text.split(". Checkout")[0])
    return text


def _size_mismatch(error: RuntimeError) -> str | None:
    """Names the first tensor whose checkpoint shape differs from the shape the config gives it."""
    for frame in _frames(error):  # transformers 5 logs a table and raises without names; its report is a local
        mismatched = sorted(getattr(frame.f_locals.get("loading_info"), "mismatched_keys", None) or ())
        if mismatched:
            name, checkpoint, model = mismatched[0]
            where = _local_path(error, ("pretrained_model_name_or_path",))
            more = f" (and {len(mismatched) - 1} more tensors)" if len(mismatched) > 1 else ""
            return (f"size mismatch for {name}: checkpoint {tuple(checkpoint)} vs {tuple(model)} from the config"
                    f"{f' in {where}' if where else ''}{more}: config.json does not describe these weights")
    match = _SIZE_MISMATCH_TEXT.search(str(error))  # torch's load_state_dict (and older transformers)
    if match is None:
        return None
    more = str(error).count("size mismatch for") - 1
    return f"size mismatch for {match[1]}: {match[2].strip()}" + (f" (and {more} more tensors)" if more else "")


def explain_error(error: BaseException) -> str | None:
    """One line naming the cause of an error whose cause is outside the program (input, disk, files), else None.

    None means a bug: `main` lets it through with its traceback, which a bug report needs and a rerun of a long
    training job with --debug would cost hours to get back.
    """
    from safetensors import SafetensorError

    disk_full = _disk_full(error)
    if disk_full:
        return disk_full
    if isinstance(error, USER_ERRORS):
        return str(error)
    if isinstance(error, OSError):
        return _os_error(error)
    if isinstance(error, RuntimeError):
        return _size_mismatch(error)
    if isinstance(error, SafetensorError):
        path = _local_path(error, suffix=".safetensors") or _local_path(error, ("pretrained_model_name_or_path",))
        return f"corrupt or unreadable safetensors file {path or '(path unknown)'}: {_one_line(str(error))}"
    return None


def _fail(command: str, message: str, status: int, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    sys.stderr.write(f"efficientvlm {command}: {message}\n")
    sys.stderr.flush()
    return status


def usage() -> str:
    lines = ["usage: efficientvlm [--debug] <command> [options | config.json | config.yaml]", "", "commands:"]
    lines += [f"  {name:<17}{describe(name)}" for name in COMMANDS]
    lines += [
        "",
        "`efficientvlm <command> --help` explains each option.",
        "An error with a cause outside the program (an option, a missing or corrupt file, a full disk, weights that",
        "do not fit their config) prints one line and exits with 2; Ctrl-C exits with 130. `--debug` (before the",
        f"command: after it, --debug is the Trainer's option) or {DEBUG_ENV}=1 adds the traceback. Any other error",
        "is a bug and always prints its traceback.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `efficientvlm` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")
    if argv[:1] == ["--debug"]:
        debug, argv = True, argv[1:]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not argv or argv[0] in ("-h", "--help"):
        _write(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        sys.stderr.write(f"efficientvlm: unknown command {command!r}\n\n{usage()}\n")
        return 2
    try:
        COMMANDS[command](rest)
    except KeyboardInterrupt:
        return _fail(command, "interrupted", 130, debug)
    except Exception as error:
        message = explain_error(error)
        if message is None:
            raise  # a bug: its traceback is what a report needs
        return _fail(command, f"error: {message}", 2, debug)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
