"""`efficientvlm` command line: one sub-command per stage, arguments from flags or a JSON/YAML file.

Every sub-command parses dataclasses with `HfArgumentParser`, so `efficientvlm <command> --help` lists each option
with its meaning, and `efficientvlm <command> config.yaml` reads the same options from a file.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable

from transformers import HfArgumentParser

DESCRIPTIONS = {
    "teacher": "Pre-train a teacher with ITC + ITM (hard negatives) + MLM, or fine-tune one on NLVR2 (--task nlvr2).",
    "distill": "General distillation into a half-depth student (VLP losses + attention/hidden/logit KD).",
    "prune": "Task fine-tuning (retrieval or NLVR2) with task KD and modal-adaptive L0 pruning to a target sparsity.",
    "export": "Materialize a pruned checkpoint into a smaller dense model; write a Hub-ready folder + model card.",
    "evaluate": "Retrieval R@1/5/10 (TR/IR) and r_mean, or NLVR2 accuracy, on built-in synthetic or JSON data.",
    "bench": "Parameters, FLOPs and latency of teacher vs student vs pruned student (stated protocol).",
    "push": "Upload a Hub-ready folder to a Hugging Face Hub repo.",
    "demo": "Run the whole chain on built-in synthetic data and write report.json + Hub-ready folders.",
    "demo-teacher": "Train the demo's teacher from scratch until its held-out learning curve flattens (shipped).",
    "convert-xvlm": "Convert an X-VLM / EfficientVLM .pth checkpoint into a Hub-ready folder.",
    "build-tuxpaint": "Build an ALBEF-format JSON from the Debian tuxpaint-stamps-default package.",
    "compare-splits": "Uniform vs manual vs learned (modal-adaptive) split at equal total sparsity: metric, params, "
                      "latency, split.",
    "analyze-modules": "Module sensitivity: prune one encoder at increasing ratios (+ optional recovery), table + plot.",
}


def _write(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _parse(command: str, types: tuple, argv: list[str]):
    parser = HfArgumentParser(types, prog=f"efficientvlm {command}", description=DESCRIPTIONS[command])
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(argv[0])
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(argv[0])
    return parser.parse_args_into_dataclasses(argv)


def _teacher(argv: list[str]) -> None:
    from .stages import DataArguments, TeacherArguments, run_teacher
    from ..method.arguments import DistillationArguments

    teacher, data, args = _parse("teacher", (TeacherArguments, DataArguments, DistillationArguments), argv)
    _, metrics = run_teacher(teacher, data, args)
    _write(json.dumps(metrics, indent=2))


def _distill(argv: list[str]) -> None:
    from .stages import DataArguments, StudentArguments, run_distill
    from ..method.arguments import DistillationArguments

    student, data, args = _parse("distill", (StudentArguments, DataArguments, DistillationArguments), argv)
    _, metrics = run_distill(student, data, args)
    _write(json.dumps(metrics, indent=2))


def _prune(argv: list[str]) -> None:
    from .stages import DataArguments, PruneArguments, run_prune
    from ..method.arguments import PruningArguments

    prune, data, args = _parse("prune", (PruneArguments, DataArguments, PruningArguments), argv)
    gated, metrics = run_prune(prune, data, args)
    sparsity = {k: round(float(v.detach()), 4) for k, v in gated.l0.expected_sparsity().items()}
    _write(json.dumps({"expected_sparsity": sparsity, "eval": metrics}, indent=2))


def _export(argv: list[str]) -> None:
    from .export import ExportArguments, run_export

    (args,) = _parse("export", (ExportArguments,), argv)
    report = run_export(args)
    _write(json.dumps({k: report[k] for k in ("params", "reference_params", "sparsity")}, indent=2))


def _evaluate(argv: list[str]) -> None:
    from dataclasses import dataclass, field

    from .stages import DataArguments, evaluate_model, load_processor, load_task_model

    @dataclass
    class EvaluateArguments:
        model: str = field(default="", metadata={"help": "Checkpoint dir to evaluate."})

    model_args, data = _parse("evaluate", (EvaluateArguments, DataArguments), argv)
    processor = load_processor(data, model_args.model)
    model = load_task_model(model_args.model, data.task).eval()
    _write(json.dumps(evaluate_model(model, processor, data), indent=2))


def _bench(argv: list[str]) -> None:
    from .bench import BenchArguments, format_table, run_benchmark, write_json

    (args,) = _parse("bench", (BenchArguments,), argv)
    result = run_benchmark(args, progress=lambda name: logging.getLogger(__name__).info("benchmarking %s", name))
    _write(format_table(result))
    if args.json:
        write_json(result, args.json)


def _push(argv: list[str]) -> None:
    from .push import PushArguments, push_folder

    (args,) = _parse("push", (PushArguments,), argv)
    _write(push_folder(args))


def _demo(argv: list[str]) -> None:
    from .demo import DemoArguments, run_demo

    (args,) = _parse("demo", (DemoArguments,), argv)
    run_demo(args, write=_write)


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
        output_json: str = field(default="tuxpaint.json", metadata={"help": "Where to write the ALBEF JSON."})
        stamps_dir: str = field(default="/usr/share/tuxpaint/stamps", metadata={"help": "The stamps folder."})

    (args,) = _parse("build-tuxpaint", (TuxpaintArguments,), argv)
    build_tuxpaint_json(stamps_dir=args.stamps_dir, output_json=args.output_json)
    _write(f"wrote {args.output_json}")


def _analyze(argv: list[str]) -> None:
    from .analysis import AnalyzeArguments, run_analysis
    from .stages import DataArguments

    args, data = _parse("analyze-modules", (AnalyzeArguments, DataArguments), argv)
    run_analysis(args, data, write=_write)


def _compare(argv: list[str]) -> None:
    from .compare import CompareArguments, run_compare
    from .stages import DataArguments, PruneArguments
    from ..method.arguments import PruningArguments

    compare, prune, data, args = _parse(
        "compare-splits", (CompareArguments, PruneArguments, DataArguments, PruningArguments), argv
    )
    run_compare(compare, prune, data, args, write=_write)


COMMANDS: dict[str, Callable[[list[str]], None]] = {
    "teacher": _teacher,
    "distill": _distill,
    "prune": _prune,
    "export": _export,
    "evaluate": _evaluate,
    "bench": _bench,
    "push": _push,
    "demo": _demo,
    "demo-teacher": _demo_teacher,
    "convert-xvlm": _convert,
    "build-tuxpaint": _tuxpaint,
    "analyze-modules": _analyze,
    "compare-splits": _compare,
}


def usage() -> str:
    lines = ["usage: efficientvlm <command> [options | config.json | config.yaml]", "", "commands:"]
    lines += [f"  {name:<17}{DESCRIPTIONS[name]}" for name in COMMANDS]
    lines += ["", "`efficientvlm <command> --help` explains each option."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `efficientvlm` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
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
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as error:
        sys.stderr.write(f"efficientvlm {command}: error: {error}\n")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
