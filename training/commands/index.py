"""`efficientvlm index` and `efficientvlm search`: embed a gallery once, query it many times.

The index format and the search live in the remote code (`modeling_efficientvlm/index_efficientvlm.py`), so a user with
only transformers queries an index through the pipeline (`retrieval(query, gallery=folder)`); this module builds it.

Building streams the gallery in parts of `--chunk_size` images (each part one safetensors file, written atomically),
so memory is bounded by a part and an interrupted build resumes at the first missing part. Several processes
(`accelerate launch`, or RANK / WORLD_SIZE set by hand) each build one contiguous shard; the process that finds every
shard finished writes index.json and references.json, and the shards read back as one index in source order.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

from modeling_efficientvlm.index_efficientvlm import (
    EMBEDDINGS,
    IMAGE_TOKENS,
    INDEX_FILE,
    INDEX_FORMAT,
    INDEX_VERSION,
    REFERENCES_FILE,
    GalleryIndex,
    model_fingerprint,
)
from modeling_efficientvlm.modeling_efficientvlm import EfficientVLMForImageTextRetrieval
from modeling_efficientvlm.processing_efficientvlm import EfficientVLMProcessor, open_image

from ..infra.runs import write_json_atomic

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
BUILD_FILE, DONE_FILE = "build.json", "done.json"


@dataclass
class IndexArguments:
    """Arguments of `efficientvlm index`."""

    model: str = field(metadata={"help": "The model folder (or Hub-ready export) that embeds the gallery."})
    images: str = field(metadata={"help": "The gallery: a folder of images (searched recursively), an ALBEF / X-VLM "
                                          "JSON (with --image_root), or a datasets folder (save_to_disk)."})
    output_dir: str = field(metadata={"help": "The index folder (an unfinished build there is resumed)."})
    image_root: str = field(default="", metadata={"help": "Folder the JSON's image paths are relative to."})
    image_column: str = field(default="", metadata={"help": "A datasets source's image column (default: its first "
                                                            "Image feature, else 'image')."})
    batch_size: int = field(default=64, metadata={"help": "Images per vision-encoder pass."})
    chunk_size: int = field(default=1024, metadata={"help": "Images per part file (the unit of resumption)."})
    store_image_tokens: bool = field(default=False, metadata={"help": "Also store each image's vision tokens, so "
                                     "re-ranking never re-encodes a candidate ((1 + patches) x vision width x 4 bytes "
                                     "per image)."})


@dataclass
class SearchArguments:
    """Arguments of `efficientvlm search`."""

    index: str = field(metadata={"help": "An index folder written by `efficientvlm index`."})
    text: str = field(default="", metadata={"help": "A text query (text → image)."})
    image: str = field(default="", metadata={"help": "An image file as the query (image → image, ITC only)."})
    top_k: int = field(default=10, metadata={"help": "Results to print."})
    rerank_k: int = field(default=0, metadata={"help": "ITC candidates re-scored by the ITM head (text queries)."})
    model: str = field(default="", metadata={"help": "The model (default: the one the index was built with)."})
    batch_size: int = field(default=32, metadata={"help": "Fusion pairs per pass when re-ranking."})


def load_model_and_processor(path: str) -> tuple[EfficientVLMForImageTextRetrieval, EfficientVLMProcessor]:
    """The retrieval model (eval mode) and processor of a model folder, built from this package's classes."""
    model = EfficientVLMForImageTextRetrieval.from_pretrained(path).eval()
    return model, EfficientVLMProcessor.from_pretrained(path)


# ------------------------------------------------------------------------------------------------------- sources
def list_gallery(args: IndexArguments) -> tuple[dict, list]:
    """(source description, references in gallery order): relative paths of a folder's images, the distinct
    "image" fields of a JSON (first occurrence order), or the row numbers of a datasets folder."""
    path = Path(args.images)
    if path.is_file() and path.suffix == ".json":
        from ..data.files import _field, _read_json_list

        records = _read_json_list(str(path))
        references = list(dict.fromkeys(str(_field(r, i, "image", str(path))) for i, r in enumerate(records)))
        root = os.path.abspath(args.image_root or path.parent)
        return {"kind": "json", "root": root, "file": os.path.abspath(path)}, references
    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        import datasets

        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            raise ValueError(f"{path} is a DatasetDict ({sorted(dataset)}): pass one split's folder")
        column = args.image_column or next(
            (name for name, feature in dataset.features.items() if isinstance(feature, datasets.Image)), "image")
        if column not in dataset.column_names:
            raise ValueError(f"{path} has no image column {column!r} (columns: {dataset.column_names})")
        return {"kind": "dataset", "root": os.path.abspath(path), "image_column": column}, list(range(len(dataset)))
    if path.is_dir():
        references = sorted(p.relative_to(path).as_posix() for p in path.rglob("*")
                            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not references:
            raise ValueError(f"{path} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        return {"kind": "folder", "root": os.path.abspath(path)}, references
    raise ValueError(f"--images {args.images!r} is neither a folder nor a .json file")


def _loader(source: dict) -> Callable[[list], list]:
    """fn(references) -> the images, opened as the pipeline opens them."""
    if source["kind"] == "dataset":
        import datasets

        dataset = datasets.load_from_disk(source["root"])
        return lambda rows: dataset.select(rows)[source["image_column"]]
    return lambda refs: [open_image(os.path.join(source["root"], ref)) for ref in refs]


# ------------------------------------------------------------------------------------------------------- building
@torch.no_grad()
def embed_images(model, processor, images: list, batch_size: int, store_tokens: bool) -> dict[str, torch.Tensor]:
    """{"embeddings": (n, E) float32 L2-normalised ITC embeddings [, "image_tokens": (n, 1 + N, D)]}: the
    pipeline's image path (processor → vision encoder → projection → normalise)."""
    embeddings, tokens = [], []
    for start in range(0, len(images), batch_size):
        pixels = processor(images=images[start : start + batch_size], return_tensors="pt")["pixel_values"]
        hidden = model.encode_image(pixels.to(model.device, model.dtype)).last_hidden_state
        embeddings.append(F.normalize(model.image_itc_embeds(hidden).float(), dim=-1).cpu())
        if store_tokens:
            tokens.append(hidden.cpu())
    out = {EMBEDDINGS: torch.cat(embeddings).contiguous()}
    if store_tokens:
        out[IMAGE_TOKENS] = torch.cat(tokens).contiguous()
    return out


def _rank_and_world() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) from the environment (`accelerate launch` / torchrun set them), default (0, 1)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return rank, world


def _check_plan(out: Path, plan: dict) -> None:
    """Writes build.json, or checks that an earlier (interrupted / other-rank) build had the same plan."""
    existing = out / BUILD_FILE
    if existing.is_file():
        before = json.loads(existing.read_text(encoding="utf-8"))
        changed = sorted(key for key in plan if before.get(key) != plan[key])
        if changed:
            raise ValueError(f"{out} holds a build with other settings ({', '.join(changed)} differ): resume it with "
                             "the same model, images and options, or use a new --output_dir")
    else:
        write_json_atomic(existing, plan, indent=1)


def build_index(args: IndexArguments, on_part: Callable[[Path], None] | None = None, progress: bool = True) -> dict:
    """Builds (or resumes) this process's shard of the index; finalizes the index when every shard is done.

    Args:
        args: the command's arguments.
        on_part: called with each part file after it is written (tests interrupt a build here).
        progress: show a tqdm bar.

    Returns:
        {"shard", "images" (this shard's), "embedded" (this run), "finished" (index.json written), "output_dir"}.
    """
    rank, world = _rank_and_world()
    model, processor = load_model_and_processor(args.model)
    source, references = list_gallery(args)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = {
        "model": {"name": args.model, "path": os.path.abspath(args.model) if os.path.isdir(args.model) else args.model,
                  "fingerprint": model_fingerprint(model)},
        "source": source, "count": len(references), "world_size": world, "chunk_size": args.chunk_size,
        "store_image_tokens": args.store_image_tokens, "embed_dim": model.config.embed_dim,
        "references_sha256": hashlib.sha256(json.dumps(references).encode()).hexdigest(),
    }
    _check_plan(out, plan)
    shard = out / f"shard-{rank:05d}-of-{world:05d}"
    shard.mkdir(exist_ok=True)
    lo, hi = rank * len(references) // world, (rank + 1) * len(references) // world
    starts = list(range(lo, hi, args.chunk_size))
    parts = [shard / f"part-{c:05d}.safetensors" for c in range(len(starts))]
    done = sum(min(args.chunk_size, hi - s) for s, p in zip(starts, parts) if p.is_file())
    load, embedded = _loader(source), 0
    bar = tqdm(total=hi - lo, initial=done, unit="img", desc=f"index {shard.name}", disable=not progress)
    for start, part in zip(starts, parts):
        if part.is_file():
            continue
        refs = references[start : min(start + args.chunk_size, hi)]
        tensors = embed_images(model, processor, load(refs), args.batch_size, args.store_image_tokens)
        tmp = part.with_name(f".{part.name}.{os.getpid()}.tmp")
        save_file(tensors, str(tmp), metadata={"references": json.dumps(refs), "first": str(start)})
        os.replace(tmp, part)  # a part exists only complete: the unit of resumption
        embedded += len(refs)
        bar.update(len(refs))
        if on_part is not None:
            on_part(part)
    bar.close()
    write_json_atomic(shard / DONE_FILE, {"images": hi - lo, "parts": [p.name for p in parts]}, indent=1)
    finished = finalize_index(out, plan, references, world)
    return {"shard": shard.name, "images": hi - lo, "embedded": embedded, "finished": finished,
            "output_dir": str(out)}


def finalize_index(out: Path, plan: dict, references: list, world: int) -> bool:
    """Writes references.json and index.json once every shard is done (any process may; the result is the same)."""
    names = []
    for rank in range(world):
        done = out / f"shard-{rank:05d}-of-{world:05d}" / DONE_FILE
        if not done.is_file():
            return False
        names += [f"{done.parent.name}/{part}" for part in json.loads(done.read_text(encoding="utf-8"))["parts"]]
    write_json_atomic(out / REFERENCES_FILE, references, indent=1)
    manifest = {"format": INDEX_FORMAT, "version": INDEX_VERSION, **{k: v for k, v in plan.items()
                                                                     if k not in ("world_size", "chunk_size")},
                "parts": names}
    write_json_atomic(out / INDEX_FILE, manifest, indent=1)  # last: its presence means the index is complete
    return True


# ------------------------------------------------------------------------------------------------------- search
def run_search(args: SearchArguments) -> list[dict]:
    """[{"image": reference, "score", "rank"}, ...] for one text or image query (the pipeline on the index)."""
    from modeling_efficientvlm.pipeline_efficientvlm import ImageTextRetrievalPipeline

    if bool(args.text) == bool(args.image):
        raise ValueError("pass exactly one query: --text \"...\" or --image FILE")
    index = GalleryIndex.load(args.index)
    model, processor = load_model_and_processor(args.model or index.manifest["model"]["path"])
    pipe = ImageTextRetrievalPipeline(model=model, processor=processor)
    query = args.text or Path(args.image)
    hits = pipe(query, gallery=index, top_k=args.top_k, rerank_k=args.rerank_k, batch_size=args.batch_size)
    return [{"image": hit["image"], "score": hit["score"], "rank": rank} for rank, hit in enumerate(hits, start=1)]
