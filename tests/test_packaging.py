"""The distribution as a user installs it: a wheel (not `-e`) in a fresh venv, run from outside the source tree.

The repository keeps `training/` and `model_cards/` at its root; the wheel installs them as `efficientvlm.training`
and `efficientvlm.model_cards` (pyproject's package-dir mapping), so no top-level `training` package is installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "modeling_efficientvlm", "training", "model_cards")


def _setuptools_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_of_the_tree_is_listed_under_its_installed_name():
    config = _setuptools_config()
    installed_as = {source: name for name, source in config["package-dir"].items()}
    expected = set()
    for top, name in installed_as.items():
        for init in (ROOT / top).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / top).parts
            if "__pycache__" not in parts:
                expected.add(".".join((name, *parts)))
    assert set(config["packages"]) == expected
    assert not any(name == "training" or name.startswith("training.") for name in config["packages"])


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the sources (the checkout stays free of build/ and egg-info)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    for name in SOURCES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, src / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copyfile(source, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(root / "dist"), str(src)], check=True, capture_output=True, text=True)
    (path,) = (root / "dist").glob("efficientvlm-*.whl")
    return path


@pytest.mark.slow
def test_wheel_ships_templates_assets_and_metric_under_the_distribution_name(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"efficientvlm", "modeling_efficientvlm"}
    for required in (
        "efficientvlm/model_cards/efficientvlm_template.md",
        "efficientvlm/training/metrics/retrieval/retrieval.py",
        "efficientvlm/training/assets/demo_teacher/model.safetensors",
        "efficientvlm/training/assets/demo_teacher/modeling_efficientvlm.py",  # the link, shipped as a file
        *(f"efficientvlm/training/assets/{task}_teacher/{name}" for task in ("captioning", "nlvr2", "vqa")
          for name in ("model.safetensors", "provenance.json")),  # `demo --task T` starts from them
        "efficientvlm/training/commands/cli.py",
    ):
        assert required in names, required
    entry_points = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert "efficientvlm = efficientvlm.training.commands.cli:main" in entry_points


@pytest.mark.slow
def test_wheel_install_runs_the_chain_from_outside_the_source_tree(wheel, tmp_path):
    """Fresh venv (dependencies from the system site, the package only from the wheel), then teacher → distill →
    prune → export → evaluate from a working directory that is not the checkout."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True, text=True)
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"))

    def run(*args: str) -> str:
        result = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{args}\nSTDOUT:\n{result.stdout[-3000:]}\nSTDERR:\n{result.stderr[-3000:]}"
        return result.stdout

    where = json.loads(run(python, "-c", (
        "import importlib.util, json, efficientvlm.training, modeling_efficientvlm; "
        "print(json.dumps([efficientvlm.training.__file__, modeling_efficientvlm.__file__, "
        "importlib.util.find_spec('training') is None]))")))
    venv_root = str(venv.resolve())
    assert all(str(Path(p).resolve()).startswith(venv_root) for p in where[:2]), where
    assert where[2], "`import training` must not resolve to this project"

    # the console script once (the entry point the wheel installs), then the rest of the chain in ONE interpreter
    # through the same `main` (each fresh interpreter pays ~8 s of imports)
    cli = str(venv / "bin" / "efficientvlm")
    common = ["--image_size", "32", "--eval_images", "8", "--itm_k", "2", "--per_device_train_batch_size", "4",
              "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true", "--max_steps", "2"]
    run(cli, "teacher", "--preset", "tiny", "--output_dir", "teacher", *common)
    chain = [
        ["distill", "--teacher", "teacher", "--output_dir", "student", *common],
        ["prune", "--student", "student", "--teacher", "teacher", "--output_dir", "pruned", "--target_sparsity", "0.3",
         *common],
        ["export", "--model", "pruned", "--output_dir", "export", "--reference", "teacher"],
        ["evaluate", "--model", "export", "--image_size", "32", "--eval_images", "8", "--itm_k", "2"],
    ]
    out = run(python, "-c", (
        "import json, sys; from efficientvlm.training.commands.cli import main; "
        f"codes = [main(argv) for argv in {chain!r}]; print('CODES', json.dumps(codes))"))
    assert "CODES [0, 0, 0, 0]" in out, out[-2000:]
    card = (work / "export" / "README.md").read_text()
    assert "{{" not in card and "EfficientVLM" in card  # the template shipped in the wheel was rendered
    lines = out.splitlines()  # evaluate printed its metrics last, as indented JSON
    start = len(lines) - 1 - lines[::-1].index("{")
    metrics = json.loads("\n".join(lines[start : lines.index("}", start) + 1]))
    assert 0 <= metrics["r_mean"] <= 100
