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
    "teacher": "Pre-train / fine-tune a teacher with ITC + ITM (hard negatives) + MLM.",
    "distill": "General distillation into a half-depth student (VLP losses + attention/hidden/logit KD).",
    "prune": "Retrieval fine-tuning with task KD and modal-adaptive L0 pruning to a target sparsity.",
    "export": "Materialize a pruned checkpoint into a smaller dense model; write a Hub-ready folder + model card.",
    "evaluate": "Retrieval R@1/5/10 (TR/IR) and r_mean, or NLVR2 accuracy, on built-in synthetic or JSON data.",
    "bench": "Parameters, FLOPs and latency of teacher vs student vs pruned student (stated protocol).",
    "push": "Upload a Hub-ready folder to a Hugging Face Hub repo.",
    "demo": "Run the whole chain on built-in synthetic data and write report.json + Hub-ready folders.",
    "convert-xvlm": "Convert an X-VLM / EfficientVLM .pth checkpoint into a Hub-ready folder.",
    "build-tuxpaint": "Build an ALBEF-format JSON from the Debian tuxpaint-stamps-default package.",
    "analyze-modules": "Module sensitivity: prune one encoder at increasing ratios (no retraining), table + plot.",
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
    from .trainer import DistillationArguments

    teacher, data, args = _parse("teacher", (TeacherArguments, DataArguments, DistillationArguments), argv)
    _, metrics = run_teacher(teacher, data, args)
    _write(json.dumps(metrics, indent=2))


def _distill(argv: list[str]) -> None:
    from .stages import DataArguments, StudentArguments, run_distill
    from .trainer import DistillationArguments

    student, data, args = _parse("distill", (StudentArguments, DataArguments, DistillationArguments), argv)
    _, metrics = run_distill(student, data, args)
    _write(json.dumps(metrics, indent=2))


def _prune(argv: list[str]) -> None:
    from .stages import DataArguments, PruneArguments, run_prune
    from .trainer import PruningArguments

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

    from .stages import DataArguments, evaluate_model, load_processor

    @dataclass
    class EvaluateArguments:
        model: str = field(default="", metadata={"help": "Checkpoint dir to evaluate."})
        task: str = field(default="retrieval", metadata={"help": "'retrieval' (R@K, r_mean) or 'nlvr2' (accuracy)."})
        nlvr2_json: str | None = field(default=None, metadata={"help": "X-VLM NLVR2 JSON (default: synthetic pairs)."})

        def __post_init__(self):
            if self.task not in ("retrieval", "nlvr2"):
                raise ValueError(f"--task must be 'retrieval' or 'nlvr2', got {self.task!r}")

    model_args, data = _parse("evaluate", (EvaluateArguments, DataArguments), argv)
    processor = load_processor(data, model_args.model)
    if model_args.task == "retrieval":
        from modeling_efficientvlm import EfficientVLMForImageTextRetrieval

        model = EfficientVLMForImageTextRetrieval.from_pretrained(model_args.model).eval()
        _write(json.dumps(evaluate_model(model, processor, data), indent=2))
        return
    from modeling_efficientvlm import EfficientVLMForVisualReasoning

    from .evaluation import evaluate_nlvr2

    model = EfficientVLMForVisualReasoning.from_pretrained(model_args.model).eval()
    if model_args.nlvr2_json:
        from .datasets_io import load_nlvr2_json

        items = list(load_nlvr2_json(model_args.nlvr2_json, data.image_root))
    else:
        from .data import make_nlvr2_eval_set

        items = make_nlvr2_eval_set(data.eval_images, seed=data.eval_seed, image_size=data.image_size)
    _write(json.dumps(evaluate_nlvr2(model, items, processor), indent=2))


def _bench(argv: list[str]) -> None:
    from .benchmark import BenchArguments, format_table, run_benchmark, write_json

    (args,) = _parse("bench", (BenchArguments,), argv)
    result = run_benchmark(args, progress=lambda name: logging.getLogger(__name__).info("benchmarking %s", name))
    _write(format_table(result))
    if args.json:
        write_json(result, args.json)


def _push(argv: list[str]) -> None:
    from .export import PushArguments, push_folder

    (args,) = _parse("push", (PushArguments,), argv)
    _write(push_folder(args))


def _demo(argv: list[str]) -> None:
    from .demo import DemoArguments, run_demo

    (args,) = _parse("demo", (DemoArguments,), argv)
    run_demo(args, write=_write)


def _convert(argv: list[str]) -> None:
    from .convert import ConvertXVLMArguments, run_convert_xvlm

    (args,) = _parse("convert-xvlm", (ConvertXVLMArguments,), argv)
    run_convert_xvlm(args)
    _write(f"wrote {args.output_dir}")


def _tuxpaint(argv: list[str]) -> None:
    from dataclasses import dataclass, field

    from .datasets_io import build_tuxpaint_json

    @dataclass
    class TuxpaintArguments:
        output_json: str = field(default="tuxpaint.json", metadata={"help": "Where to write the ALBEF JSON."})
        stamps_dir: str = field(default="/usr/share/tuxpaint/stamps", metadata={"help": "The stamps folder."})

    (args,) = _parse("build-tuxpaint", (TuxpaintArguments,), argv)
    build_tuxpaint_json(stamps_dir=args.stamps_dir, output_json=args.output_json)
    _write(f"wrote {args.output_json}")


def _analyze(argv: list[str]) -> None:
    import os

    from safetensors.torch import load_file

    from .analysis import AnalyzeArguments, analyze_modules, unit_importance, write_analysis
    from .evaluation import evaluate_nlvr2
    from .l0 import ModalL0Module
    from .stages import DataArguments, eval_set, evaluate_model, load_processor
    from .trainer import GATES_FILE

    args, data = _parse("analyze-modules", (AnalyzeArguments, DataArguments), argv)
    ratios = args.parsed_ratios()
    processor = load_processor(data, args.model)
    if args.task == "nlvr2":
        from modeling_efficientvlm import EfficientVLMForVisualReasoning

        from .data import make_nlvr2_eval_set

        model = EfficientVLMForVisualReasoning.from_pretrained(args.model).eval()
        items = make_nlvr2_eval_set(data.eval_images, seed=data.eval_seed, image_size=data.image_size)
        metric = "accuracy"

        def evaluate(masks):
            return evaluate_nlvr2(model, items, processor, show_progress=False, pruning_masks=masks)["accuracy"]
    elif args.task == "retrieval":
        from modeling_efficientvlm import EfficientVLMForImageTextRetrieval

        model = EfficientVLMForImageTextRetrieval.from_pretrained(args.model).eval()
        held_out = eval_set(data)
        metric = "r_mean"

        def evaluate(masks):
            return evaluate_model(model, processor, data, held_out, show_progress=False, pruning_masks=masks)["r_mean"]
    else:
        raise ValueError(f"--task must be 'retrieval' or 'nlvr2', got {args.task!r}")
    l0 = None
    if os.path.isfile(os.path.join(args.model, GATES_FILE)):
        l0 = ModalL0Module(model.config)
        l0.load_state_dict(load_file(os.path.join(args.model, GATES_FILE)))
    result = analyze_modules(model, evaluate, ratios, unit_importance(model, args.importance, l0))
    result["importance"] = args.importance
    _write(write_analysis(result, args.output_dir, metric))


COMMANDS: dict[str, Callable[[list[str]], None]] = {
    "teacher": _teacher,
    "distill": _distill,
    "prune": _prune,
    "export": _export,
    "evaluate": _evaluate,
    "bench": _bench,
    "push": _push,
    "demo": _demo,
    "convert-xvlm": _convert,
    "build-tuxpaint": _tuxpaint,
    "analyze-modules": _analyze,
}


def usage() -> str:
    lines = ["usage: efficientvlm <command> [options | config.json | config.yaml]", "", "commands:"]
    lines += [f"  {name:<15}{DESCRIPTIONS[name]}" for name in COMMANDS]
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
