"""The CLI names the cause of environment errors in one line (exit 2), keeps tracebacks behind --debug, and groups
`--help` by dataclass (#20.8, #21.3)."""

from __future__ import annotations

import errno
import json

import pytest
from torch import nn

from efficientvlm.training.commands import cli
from efficientvlm.training.commands.cli import COMMANDS, main
from modeling_efficientvlm import EfficientVLMForImageTextRetrieval
from tests.conftest import tiny_config


def _run(monkeypatch, capsys, action, *flags: str) -> tuple[int, str]:
    """Runs `efficientvlm [flags] export` with the command replaced by `action`; (exit status, stderr)."""
    monkeypatch.setitem(COMMANDS, "export", lambda argv: action())
    code = main([*flags, "export"])
    return code, capsys.readouterr().err


def _one_line(err: str) -> str:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("efficientvlm export:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A checkpoint whose config disagrees with its weights, one with a truncated safetensors file, one without."""
    root = tmp_path_factory.mktemp("ckpt")
    model = EfficientVLMForImageTextRetrieval(tiny_config())
    for name in ("mismatch", "corrupt"):
        model.save_pretrained(root / name)
    config = json.loads((root / "mismatch" / "config.json").read_text())
    config["vision_config"]["intermediate_size"] = [41, 41]  # the weights are 37 wide
    (root / "mismatch" / "config.json").write_text(json.dumps(config))
    weights = root / "corrupt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    model.config.save_pretrained(root / "noweights")
    return root


def _raise(error: BaseException):
    def action():
        raise error
    return action


def test_disk_full_errno_names_the_path(monkeypatch, capsys):
    code, err = _run(monkeypatch, capsys, _raise(OSError(errno.ENOSPC, "No space left on device", "/out/x.bin")))
    assert code == 2
    assert _one_line(err).endswith("error: disk full while writing /out/x.bin")


@pytest.mark.parametrize("text", ["basic_ios::clear: iostream error",
                                  "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598",
                                  "Error while serializing: IoError(Os { code: 28, kind: StorageFull })"])
def test_disk_full_as_torch_and_safetensors_word_it(monkeypatch, capsys, text):
    def save(obj, f):  # the writer's frame holds the path, as torch.save's and safetensors' save_file's do
        raise RuntimeError(text)

    code, err = _run(monkeypatch, capsys, lambda: save({}, "/out/pytorch_model.bin"))
    assert code == 2
    assert "error: disk full while writing /out/pytorch_model.bin (" in _one_line(err)


def test_missing_and_forbidden_files_are_named(monkeypatch, capsys, tmp_path, checkpoints):
    missing = tmp_path / "nope" / "data.json"
    code, err = _run(monkeypatch, capsys, lambda: open(missing))
    assert code == 2 and _one_line(err).endswith(f"error: file not found: {missing}")

    code, err = _run(monkeypatch, capsys, _raise(PermissionError(errno.EACCES, "Permission denied", "/root/x")))
    assert code == 2 and _one_line(err).endswith("error: permission denied: /root/x")

    code, err = _run(monkeypatch, capsys,
                     lambda: EfficientVLMForImageTextRetrieval.from_pretrained(checkpoints / "noweights"))
    line = _one_line(err)
    assert code == 2 and "error: missing file: " in line and "model.safetensors" in line
    assert str(checkpoints / "noweights") in line


def test_size_mismatch_names_the_tensor(monkeypatch, capsys, checkpoints):
    code, err = _run(monkeypatch, capsys,
                     lambda: EfficientVLMForImageTextRetrieval.from_pretrained(checkpoints / "mismatch"))
    line = _one_line(err)
    assert code == 2
    assert "size mismatch for vision_model.layers.0.mlp.fc1.bias: checkpoint (37,) vs (41,)" in line
    assert str(checkpoints / "mismatch") in line

    code, err = _run(monkeypatch, capsys, lambda: nn.Linear(2, 3).load_state_dict(nn.Linear(2, 4).state_dict()))
    line = _one_line(err)
    assert code == 2 and "size mismatch for weight: copying a param with shape torch.Size([4, 2])" in line
    assert "(and 1 more tensors)" in line  # the bias


def test_corrupt_safetensors_names_the_file(monkeypatch, capsys, checkpoints):
    code, err = _run(monkeypatch, capsys,
                     lambda: EfficientVLMForImageTextRetrieval.from_pretrained(checkpoints / "corrupt"))
    assert code == 2
    assert f"corrupt or unreadable safetensors file {checkpoints / 'corrupt' / 'model.safetensors'}: " in _one_line(err)


def test_interrupt_exits_130(monkeypatch, capsys):
    code, err = _run(monkeypatch, capsys, _raise(KeyboardInterrupt()))
    assert code == 130 and _one_line(err) == "efficientvlm export: interrupted"


def test_debug_flag_and_env_show_the_traceback(monkeypatch, capsys):
    error = OSError(errno.ENOSPC, "No space left on device", "/out/x.bin")
    code, err = _run(monkeypatch, capsys, _raise(error), "--debug")
    assert code == 2 and "Traceback (most recent call last)" in err and "disk full while writing /out/x.bin" in err
    monkeypatch.setenv("EFFICIENTVLM_DEBUG", "1")
    code, err = _run(monkeypatch, capsys, _raise(error))
    assert code == 2 and "Traceback (most recent call last)" in err


def test_a_bug_keeps_its_traceback(monkeypatch, capsys):
    with pytest.raises(ZeroDivisionError):
        _run(monkeypatch, capsys, lambda: 1 / 0)


def test_prune_help_groups_options_by_dataclass(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["prune", "--help"])
    assert exit_info.value.code == 0
    lines = capsys.readouterr().out.splitlines()

    def line_of(text: str) -> int:
        return next(i for i, line in enumerate(lines) if line.strip().startswith(text))

    assert line_of("--target_sparsity") < 40 and line_of("--student") < line_of("--target_sparsity")
    # command, then the method's own fields (pruning before the distillation weights), then data, then the Trainer
    assert line_of("--student") < line_of("--target_sparsity") < line_of("--alpha_attn") < line_of("--dataset") \
        < line_of("Trainer options (transformers.TrainingArguments):") < line_of("--learning_rate")
    assert line_of("Distillation arguments plus modal-adaptive pruning") < line_of("--target_sparsity")
    assert not any("--target-sparsity" in line for line in lines)  # each option listed once


def test_grouped_parser_parses_like_hf_argument_parser(tmp_path):
    from efficientvlm.training.commands.stages import DataArguments, PruneModelsArguments
    from efficientvlm.training.method.arguments import PruningArguments

    prune, args, data = cli._parse("prune", (PruneModelsArguments, PruningArguments, DataArguments), [
        "--student", str(tmp_path), "--teacher", str(tmp_path), "--output_dir", str(tmp_path / "o"),
        "--target-sparsity", "0.5", "--learning_rate", "0.001", "--image_size", "32", "--no_kd",
    ])
    assert (prune.kd, args.target_sparsity, args.learning_rate, data.image_size) == (False, 0.5, 0.001, 32)


def test_json_without_image_root_reads_paths_from_the_working_directory(tmp_path, monkeypatch):
    """No --image_root: relative image paths resolve from the working directory (was a TypeError on None)."""
    from PIL import Image

    from efficientvlm.training.data.files import load_albef_json

    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "img" / "a.png")
    (tmp_path / "train.json").write_text(json.dumps([{"image": "img/a.png", "caption": ["a red square"]}]))
    monkeypatch.chdir(tmp_path)
    dataset = load_albef_json("train.json", image_root=None)
    assert len(dataset) == 1


# ------------------------------------------------------------------------------------------- one vocabulary for flags
# (command, module, argument dataclass, canonical field, old spelling): the old spellings parse for one release and are
# not shown in --help
RENAMED = [
    ("demo", "demo", "DemoArguments", "output_dir", "--output"),
    ("export", "export", "ExportArguments", "model", "--checkpoint"),
    ("push", "push", "PushArguments", "model", "--folder"),
    ("convert-xvlm", "convert", "ConvertXVLMArguments", "model", "--input"),
    ("bench", "bench", "BenchArguments", "output_json", "--json"),
    ("latency-table", "latency_table", "LatencyTableArguments", "output_json", "--output"),
]


@pytest.mark.parametrize("command, module, name, field, old", RENAMED)
def test_old_flag_spellings_are_hidden_aliases(command, module, name, field, old, tmp_path, capsys):
    import importlib

    dataclass_type = getattr(importlib.import_module(f"efficientvlm.training.commands.{module}"), name)
    parser = cli.GroupedArgumentParser((dataclass_type,), prog=command)
    value = str(tmp_path / "model")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")  # push checks for a Hub-ready folder
    required = {"demo": [], "push": ["--repo_id", "user/name"], "bench": [],
                "latency-table": ["--student", value]}.get(command, ["--output_dir", str(tmp_path / "out")])
    (new,) = parser.parse_args_into_dataclasses([f"--{field}", value, *required])
    (aliased,) = parser.parse_args_into_dataclasses([old, value, *required])
    assert getattr(new, field) == getattr(aliased, field) == value
    help_text = parser.format_help()
    assert f"--{field}" in help_text and f"{old} " not in help_text and f"{old}\n" not in help_text


def test_task_help_is_generated_from_the_registry(capsys):
    from efficientvlm.training.tasks import TASKS

    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert all(name in out for name in TASKS)  # the description lists every registered task
    for task in TASKS.values():  # every official default is listed under its task
        if "lambda_vlp" in task.prune_defaults:
            assert f"{task.name} {task.prune_defaults['lambda_vlp']}" in out
    assert "retrieval or NLVR2" not in out


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_prints_its_help(command, capsys):
    """`--help` formats every option's text (a bare '%' in a help string breaks argparse's formatting)."""
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0 and f"] {command} [options" in capsys.readouterr().out


def test_bench_old_spellings_parse_to_the_new_fields():
    from efficientvlm.training.commands.bench import BenchArguments

    parser = cli.GroupedArgumentParser((BenchArguments,), prog="bench")
    (old,) = parser.parse_args_into_dataclasses(["--num_images", "2", "--num_texts", "2", "--k", "1"])
    (new,) = parser.parse_args_into_dataclasses(["--eval_images", "2", "--num_texts", "2", "--itm_k", "1"])
    assert (old.eval_images, old.itm_k) == (new.eval_images, new.itm_k) == (2, 1)
