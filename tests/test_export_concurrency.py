"""`export --overwrite` against readers and a second writer (issue #34 item 10): a second writer of the same folder is
refused with the stages' lock error; where Linux's renameat2(RENAME_EXCHANGE) works the old and new folders are
swapped in one step, so a reader never finds the folder or its files missing."""

import os
import subprocess
import sys
import threading

import pytest
import torch

from modeling_efficientvlm import EfficientVLMForImageTextRetrieval
from efficientvlm.training.commands.cli import main
from efficientvlm.training.infra import runs
from efficientvlm.training.infra.presets import tiny_bench_config

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture
def model(tmp_path):
    torch.manual_seed(0)
    EfficientVLMForImageTextRetrieval(tiny_bench_config()).save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_a_second_writer_is_refused_naming_the_first(model, tmp_path, capsys):
    out = tmp_path / "export"
    code = ("import sys, time\nfrom efficientvlm.training.infra.runs import folder_writer\n"
            "with folder_writer(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["export", "--model", str(model), "--output_dir", str(out), "--overwrite", "true"]) == 2
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]  # (after the loading progress bar)
        assert last.startswith("efficientvlm export: error: ") and f"{out} is in use by pid {holder.pid}" in last, err
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    assert main(["export", "--model", str(model), "--output_dir", str(out)]) == 0  # the dead holder's lock is stale
    assert sorted(os.listdir(tmp_path)) == ["export", "model"]  # lock beside it released, no temp dirs left


def test_exchange_swaps_two_folders(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x").write_text("a")
    (tmp_path / "b" / "x").write_text("b")
    if not runs.exchange_paths(str(tmp_path / "a"), str(tmp_path / "b")):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here: replace_path uses two renames")
    assert (tmp_path / "a" / "x").read_text() == "b" and (tmp_path / "b" / "x").read_text() == "a"


def test_readers_never_see_the_folder_missing_during_overwrites(model, tmp_path):
    (tmp_path / "probe_a").mkdir()
    (tmp_path / "probe_b").mkdir()
    if not runs.exchange_paths(str(tmp_path / "probe_a"), str(tmp_path / "probe_b")):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here: a reader may see a brief gap (documented)")
    out = tmp_path / "export"
    assert main(["export", "--model", str(model), "--output_dir", str(out)]) == 0
    stop, missing, reads = threading.Event(), [], [0]

    def read():
        while not stop.is_set():
            for name in ("config.json", "model.safetensors", "README.md"):
                try:
                    with open(out / name, "rb") as handle:
                        handle.read(64)
                    reads[0] += 1
                except FileNotFoundError as error:
                    missing.append(str(error))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for _ in range(4):
            assert main(["export", "--model", str(model), "--output_dir", str(out), "--overwrite", "true"]) == 0
    finally:
        stop.set()
        reader.join()
    assert reads[0] > 0 and missing == []
    assert sorted(n for n in os.listdir(tmp_path) if not n.startswith("probe")) == ["export", "model"]
