"""`efficientvlm app` and `efficientvlm push-space`: a Gradio demo page for a model, as a Space-ready folder.

The folder holds `app.py` (the template `training/assets/space/app.py`, copied as it is), `app_config.json` (the model,
the tasks the page offers, the gallery, the card's facts), `requirements.txt`, a README.md with the Space metadata
block, and the gallery's images (plus the index, with `--index`). `app.py` needs only gradio, torch and transformers:
it loads the model's own pipelines (`trust_remote_code=True`), never this package. Gradio is the optional extra `app`,
imported by nobody here: `--serve` runs `app.py` in a fresh interpreter.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parent.parent / "assets" / "space" / "app.py"
APP_CONFIG = "app_config.json"
GALLERY_DIR, INDEX_DIR = "gallery", "index"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
MAX_GALLERY = 2000  # images copied into an app folder (a Space serves them); larger galleries: `efficientvlm index`
INSTALL_HINT = 'pip install ".[app]"  (or: pip install "gradio>=5")'
MODEL_ENV = "EFFICIENTVLM_APP_MODEL"  # app.py loads this model instead of app_config.json's (a local copy of it)
# what the page can offer, in the order of its tabs
TEXT_SEARCH, IMAGE_SEARCH, ZERO_SHOT, CAPTIONING, VQA = "text-to-image", "image-to-image", "zero-shot", "captioning", "vqa"


@dataclass
class AppArguments:
    """Arguments of `efficientvlm app`."""

    model: str = field(metadata={"help": "The model: a Hub-ready folder (export, demo) or a Hub repo id."})
    output_dir: str = field(default="", metadata={"help": "The app folder to write (default with --serve: a "
                                                          "temporary folder)."})
    gallery: str = field(default="", metadata={"help": "A folder of images (searched recursively) the page ranks; "
                                                       "copied into the app and embedded when the app starts."})
    index: str = field(default="", metadata={"help": "An index folder from `efficientvlm index` (built with this "
                                                     "model): copied into the app with its images instead."})
    model_repo: str = field(default="", metadata={"help": "The Hub repo the Space loads the model from (default: "
                                                          "--model when it is not a local folder)."})
    title: str = field(default="", metadata={"help": "The page's title (default: the model's name)."})
    serve: bool = field(default=False, metadata={"help": "Run the app here (needs gradio: the `app` extra)."})
    port: int = field(default=7860, metadata={"help": "Port of --serve."})
    host: str = field(default="127.0.0.1", metadata={"help": "Address --serve listens on."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --output_dir."})

    def __post_init__(self):
        if self.gallery and self.index:
            raise ValueError("pass --gallery or --index, not both (an index brings its own images)")
        if not self.output_dir and not self.serve:
            raise ValueError("--output_dir is required (or --serve, which then runs the app from a temporary folder)")
        for flag, path in (("--gallery", self.gallery), ("--index", self.index)):
            if path and not os.path.isdir(path):
                raise ValueError(f"{flag} {path!r} is not a folder")
        if self.model_repo and self.model_repo.count("/") != 1:
            raise ValueError(f"--model_repo must look like 'user/name', got {self.model_repo!r}")


@dataclass
class SpaceArguments:
    """Arguments of `efficientvlm push-space`."""

    app: str = field(metadata={"help": "An app folder written by `efficientvlm app`."})
    repo_id: str = field(metadata={"help": "The Space repo, e.g. user/efficientvlm-demo."})
    model_repo: str = field(default="", metadata={"help": "The Hub repo of the model the Space loads (needed when the "
                                                          "app was written for a local model folder)."})
    private: bool = field(default=False, metadata={"help": "Create the Space as private."})
    token: str | None = field(default=None, metadata={"help": "Hub token (default: HF_TOKEN / the login cache)."})
    endpoint: str | None = field(default=None, metadata={"help": "Hub URL (default: HF_ENDPOINT or huggingface.co)."})
    commit_message: str = field(default="Upload EfficientVLM demo app", metadata={"help": "Commit message."})

    def __post_init__(self):
        if not os.path.isfile(os.path.join(self.app, APP_CONFIG)):
            raise ValueError(f"--app must be a folder written by `efficientvlm app` (with {APP_CONFIG}), got "
                             f"{self.app!r}")
        if self.repo_id.count("/") != 1:
            raise ValueError(f"--repo_id must look like 'user/name', got {self.repo_id!r}")
        if self.model_repo and self.model_repo.count("/") != 1:
            raise ValueError(f"--model_repo must look like 'user/name', got {self.model_repo!r}")


# --------------------------------------------------------------------------------------------- what the model offers
def model_tasks(config: dict) -> list[str]:
    """The tasks the page offers for a model, from its config: the head it was saved with (`architectures`), the
    Auto classes it loads as (`auto_map`) and the pipelines it ships (`custom_pipelines`).

    A retrieval or pre-training checkpoint: text → image and image → image search, and zero-shot classification when
    it maps the zero-shot Auto class; a captioning or pre-training checkpoint (its MLM head was trained) that maps
    `AutoModelForImageTextToText`: captioning; a VQA checkpoint with its answer list and pipeline: VQA.
    """
    heads = " ".join(config.get("architectures") or [])
    auto_map, pipelines = config.get("auto_map") or {}, config.get("custom_pipelines") or {}
    tasks = []
    if any(h in heads for h in ("ForImageTextRetrieval", "ForPreTraining")) and "image-text-retrieval" in pipelines:
        tasks += [TEXT_SEARCH, IMAGE_SEARCH]
        if "AutoModelForZeroShotImageClassification" in auto_map:
            tasks.append(ZERO_SHOT)
    generates = any(h in heads for h in ("ForConditionalGeneration", "ForPreTraining"))
    if generates and "AutoModelForImageTextToText" in auto_map:
        tasks.append(CAPTIONING)
    if "ForQuestionAnswering" in heads and "visual-question-answering" in pipelines and config.get("answer_list"):
        tasks.append(VQA)
    return tasks


def model_facts(config: dict, structure: dict | None, card: dict | None) -> list[list[str]]:
    """[name, value] rows for the page: the model card's facts (parameters, their share of the reference, sparsity,
    speed-up, layers, evaluation) from structure.json, the card's model-index and the config."""
    structure = structure or {}
    facts = []
    if structure.get("params"):
        facts.append(["parameters", f"{structure['params'] / 1e6:.2f} M"])
        reference = structure.get("reference_params")
        if reference and reference != structure["params"]:
            name = structure.get("reference_name") or "the reference"
            facts.append(["kept share", f"{structure['params'] / reference:.1%} of {name} ({reference / 1e6:.2f} M)"])
    sparsity = structure.get("sparsity") or {}
    if sparsity.get("total"):
        parts = ", ".join(f"{k} {v:.0%}" for k, v in sparsity.items() if k != "total")
        facts.append(["sparsity", f"{sparsity['total']:.1%} ({parts})"])
    if structure.get("speedup"):
        spread = (f" (range {structure['speedup_min']:.2f}–{structure['speedup_max']:.2f}×)"
                  if structure.get("speedup_min") and structure.get("speedup_max") else "")
        baseline = structure.get("speedup_baseline") or "the reference"
        facts.append(["speed-up", f"{structure['speedup']:.2f}×{spread} over {baseline}"])
    layers = [str((config.get(f"{part}_config") or {}).get("num_hidden_layers", "?"))
              for part in ("vision", "text", "fusion_encoder")]
    facts.append(["layers (vision / text / fusion)", " / ".join(layers)])
    for result in (card or {}).get("model-index", [{}])[0].get("results", [])[:1]:
        dataset = (result.get("dataset") or {}).get("name", "")
        for metric in result.get("metrics", [])[:4]:
            facts.append([f"{metric.get('name') or metric.get('type')}" + (f" ({dataset})" if dataset else ""),
                          f"{metric.get('value')}"])
    return facts


def _model_files(model: str) -> tuple[dict, dict | None, dict | None, bool]:
    """(config, structure.json or None, the card's metadata or None, whether `model` is a local folder); a repo id's
    files come from the Hub."""
    from huggingface_hub import hf_hub_download, metadata_load

    local = os.path.isdir(model)
    if not local and model.count("/") != 1:
        raise ValueError(f"--model {model!r} is neither a model folder nor a Hub repo id ('user/name')")

    def path_of(name: str) -> str | None:
        if local:
            return os.path.join(model, name) if os.path.isfile(os.path.join(model, name)) else None
        try:
            return hf_hub_download(model, name)
        except Exception:  # noqa: BLE001 - an optional file; config.json is checked below
            return None

    config_path = path_of("config.json")
    if config_path is None:
        raise ValueError(f"--model {model!r} has no config.json: pass a Hub-ready folder (export, demo) or repo")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    structure_path, card_path = path_of("structure.json"), path_of("README.md")
    structure = json.loads(Path(structure_path).read_text(encoding="utf-8")) if structure_path else None
    card = metadata_load(card_path) if card_path else None
    return config, structure, card, local


# ------------------------------------------------------------------------------------------------------ the folder
def _copy_gallery(source: str, target: Path, references: list[str] | None = None) -> int:
    """Copies a gallery's images (every image below `source`, or the listed references) to `target`."""
    root = Path(source)
    if references is None:
        references = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not references:
        raise ValueError(f"the gallery {source} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    if len(references) > MAX_GALLERY:
        raise ValueError(f"the gallery {source} has {len(references)} images; an app folder takes up to {MAX_GALLERY} "
                         "(build an index with `efficientvlm index` and host the images elsewhere)")
    for reference in references:
        destination = target / reference
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / reference, destination)
    return len(references)


def _copy_index(index: str, target: Path) -> None:
    """Copies an index folder to target/index and the images it references to target/gallery."""
    manifest = json.loads((Path(index) / "index.json").read_text(encoding="utf-8"))
    source = manifest.get("source") or {}
    if source.get("kind") not in ("folder", "json"):
        raise ValueError(f"the index {index} was built from a {source.get('kind')!r} source; the app shows images "
                         "from a folder or an ALBEF JSON's files")
    references = json.loads((Path(index) / "references.json").read_text(encoding="utf-8"))
    shutil.copytree(index, target / INDEX_DIR, ignore=shutil.ignore_patterns("build.json", "done.json", ".*"))
    _copy_gallery(source["root"], target / GALLERY_DIR, [str(r) for r in references])


def _check_index_model(index: str, model: str) -> None:
    """Refuses an index that another model built (the app would stop at its start)."""
    from modeling_efficientvlm.index_efficientvlm import GalleryIndex

    from .index import load_model_and_processor

    GalleryIndex.load(index).check_model(load_model_and_processor(model)[0])


def space_readme(config: dict, gradio_version: str | None) -> str:
    """The Space's README: its metadata block (sdk gradio, app_file, the model repo) and how to run it."""
    lines = ["---", f"title: {json.dumps(config['title'])}", "emoji: 🔎", "colorFrom: blue", "colorTo: green",
             "sdk: gradio"]
    if gradio_version:
        lines.append(f"sdk_version: {gradio_version}")
    lines += ["app_file: app.py", "pinned: false"]
    if config.get("on_hub"):
        lines += ["models:", f"- {config['model']}"]
    lines += ["tags:", "- efficientvlm", "---", "", f"# {config['title']}", "",
              f"A demo of `{config['model']}`: {', '.join(config['tasks'])}. Written by `efficientvlm app`.", "",
              "Run it locally: `pip install gradio -r requirements.txt && python app.py`.", ""]
    return "\n".join(lines)


REQUIREMENTS = """\
# gradio comes with the Space (README: sdk / sdk_version); locally: pip install "gradio>=5"
torch
transformers>=5,<6
pillow
numpy
"""


def write_app(args: AppArguments, output_dir: str) -> dict:
    """Writes the app folder (atomically: a failed write leaves no half folder); returns its app_config."""
    from ..infra.runs import atomic_directory, check_output_dir

    model_config, structure, card, local = _model_files(args.model)
    tasks = model_tasks(model_config)
    if not tasks:
        raise ValueError(f"{args.model} ({', '.join(model_config.get('architectures') or ['no architectures'])}) "
                         "offers none of the page's tasks (retrieval, zero-shot, captioning, VQA)")
    searches = {TEXT_SEARCH, IMAGE_SEARCH} & set(tasks)
    if searches and not (args.gallery or args.index):
        tasks = [t for t in tasks if t not in searches]  # nothing to search: the search tabs are left out
    if args.index and local:
        _check_index_model(args.index, args.model)
    check_output_dir(output_dir, "app", {"--model": args.model if local else None, "--gallery": args.gallery,
                                         "--index": args.index}, overwrite=True)
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not args.overwrite:
        raise FileExistsError(f"app: {output_dir} exists and is not empty; pass --overwrite true to replace it, or "
                              "pick another --output_dir")
    repo = args.model_repo or ("" if local else args.model)
    name = (card or {}).get("model-index", [{}])[0].get("name") or Path(args.model.rstrip("/")).name
    config = {"model": repo or os.path.abspath(args.model), "on_hub": bool(repo), "title": args.title or name,
              "description": "An [EfficientVLM](https://arxiv.org/abs/2210.07795) checkpoint: an X-VLM-style "
                             "vision-language model (ViT image encoder, BERT text and fusion encoders).",
              "tasks": tasks, "gallery": GALLERY_DIR if args.gallery or args.index else None,
              "index": INDEX_DIR if args.index else None, "top_k": 6, "rerank_k": 8,
              "facts": model_facts(model_config, structure, card)}
    with atomic_directory(output_dir) as tmp:
        folder = Path(tmp)
        shutil.copyfile(TEMPLATE, folder / "app.py")
        if args.index:
            _copy_index(args.index, folder)
        elif args.gallery:
            _copy_gallery(args.gallery, folder / GALLERY_DIR)
        (folder / APP_CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (folder / "requirements.txt").write_text(REQUIREMENTS, encoding="utf-8")
        (folder / "README.md").write_text(space_readme(config, _gradio_version()), encoding="utf-8")
    return config


def _gradio_version() -> str | None:
    """The installed gradio's version (without importing it), for the Space's sdk_version."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gradio")
    except PackageNotFoundError:
        return None


def serve_app(folder: str, port: int, host: str = "127.0.0.1", model: str | None = None) -> int:
    """Runs the folder's app.py in a fresh interpreter (as a Space does) until it stops; returns its exit status."""
    if importlib.util.find_spec("gradio") is None:
        raise ValueError(f"--serve needs gradio, which is not installed: {INSTALL_HINT}")
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_SERVER_NAME": host,
           "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_TELEMETRY": "1"}
    if model:
        env[MODEL_ENV] = os.path.abspath(model)
    process = subprocess.Popen([sys.executable, "app.py"], cwd=folder, env=env)
    try:
        return process.wait()
    finally:  # Ctrl-C or an error here: the app stops too
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


def run_app(args: AppArguments, write=print) -> None:
    """`efficientvlm app`: writes the folder; with --serve, runs it (from a temporary folder without --output_dir)."""
    if args.serve and importlib.util.find_spec("gradio") is None:
        raise ValueError(f"--serve needs gradio, which is not installed: {INSTALL_HINT}")
    scratch = tempfile.mkdtemp(prefix="efficientvlm-app-") if not args.output_dir else None
    output_dir = args.output_dir or os.path.join(scratch, "app")
    try:
        config = write_app(args, output_dir)
        write(f"wrote {output_dir} ({', '.join(config['tasks'])})")
        if args.serve:
            write(f"serving on http://{args.host}:{args.port} (Ctrl-C stops it)")
            status = serve_app(output_dir, args.port, args.host, args.model if os.path.isdir(args.model) else None)
            if status not in (0, -2, 130):
                raise ValueError(f"the app stopped with exit status {status} (its log is above)")
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------- the Space
def _space_operations(args: SpaceArguments) -> list:
    """The app folder's files as one commit; app_config.json and the README name --model_repo when given."""
    from huggingface_hub import CommitOperationAdd

    folder = Path(args.app)
    config = json.loads((folder / APP_CONFIG).read_text(encoding="utf-8"))
    if args.model_repo:
        config.update(model=args.model_repo, on_hub=True)
    if not config.get("on_hub"):
        raise ValueError(f"{args.app} loads the local model {config['model']}, which a Space cannot reach: pass "
                         "--model_repo user/name (push the model first: `efficientvlm push`)")
    readme = space_readme(config, _gradio_version()) if args.model_repo else None
    operations = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        in_repo = path.relative_to(folder).as_posix()
        if any(part.startswith(".") for part in in_repo.split("/")):
            continue
        content: str | bytes | Path = path
        if in_repo == APP_CONFIG:
            content = (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
        elif in_repo == "README.md" and readme:
            content = readme.encode("utf-8")
        operations.append(CommitOperationAdd(path_in_repo=in_repo, path_or_fileobj=content))
    return operations


def push_space(args: SpaceArguments) -> str:
    """Creates the Space (sdk gradio) if needed and uploads the app folder in one commit; returns the commit URL.

    Raises:
        HubError: the Hub is unreachable or refused the request (one line naming the endpoint and the cause).
    """
    from .push import upload

    return upload(_space_operations(args), what=f"{args.app} to the Space {args.repo_id}", repo_id=args.repo_id,
                  endpoint=args.endpoint, token=args.token, private=args.private,
                  commit_message=args.commit_message, repo_type="space", space_sdk="gradio")
