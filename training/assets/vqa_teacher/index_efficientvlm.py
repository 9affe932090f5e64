"""A gallery index for the `image-text-retrieval` pipeline (Hub remote code: torch, transformers, safetensors, numpy;
`datasets` + `faiss` used when installed).

An index folder (written by `efficientvlm index`) holds the ITC image embeddings of a gallery, embedded once, with the
reference of every image as given in its source and the fingerprint of the model that embedded them:

    index.json                       format, model (name + fingerprint), source (kind, root, image column), shards
    references.json                  [reference, ...] in gallery order (a path as given in the source, or a row number)
    shard-00000-of-00002/part-00000.safetensors   "embeddings" (n, E) float32 [+ "image_tokens" (n, 1 + N, D)];
                                                  its metadata lists the part's references (JSON)

Reading needs neither `datasets` nor FAISS: `GalleryIndex.load(folder)`; `pipeline(query, gallery=folder_or_index)`.
Search is exact: a `datasets.Dataset` of the references with the embeddings as its FAISS inner-product index
(`add_faiss_index_from_external_arrays`) when `datasets` and `faiss` are installed, else one matrix product.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

INDEX_FORMAT = "efficientvlm-gallery-index"
INDEX_VERSION = 1
INDEX_FILE = "index.json"
REFERENCES_FILE = "references.json"
EMBEDDINGS, IMAGE_TOKENS = "embeddings", "image_tokens"
# Weights the gallery embeddings and their re-ranking depend on (the task heads are left out: a retrieval and a
# pre-training model loaded from one checkpoint embed alike).
FINGERPRINT_PREFIXES = ("vision_model.", "text_model.", "fusion_model.", "vision_proj.", "text_proj.", "itm_head.")
_VOLATILE_CONFIG_KEYS = {"transformers_version", "dtype", "torch_dtype", "architectures", "auto_map",
                         "custom_pipelines", "output_attentions", "output_hidden_states", "return_dict", "use_cache"}


def _stable_config(value: Any) -> Any:
    """A config dict without the keys that do not change what the model computes (paths, versions, dtypes)."""
    if isinstance(value, dict):
        return {str(k): _stable_config(v) for k, v in sorted(value.items(), key=lambda item: str(item[0]))
                if not str(k).startswith("_") and k not in _VOLATILE_CONFIG_KEYS}
    return value


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the model's config (without paths, versions, dtype) and of the encoders', projections' and ITM
    head's tensors (names, dtypes, shapes, bytes): equal for the same weights however they were loaded."""
    digest = hashlib.sha256()
    digest.update(json.dumps(_stable_config(model.config.to_dict()), sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        if not name.startswith(FINGERPRINT_PREFIXES):
            continue
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def model_name(model: torch.nn.Module) -> str:
    """The model's name or path as loaded (`config._name_or_path`), else its class name."""
    return getattr(model.config, "_name_or_path", "") or type(model).__name__


def is_index_folder(path: Any) -> bool:
    """True for a `str` / `os.PathLike` naming a folder with an index.json."""
    return isinstance(path, (str, os.PathLike)) and (Path(path) / INDEX_FILE).is_file()


def faiss_available() -> bool:
    """Whether `datasets` and `faiss` are importable (the FAISS search path)."""
    try:
        import datasets  # noqa: F401
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


class GalleryIndex:
    """A loaded gallery index: embeddings (G, E) float32, the references, the model's fingerprint, and (lazily read
    from the parts) stored image tokens for re-ranking."""

    def __init__(self, folder: str | os.PathLike, manifest: dict, references: list, embeddings: torch.Tensor,
                 parts: list[tuple[str, int]]):
        self.folder = Path(folder)
        self.manifest = manifest
        self.references = references
        self.embeddings = embeddings
        self._parts = parts  # (file, first row) of every part, in gallery order
        self._faiss = None

    @classmethod
    def load(cls, folder: str | os.PathLike) -> GalleryIndex:
        """Reads an index folder (safetensors + JSON only). Raises ValueError for an unfinished or foreign folder."""
        folder = Path(folder)
        if not (folder / INDEX_FILE).is_file():
            raise FileNotFoundError(f"{folder} has no {INDEX_FILE}: not an index, or its build has not finished "
                                    "(every shard must be built; run `efficientvlm index` again to resume)")
        manifest = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))
        if manifest.get("format") != INDEX_FORMAT or manifest.get("version") != INDEX_VERSION:
            raise ValueError(f"{folder / INDEX_FILE} is not a version-{INDEX_VERSION} {INDEX_FORMAT} manifest")
        references = json.loads((folder / REFERENCES_FILE).read_text(encoding="utf-8"))
        chunks, parts, row = [], [], 0
        for name in manifest["parts"]:
            with safe_open(str(folder / name), framework="pt") as part:
                chunks.append(part.get_tensor(EMBEDDINGS).float())
            parts.append((str(folder / name), row))
            row += chunks[-1].shape[0]
        embeddings = torch.cat(chunks) if chunks else torch.empty(0, manifest["embed_dim"])
        if embeddings.shape[0] != len(references) or len(references) != manifest["count"]:
            raise ValueError(f"{folder}: {embeddings.shape[0]} embeddings, {len(references)} references and a count "
                             f"of {manifest['count']} in {INDEX_FILE} disagree; rebuild the index")
        return cls(folder, manifest, references, embeddings, parts)

    def __len__(self) -> int:
        return len(self.references)

    def __repr__(self) -> str:
        return (f"GalleryIndex({len(self)} images, model {self.manifest['model']['name']!r}, "
                f"image tokens {'stored' if self.has_image_tokens else 'not stored'})")

    @property
    def has_image_tokens(self) -> bool:
        return bool(self.manifest.get("store_image_tokens"))

    def check_model(self, model: torch.nn.Module, fingerprint: str | None = None) -> None:
        """Raises ValueError naming both models unless `model` (fingerprint given or computed) built this index."""
        fingerprint = fingerprint or model_fingerprint(model)
        built = self.manifest["model"]
        if fingerprint != built["fingerprint"]:
            raise ValueError(
                f"the index {str(self.folder)!r} was built with model {built['name']!r} (fingerprint "
                f"{built['fingerprint'][:12]}), not with {model_name(model)!r} (fingerprint {fingerprint[:12]}): "
                "query it with that model, or rebuild it with `efficientvlm index --model ...`"
            )

    def search(self, queries: torch.Tensor, k: int, use_faiss: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact inner-product search: (scores (Q, k) float32, indices (Q, k) long), best first.

        `queries` (Q, E) are L2-normalised ITC embeddings, so the scores are cosines. `use_faiss`: None = FAISS when
        `datasets` and `faiss` are installed; True requires them; False = one matrix product and a top-k in torch.
        """
        k = min(k, len(self))
        queries = queries.detach().float().cpu()
        if use_faiss is None:
            use_faiss = faiss_available()
        if use_faiss:
            result = self.dataset().search_batch(EMBEDDINGS, np.ascontiguousarray(queries.numpy()), k=k)
            return torch.from_numpy(np.stack(result.total_scores)), torch.from_numpy(np.stack(result.total_indices))
        best = (queries @ self.embeddings.T).topk(k, dim=1)  # (Q, G) → (Q, k); the only step that reads G
        return best.values, best.indices

    def dataset(self):
        """The gallery as a `datasets.Dataset` ("image": references as str) with the embeddings as its FAISS
        inner-product index "embeddings" (exact, `IndexFlatIP`); built once. Needs `datasets` and `faiss`."""
        if self._faiss is None:
            import datasets
            import faiss

            dataset = datasets.Dataset.from_dict({"image": [str(r) for r in self.references]})
            dataset.add_faiss_index_from_external_arrays(
                np.ascontiguousarray(self.embeddings.numpy()), EMBEDDINGS, metric_type=faiss.METRIC_INNER_PRODUCT
            )
            self._faiss = dataset
        return self._faiss

    def image_tokens(self, rows: list[int]) -> torch.Tensor:
        """Stored vision-encoder tokens (len(rows), 1 + N, D) of gallery rows (only the needed rows are read)."""
        if not self.has_image_tokens:
            raise ValueError(f"the index {str(self.folder)!r} stores no image tokens (build it with "
                             "--store_image_tokens)")
        starts = [start for _, start in self._parts]
        out = []
        for row in rows:
            part = int(np.searchsorted(starts, row, side="right")) - 1
            with safe_open(self._parts[part][0], framework="pt") as handle:
                local = row - self._parts[part][1]
                out.append(handle.get_slice(IMAGE_TOKENS)[local : local + 1])
        return torch.cat(out)

    def image(self, row: int) -> Any:
        """The image of gallery row `row`, opened from its source (a file below the source root, or a dataset row)."""
        source, reference = self.manifest["source"], self.references[row]
        if source["kind"] == "dataset":
            try:
                import datasets
            except ImportError as error:
                raise ImportError(f"re-ranking an index built from a datasets folder ({source['root']}) opens its "
                                  "images with `datasets`: install it, or build the index with --store_image_tokens"
                                  ) from error
            if getattr(self, "_dataset_source", None) is None:
                self._dataset_source = datasets.load_from_disk(source["root"])
            return self._dataset_source[int(reference)][source["image_column"]]
        path = os.path.join(source["root"], reference)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"gallery image {reference!r} of the index {str(self.folder)!r} is not at {path}: "
                                    "re-ranking re-encodes the candidates (or build with --store_image_tokens)")
        return Path(path)


def load_gallery_index(folder_or_index: Any) -> GalleryIndex:
    """A `GalleryIndex` as it is, or loaded from its folder."""
    return folder_or_index if isinstance(folder_or_index, GalleryIndex) else GalleryIndex.load(folder_or_index)


__all__ = ["GalleryIndex", "is_index_folder", "load_gallery_index", "model_fingerprint"]
