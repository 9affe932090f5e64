"""A run owns its output folder (lock, stale-lock takeover), its final save is all-or-nothing, `export` only reads
finished runs and replaces folders atomically with the usual permissions (issue #20 items 1, 2, 3, 11)."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from modeling_efficientvlm import EfficientVLMForImageTextRetrieval
from efficientvlm.training.infra import runs as atomic
from efficientvlm.training.infra.runs import LOCK_FILE, RUN_FILE, OutputDirInUseError, owned_output_dir
from efficientvlm.training.commands.cli import main
from efficientvlm.training.commands.export import check_export_source
from efficientvlm.training.infra.presets import tiny_bench_config
from efficientvlm.training.method.l0 import ModalL0Module
from efficientvlm.training.method.trainers import EfficientVLMPruningTrainer
from tests.conftest import save_tiny_teacher_and_student

COMMON = ["--image_size", "32", "--eval_images", "4", "--itm_k", "2", "--per_device_train_batch_size", "2",
          "--report_to", "none", "--use_cpu", "true", "--disable_tqdm", "true"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """An untrained tiny teacher and its half-depth student, saved with the synthetic-vocabulary processor."""
    return save_tiny_teacher_and_student(tmp_path_factory.mktemp("ownership"))


def prune_argv(models, out, *extra) -> list[str]:
    return ["prune", "--student", str(models / "student"), "--teacher", str(models / "teacher"), "--output_dir",
            str(out), "--max_steps", "2", "--save_strategy", "no", *COMMON, *extra]


def run_cli(argv: list[str]) -> int | str:
    """`main`'s exit status, or the name of the error it let through (errors it cannot explain keep their traceback)."""
    try:
        return main(argv)
    except Exception as error:
        return type(error).__name__


def _start_lock_holder(folder) -> subprocess.Popen:
    """A second real process that owns `folder` (as a stage would) and sleeps until killed."""
    code = ("import sys, time\nfrom efficientvlm.training.infra.runs import owned_output_dir\n"
            "with owned_output_dir(sys.argv[1], 'prune', ()):\n    print('locked', flush=True)\n    time.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True, env=ENV)
    assert holder.stdout.readline().strip() == "locked"
    return holder


@pytest.mark.slow
def test_second_run_into_an_owned_output_dir_exits_2_and_a_dead_owner_is_taken_over(models, tmp_path, caplog):
    out = tmp_path / "run"
    holder = _start_lock_holder(out)
    try:
        second = subprocess.run([sys.executable, "-m", "efficientvlm.training.commands.cli", *prune_argv(models, out)],
                                capture_output=True, text=True, env=ENV, timeout=120)
        assert second.returncode == 2, second.stderr[-2000:]
        assert (f"{out} is in use by pid {holder.pid} on host {socket.gethostname()} since "
                in second.stderr and "pick another --output_dir" in second.stderr)
        assert sorted(os.listdir(out)) == sorted([LOCK_FILE, RUN_FILE])  # the second run wrote nothing
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash: no clean-up runs, the kernel drops the flock
        holder.wait()
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == holder.pid
    with pytest.raises(ValueError, match=r"unfinished `efficientvlm prune` run \(status 'running'.*missing config.json"
                                         r".*no complete checkpoint-\* folder"):
        check_export_source(str(out))
    with owned_output_dir(str(out), "prune", ()):
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"taking over the stale lock of pid {holder.pid}" in caplog.text
    assert not (out / LOCK_FILE).exists() and json.loads((out / RUN_FILE).read_text())["status"] == "complete"


def test_a_lock_left_on_another_host_or_by_a_live_pid_is_not_taken_over(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "2024-01-01 00:00:00"}))
    with pytest.raises(OutputDirInUseError, match=r"in use by pid 1 on host elsewhere .*another host.*delete"):
        with owned_output_dir(str(tmp_path), "prune", ()):
            pass
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    with pytest.raises(OutputDirInUseError, match=f"in use by pid {os.getppid()}"):
        with owned_output_dir(str(tmp_path), "prune", ()):
            pass


def test_finished_prune_records_its_files_and_exports(models, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(prune_argv(models, out)) == 0
    record = json.loads((out / RUN_FILE).read_text())
    assert record["stage"] == "prune" and record["status"] == "complete"
    assert {"model.safetensors", "config.json", "l0_gates.safetensors", "processor_config.json",
            "eval_results.json"} <= set(record["files"])
    assert not (out / LOCK_FILE).exists() and not (out / atomic.FINAL_STAGING).exists()
    assert check_export_source(str(out)) is True


def test_interrupted_final_save_leaves_no_half_state_and_export_names_the_checkpoint(models, tmp_path, monkeypatch,
                                                                                      capsys):
    out = tmp_path / "pruned"
    save = ModalL0Module.save

    def fails_in_the_final_save(self, path):  # checkpoints save fine; the final save dies after model.safetensors
        if atomic.FINAL_STAGING in path:
            assert os.path.isfile(os.path.join(os.path.dirname(path), "model.safetensors"))
            raise OSError(28, "No space left on device")
        save(self, path)

    monkeypatch.setattr(ModalL0Module, "save", fails_in_the_final_save)
    assert run_cli(prune_argv(models, out, "--save_strategy", "steps", "--save_steps", "1")) in (2, "OSError")
    monkeypatch.undo()
    assert sorted(os.listdir(out)) == ["checkpoint-1", "checkpoint-2", RUN_FILE]  # no half-written top level
    assert json.loads((out / RUN_FILE).read_text())["status"] == "failed"
    capsys.readouterr()
    assert main(["export", "--model", str(out), "--output_dir", str(tmp_path / "export")]) == 2
    err = capsys.readouterr().err
    assert "unfinished `efficientvlm prune` run (status 'failed': OSError" in err
    for name in ("config.json", "model.safetensors", "processor_config.json", "l0_gates.safetensors"):
        assert name in err
    assert f"--model {out / 'checkpoint-2'}" in err
    assert not (tmp_path / "export").exists()
    assert check_export_source(str(out / "checkpoint-2")) is True  # the hint points at something exportable


def test_export_of_a_folder_holding_only_checkpoints_names_the_last_complete_one(tmp_path, capsys):
    model = EfficientVLMForImageTextRetrieval(tiny_bench_config())
    model.save_pretrained(tmp_path / "run" / "checkpoint-3")
    (tmp_path / "run" / "checkpoint-5").mkdir()  # incomplete (only a config): not offered
    (tmp_path / "run" / "checkpoint-5" / "config.json").write_text("{}")
    assert main(["export", "--model", str(tmp_path / "run"), "--output_dir", str(tmp_path / "export")]) == 2
    err = capsys.readouterr().err
    assert "is not a complete model folder: missing config.json, model.safetensors" in err
    assert f"--model {tmp_path / 'run' / 'checkpoint-3'}" in err


def test_export_overwrite_keeps_the_old_folder_whole_until_the_new_one_is_in(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(atomic, "exchange_paths", lambda first, second: False)  # the two-renames fallback
    EfficientVLMForImageTextRetrieval(tiny_bench_config()).save_pretrained(tmp_path / "model")
    out = tmp_path / "export"
    out.mkdir()
    old = {"README.md": "old card", "model.safetensors": "old weights"}
    for name, text in old.items():
        (out / name).write_text(text)
    seen = []
    replace = os.replace

    def watching_replace(source, target):
        if os.path.abspath(target) == str(out) and os.path.isdir(source):  # the new folder goes in now
            asides = [os.path.join(tmp_path, d, "export") for d in os.listdir(tmp_path) if d.startswith(".old-")]
            seen.append({n: open(os.path.join(a, n)).read() for a in asides for n in os.listdir(a)})
        replace(source, target)

    monkeypatch.setattr(atomic.os, "replace", watching_replace)
    assert main(["export", "--model", str(tmp_path / "model"), "--output_dir", str(out), "--overwrite",
                 "true"]) == 0
    monkeypatch.undo()
    assert seen == [old]  # at the moment the new folder was renamed in, the old one was complete (aside)
    assert (out / "config.json").exists() and "old card" not in (out / "README.md").read_text()
    assert sorted(os.listdir(tmp_path)) == ["export", "model"]  # aside and temp dirs are gone


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_directory_follows_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        with atomic.atomic_directory(str(tmp_path / "out")) as tmp:
            (open(os.path.join(tmp, "a.txt"), "w")).write("x")
    finally:
        os.umask(previous)
    assert os.stat(tmp_path / "out").st_mode & 0o777 == 0o777 & ~umask


def test_failed_stage_leaves_no_empty_output_dir(models, tmp_path, monkeypatch):
    def crash(self, *args, **kwargs):
        raise RuntimeError("out of memory at step 0")

    monkeypatch.setattr(EfficientVLMPruningTrainer, "train", crash)
    assert run_cli(prune_argv(models, tmp_path / "new")) in (2, "RuntimeError")
    assert os.listdir(tmp_path) == []
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    assert run_cli(prune_argv(models, tmp_path / "kept")) in (2, "RuntimeError")
    assert os.listdir(tmp_path / "kept") == ["notes.txt"]  # a folder it did not create is left as it was


def test_a_failed_rerun_that_wrote_nothing_keeps_the_finished_record(tmp_path):
    with owned_output_dir(str(tmp_path), "teacher", ("config.json",)):
        (tmp_path / "config.json").write_text("{}")
    finished = (tmp_path / RUN_FILE).read_text()
    with pytest.raises(KeyError):
        with owned_output_dir(str(tmp_path), "teacher", ("config.json",)):
            raise KeyError("bad option")
    assert (tmp_path / RUN_FILE).read_text() == finished and json.loads(finished)["status"] == "complete"
    with pytest.raises(RuntimeError, match=r"teacher finished but .* lacks model.safetensors"):
        with owned_output_dir(str(tmp_path), "teacher", ("model.safetensors",)):
            (tmp_path / "notes.txt").write_text("written")
    assert json.loads((tmp_path / RUN_FILE).read_text())["status"] == "failed"
