"""`push` without a reachable Hub prints one line and exits with 2 (issue #34 item 6): the README's promise of
one-line errors holds for network, offline-mode and authentication failures."""

import socket

import pytest
import torch

from modeling_efficientvlm import EfficientVLMForImageTextRetrieval
from efficientvlm.training.commands.cli import main
from efficientvlm.training.infra.presets import tiny_bench_config


@pytest.fixture
def folder(tmp_path):
    torch.manual_seed(0)
    EfficientVLMForImageTextRetrieval(tiny_bench_config()).save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def _closed_port() -> int:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_unreachable_endpoint_is_one_line_exit_2(folder, capsys, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    code = main(["push", "--model", str(folder), "--repo_id", "u/m", "--token", "x", "--endpoint", endpoint])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("efficientvlm push: error: cannot push"), err
    assert endpoint in lines[0] and "u/m" in lines[0] and "Traceback" not in err


def test_endpoint_from_the_environment_and_hub_refusals_are_one_line(folder, capsys, monkeypatch, local_hub):
    code = main(["push", "--model", str(folder), "--repo_id", "not a valid repo/x y", "--token", "x"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    code = main(["push", "--model", str(folder), "--repo_id", "u/m", "--token", "x"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot push" in err and "Traceback" not in err, err
