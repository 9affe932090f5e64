"""Real-data loaders (ALBEF/X-VLM JSON, NLVR2 JSON, any HF dataset) built on the `datasets` library.

Bad input never disappears silently: with `on_error="raise"` the first bad record raises a `ValueError` naming the
file, the record index and the field; with `on_error="skip"` bad records are dropped, a warning with the count and the
first reasons is logged, and the reasons are attached to the returned dataset as `.skipped` (a list of str; like any
plain attribute it does not survive `map`/`select`).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from collections.abc import Sequence
from typing import Any, Callable

import datasets
from PIL import Image

from modeling_efficientvlm.processing_efficientvlm import open_image, to_rgb

logger = logging.getLogger(__name__)

TUXPAINT_STAMPS_DIR = "/usr/share/tuxpaint/stamps"
_ON_ERROR = ("raise", "skip")
_PROGRESS_FROM = 5000  # records: a progress bar while a file this long is checked


# ------------------------------------------------------------------------------------------------------- images
def load_image(source: Any) -> Image.Image:
    """Loads an image as RGB from a PIL image, a file path, or a `datasets.Image` dict ({"bytes", "path"}).

    The conversion is the library's `to_rgb` (EXIF orientation, transparency on white), the one the processor and
    the pipeline apply, so training, evaluation and inference see the same pixels.

    Raises:
        ValueError: naming the file if it is missing or unreadable, or the type if it is not an image source.
    """
    if isinstance(source, Image.Image):
        return to_rgb(source)
    if isinstance(source, dict) and (source.get("bytes") or source.get("path")):
        if source.get("bytes"):
            try:
                return to_rgb(Image.open(io.BytesIO(source["bytes"])))
            except Exception as error:  # PIL raises several types for bad data
                raise ValueError(f"unreadable image bytes (path {source.get('path')!r}): {error}") from error
        source = source["path"]
    if isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise ValueError(f"missing image file {os.fspath(source)!r}")
        try:
            return open_image(source)
        except Exception as error:
            raise ValueError(f"unreadable image file {os.fspath(source)!r}: {error}") from error
    raise ValueError(f"not an image source: {type(source).__name__}")


def _check_image_file(path: str) -> None:
    """Cheap check (header + PIL verify, no full decode) that `path` is a readable image."""
    if not os.path.isfile(path):
        raise ValueError(f"missing image file {path!r}")
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as error:
        raise ValueError(f"unreadable image file {path!r}: {error}") from error


# ------------------------------------------------------------------------------------------------------ records
def _read_json_list(json_path: str) -> list:
    try:
        with open(json_path, encoding="utf-8") as handle:
            records = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read JSON file {json_path!r}: {error}") from error
    if not isinstance(records, list):
        raise ValueError(f"{json_path!r}: expected a JSON list of records, got {type(records).__name__}")
    if not records:
        raise ValueError(f"{json_path!r}: holds no records (an empty JSON list)")
    return records


def _field(record: Any, index: int, field: str, where: str) -> Any:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: record {index} is a {type(record).__name__}, expected an object")
    if field not in record:
        raise ValueError(f"{where}: record {index} is missing field {field!r} (has {sorted(record)})")
    return record[field]


def _captions(value: Any, index: int, where: str, field: str = "caption") -> list[str]:
    """Validates a caption field (a string or a non-empty list of strings) and returns stripped captions."""
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values:
        raise ValueError(f"{where}: record {index} field {field!r} must be a string or a non-empty list of strings")
    captions = []
    for k, caption in enumerate(values):
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"{where}: record {index} field {field!r}[{k}] is an empty or non-string caption")
        captions.append(caption.strip())
    return captions


def _image_path(value: Any, index: int, where: str, image_root: str, check: bool, field: str = "image") -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: record {index} field {field!r} must be a non-empty path string")
    path = os.path.join(image_root or "", value)  # no --image_root: relative to the working directory
    if check:
        try:
            _check_image_file(path)
        except ValueError as error:
            raise ValueError(f"{where}: record {index} field {field!r}: {error}") from error
    return path


def _collect(records: list, parse: Callable[[Any, int], Any], on_error: str, where: str) -> tuple[list, list[str]]:
    """Parses every record; raises on the first bad one or collects (and logs) the reasons when skipping."""
    if on_error not in _ON_ERROR:
        raise ValueError(f"on_error must be one of {_ON_ERROR}, got {on_error!r}")
    parsed, skipped = [], []
    progress = records
    if len(records) >= _PROGRESS_FROM:  # image headers are checked here: say how far it got on large files
        from tqdm.auto import tqdm

        progress = tqdm(records, desc=f"checking {os.path.basename(where)}", unit="record", mininterval=2.0)
    for index, record in enumerate(progress):
        try:
            parsed.append(parse(record, index))
        except ValueError as error:
            if on_error == "raise":
                raise
            skipped.append(str(error))
    if skipped:
        logger.warning("%s: skipped %d of %d records; first: %s", where, len(skipped), len(records),
                       "; ".join(skipped[:3]))
    return parsed, skipped


def _with_skipped(dataset: datasets.Dataset, skipped: list[str]) -> datasets.Dataset:
    dataset.skipped = skipped  # type: ignore[attr-defined]
    return dataset


# ------------------------------------------------------------------------------------------------- ALBEF JSON
Regions = tuple[list[str], list[list[float]]]
"""(phrases, boxes): one normalised (cx, cy, w, h) box per phrase."""


def _image_size(path: str, index: int, where: str) -> tuple[int, int]:
    """(width, height) from the image header (no decode)."""
    try:
        with Image.open(path) as image:
            return image.size
    except Exception as error:  # PIL raises several types for bad data
        raise ValueError(f"{where}: record {index} field 'image': cannot read the size of {path!r} (needed to "
                         f"normalise its 'elems' boxes): {error}") from error


def _region_box(value: Any, index: int, k: int, where: str, width: int, height: int) -> list[float]:
    """An X-VLM "bb" [x, y, w, h] (pixels, top-left corner) → [cx, cy, w, h] normalised by the image size."""
    numbers = isinstance(value, list) and len(value) == 4 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    if not numbers or not (value[0] >= 0 and value[1] >= 0 and value[2] > 0 and value[3] > 0
                           and value[0] + value[2] <= width and value[1] + value[3] <= height):
        raise ValueError(f"{where}: record {index} field 'elems'[{k}].bb = {value!r}: must be [x, y, w, h] in pixels "
                         f"with x, y >= 0, w, h > 0, x + w <= {width} and y + h <= {height} (the image's width and "
                         "height)")
    x, y, w, h = (float(v) for v in value)
    return [(x + w / 2) / width, (y + h / 2) / height, w / width, h / height]


def _regions(record: dict, index: int, where: str, path: str) -> Regions:
    """The region annotations of an X-VLM record (its optional "elems"), as phrases with normalised boxes.

    Each elem {"bb": [x, y, w, h], "caption": str | [str, ...], "attributes"?: str | [str, ...]} gives one phrase per
    caption (X-VLM prefixes one of the attributes: here every "attribute caption" combination), all with its box.
    """
    elems = record.get("elems")
    if elems is None:
        return [], []
    if not isinstance(elems, list):
        raise ValueError(f"{where}: record {index} field 'elems' must be a list of {{'bb', 'caption'}} objects")
    width, height = _image_size(path, index, where) if elems else (0, 0)
    phrases: list[str] = []
    boxes: list[list[float]] = []
    for k, elem in enumerate(elems):
        if not isinstance(elem, dict) or "bb" not in elem or "caption" not in elem:
            raise ValueError(f"{where}: record {index} field 'elems'[{k}] must be an object with 'bb' and 'caption'")
        box = _region_box(elem["bb"], index, k, where, width, height)
        captions = _captions(elem["caption"], index, where, f"elems[{k}].caption")
        attributes = [""]
        if "attributes" in elem:
            attributes = [a + " " for a in _captions(elem["attributes"], index, where, f"elems[{k}].attributes")]
        for attribute in attributes:
            for caption in captions:
                phrases.append(attribute + caption)
                boxes.append(box)
    return phrases, boxes


def _albef_records(json_path: str, image_root: str, on_error: str,
                   check_images: bool) -> tuple[list[tuple[str, list[str], Regions]], list[str]]:
    def parse(record: Any, index: int) -> tuple[str, list[str], Regions]:
        captions = _captions(_field(record, index, "caption", json_path), index, json_path)
        path = _image_path(_field(record, index, "image", json_path), index, json_path, image_root, check_images)
        return path, captions, _regions(record, index, json_path, path)

    return _collect(_read_json_list(json_path), parse, on_error, json_path)


def load_albef_json(json_path: str, image_root: str, split_captions: bool = True, on_error: str = "raise",
                    check_images: bool = True) -> datasets.Dataset:
    """Loads an ALBEF/X-VLM caption JSON: a list of {"image": relative path, "caption": str | [str, ...]}, each
    optionally with X-VLM region annotations (for L_BBOX): "elems": [{"bb": [x, y, w, h], "caption": str | [str,
    ...], "attributes"?: str | [str, ...]}], "bb" in pixels of the image file (top-left corner, width, height; inside
    the image, w and h > 0). X-VLM's region-only records (no image-level "caption") are not accepted.

    Args:
        json_path: the JSON file.
        image_root: directory the "image" paths are relative to.
        split_captions: True: one row per (image, caption) with "caption" a str (training); False: one row per
            image with "caption" a list of str (retrieval test sets).
        on_error: "raise" (first bad record raises) or "skip" (drop, warn, attach reasons as `.skipped`).
        check_images: verify that each image file exists and is a readable image (header check, no decode).

    Returns:
        A `datasets.Dataset` with columns "image" (absolute path str), "caption" and "image_id" (image index); when
        some record has "elems", also "region_phrases" (list of str) and "region_boxes" (list of (cx, cy, w, h)
        normalised by the image's width and height; one per phrase; empty lists for records without regions), the
        item fields `RetrievalCollator` turns into L_BBOX targets.

    Raises:
        ValueError: naming the file, record index and field of the first bad record (on_error="raise"), e.g. a box
            outside the image.
    """
    records, skipped = _albef_records(json_path, image_root, on_error, check_images)
    with_regions = any(phrases for _, _, (phrases, _) in records)
    rows: dict[str, list] = {"image": [], "caption": [], "image_id": []}
    if with_regions:
        rows.update(region_phrases=[], region_boxes=[])
    for image_id, (path, captions, (phrases, boxes)) in enumerate(records):
        for caption in captions if split_captions else [captions]:
            rows["image"].append(path)
            rows["caption"].append(caption)
            rows["image_id"].append(image_id)
            if with_regions:
                rows["region_phrases"].append(phrases)
                rows["region_boxes"].append(boxes)
    features = datasets.Features({
        "image": datasets.Value("string"),
        "caption": datasets.Value("string") if split_captions else datasets.List(datasets.Value("string")),
        "image_id": datasets.Value("int64"),
        **({"region_phrases": datasets.List(datasets.Value("string")),
            "region_boxes": datasets.List(datasets.List(datasets.Value("float32")))} if with_regions else {}),
    })
    return _with_skipped(datasets.Dataset.from_dict(rows, features=features), skipped)


class LazyImageList(Sequence):
    """Image files that are opened (`load_image`: RGB, transparency on white) only when indexed, so a test set of
    thousands of images is never decoded into memory at once. An int index gives one image, a slice a list of them
    (one batch: `evaluate_retrieval` slices a batch at a time)."""

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [load_image(path) for path in self.paths[index]]
        return load_image(self.paths[index])

    def __repr__(self) -> str:
        return f"LazyImageList({len(self.paths)} files)"


def load_retrieval_eval_set(json_path: str, image_root: str, on_error: str = "raise") -> dict:
    """Loads an ALBEF retrieval test JSON into the shape of `training.data.make_retrieval_eval_set`.

    Images stay on disk: each file is checked here (header + PIL verify, no decode) and opened only when
    `images[i]` (or a slice) is read.

    Returns:
        dict(images=LazyImageList (a Sequence of PIL RGB), captions=list[str], img2txt=list[list[int]],
        txt2img=list[int]) where img2txt[i] lists the caption indices of image i and txt2img[j] is the image of
        caption j; "skipped" holds the reasons for skipped records (on_error="skip").
    """
    records, skipped = _albef_records(json_path, image_root, on_error, check_images=False)
    kept: list[tuple[str, list[str]]] = []
    for index, (path, captions, _) in enumerate(records):
        try:
            _check_image_file(path)
            kept.append((path, captions))
        except ValueError as error:
            reason = f"{json_path}: record {index} field 'image': {error}"
            if on_error == "raise":
                raise ValueError(reason) from error
            skipped.append(reason)
            logger.warning("%s: skipped an unreadable image: %s", json_path, reason)
    result: dict = {"images": LazyImageList(path for path, _ in kept), "captions": [], "img2txt": [],
                    "txt2img": [], "skipped": skipped}
    for image_index, (_, captions) in enumerate(kept):
        result["img2txt"].append(list(range(len(result["captions"]), len(result["captions"]) + len(captions))))
        result["captions"].extend(captions)
        result["txt2img"].extend([image_index] * len(captions))
    return result


# -------------------------------------------------------------------------------------------------------- NLVR2
def _nlvr2_label(value: Any, index: int, where: str) -> int:
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return int(value.strip().lower() in ("true", "1"))
    raise ValueError(f"{where}: record {index} field 'label' must be 0/1, a bool or 'True'/'False', got {value!r}")


def load_nlvr2_json(json_path: str, image_root: str, on_error: str = "raise",
                    check_images: bool = True) -> datasets.Dataset:
    """Loads an X-VLM NLVR2 JSON: a list of {"images": [p1, p2], "sentence": str, "label": int | "True"/"False"}.

    Returns:
        A `datasets.Dataset` with columns "images" (two absolute paths), "sentence" (str) and "label" (0/1).

    Raises:
        ValueError: naming the file, record index and field of the first bad record (on_error="raise").
    """
    def parse(record: Any, index: int) -> tuple[list[str], str, int]:
        images = _field(record, index, "images", json_path)
        if not isinstance(images, list) or len(images) != 2:
            raise ValueError(f"{json_path}: record {index} field 'images' must be a list of two paths")
        paths = [_image_path(p, index, json_path, image_root, check_images, field=f"images[{k}]")
                 for k, p in enumerate(images)]
        sentence = _captions(_field(record, index, "sentence", json_path), index, json_path, "sentence")
        if len(sentence) != 1 or not isinstance(record["sentence"], str):
            raise ValueError(f"{json_path}: record {index} field 'sentence' must be one string")
        return paths, sentence[0], _nlvr2_label(_field(record, index, "label", json_path), index, json_path)

    parsed, skipped = _collect(_read_json_list(json_path), parse, on_error, json_path)
    features = datasets.Features({"images": datasets.List(datasets.Value("string")),
                                  "sentence": datasets.Value("string"), "label": datasets.Value("int64")})
    rows = {"images": [p[0] for p in parsed], "sentence": [p[1] for p in parsed], "label": [p[2] for p in parsed]}
    return _with_skipped(datasets.Dataset.from_dict(rows, features=features), skipped)


# ------------------------------------------------------------------------------------------------ any HF dataset
def _missing_image_rows(ds: datasets.Dataset, image_column: str) -> list[int]:
    """Rows whose image is null/empty, found on the Arrow column (no image is decoded)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = ds.select_columns([image_column]).with_format("arrow")[:].column(image_column)
    if pa.types.is_struct(column.type) and {"bytes", "path"} <= {f.name for f in column.type}:
        missing = pc.or_(pc.is_null(column), pc.and_(pc.is_null(pc.struct_field(column, "bytes")),
                                                      pc.is_null(pc.struct_field(column, "path"))))
    elif pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        missing = pc.or_kleene(pc.is_null(column), pc.equal(pc.utf8_length(column), 0))
    else:
        missing = pc.is_null(column)
    return [i for i, flag in enumerate(missing.to_pylist()) if flag]


def from_hf_dataset(ds: datasets.Dataset, image_column: str = "image", text_column: str = "caption",
                    split_captions: bool = True, on_error: str = "raise") -> datasets.Dataset:
    """Standardises any HF dataset with an image column and a text column to columns "image", "caption", "image_id".

    Args:
        ds: the dataset; images may be a `datasets.Image` feature, paths or PIL images.
        image_column: name of the image column.
        text_column: name of the text column (str or list of str per row).
        split_captions: explode list-valued captions into one row per caption (keeping "image_id").
        on_error: "raise" or "skip" rows with a missing image or an empty/non-string caption.

    Raises:
        ValueError: listing the available columns if a column is absent; naming the row and column of a bad row.
    """
    missing = [c for c in (image_column, text_column) if c not in ds.column_names]
    if missing:
        raise ValueError(f"dataset has no column(s) {missing}; available columns: {ds.column_names}")
    bad_images = set(_missing_image_rows(ds, image_column))
    texts = ds.select_columns([text_column]).to_dict()[text_column]

    def parse(text: Any, index: int) -> int:
        if index in bad_images:
            raise ValueError(f"dataset row {index} column {image_column!r}: missing image")
        _captions(text, index, "dataset", field=text_column)
        return index

    keep, skipped = _collect(texts, parse, on_error, "dataset")
    ds = ds.select(keep) if skipped else ds
    ds = ds.select_columns([image_column, text_column])
    renames = {old: new for old, new in ((image_column, "image"), (text_column, "caption")) if old != new}
    ds = ds.rename_columns(renames) if renames else ds
    ds = ds.add_column("image_id", list(range(len(ds))))
    if split_captions and not isinstance(ds.features["caption"], datasets.Value):
        ds = _explode_captions(ds)
    return _with_skipped(ds, skipped)


def _explode_captions(ds: datasets.Dataset) -> datasets.Dataset:
    """One row per caption; images are carried undecoded so exploding does not decode (or re-encode) them."""
    image_feature = ds.features["image"]
    is_image = isinstance(image_feature, datasets.Image)
    if is_image:
        ds = ds.cast_column("image", datasets.Image(decode=False))

    def explode(batch: dict) -> dict:
        out: dict[str, list] = {"image": [], "caption": [], "image_id": []}
        for image, captions, image_id in zip(batch["image"], batch["caption"], batch["image_id"]):
            for caption in [captions] if isinstance(captions, str) else captions:
                out["image"].append(image)
                out["caption"].append(caption)
                out["image_id"].append(image_id)
        return out

    ds = ds.map(explode, batched=True, remove_columns=ds.column_names)
    return ds.cast_column("image", image_feature) if is_image else ds


# ----------------------------------------------------------------------------------------------------- tuxpaint
def build_tuxpaint_json(stamps_dir: str = TUXPAINT_STAMPS_DIR, output_json: str = "tuxpaint_stamps.json",
                        dedupe_captions: bool = False) -> list[dict]:
    """Builds an ALBEF-format JSON from Tux Paint stamps (Debian package `tuxpaint-stamps-default`).

    Each `NAME.png` with a `NAME.txt` beside it becomes {"image": path relative to `stamps_dir`, "caption": line 1
    of the .txt, stripped} (later lines hold translations). PNGs without a .txt (e.g. `*_mirror.png`) and empty first
    lines are skipped and counted in a logged warning. Load the result with
    `load_albef_json(output_json, image_root=stamps_dir)`; images have alpha, `load_image` puts them on white.

    Args:
        stamps_dir: the stamps directory.
        output_json: where to write the JSON list.
        dedupe_captions: keep only the first stamp (in sorted path order) of each caption, so retrieval ground truth
            is unambiguous (e.g. "The letter B." exists twice).

    Returns:
        The records written.

    Raises:
        FileNotFoundError: if `stamps_dir` does not exist. ValueError: if it yields no captioned PNG.
    """
    if not os.path.isdir(stamps_dir):
        raise FileNotFoundError(f"stamps directory {stamps_dir!r} not found (apt-get install tuxpaint-stamps-default)")
    records, seen = [], set()
    skipped = {"no .txt caption": 0, "empty caption": 0, "duplicate caption": 0}
    for root, dirs, files in os.walk(stamps_dir):
        dirs.sort()  # deterministic order
        for name in sorted(f for f in files if f.lower().endswith(".png")):
            txt = os.path.join(root, name[:-4] + ".txt")
            if not os.path.isfile(txt):
                skipped["no .txt caption"] += 1
                continue
            with open(txt, encoding="utf-8-sig", errors="replace") as handle:
                caption = handle.readline().strip()
            reason = "empty caption" if not caption else "duplicate caption" if (
                dedupe_captions and caption in seen) else None
            if reason:
                skipped[reason] += 1
                continue
            seen.add(caption)
            records.append({"image": os.path.relpath(os.path.join(root, name), stamps_dir), "caption": caption})
    if not records:
        raise ValueError(f"no captioned PNG stamps under {stamps_dir!r}")
    if any(skipped.values()):
        logger.warning("%s: kept %d stamps, skipped %s", stamps_dir, len(records),
                       {k: v for k, v in skipped.items() if v})
    os.makedirs(os.path.dirname(os.path.abspath(output_json)), exist_ok=True)
    with open(output_json, "w", encoding="utf-8") as handle:
        json.dump(records, handle, ensure_ascii=False, indent=1)
    return records


__all__ = [
    "TUXPAINT_STAMPS_DIR", "build_tuxpaint_json", "from_hf_dataset", "load_albef_json", "load_image",
    "load_nlvr2_json", "load_retrieval_eval_set", "to_rgb",
]
