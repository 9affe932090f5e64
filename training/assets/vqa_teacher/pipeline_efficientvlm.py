"""`image-text-retrieval` pipeline for EfficientVLM (Hub remote code: imports only torch, transformers, PIL, numpy).

Usage, with only `torch`, `transformers` and `PIL` installed:

    from transformers import pipeline
    pipe = pipeline("image-text-retrieval", model="path/or/repo", trust_remote_code=True)
    pipe("a red circle", gallery=[img0, img1, img2], top_k=2, rerank_k=2)
    # [{"index": 2, "score": 3.1, "itc_score": 0.41, "reranked": True, "image": img2}, ...]
    pipe("a red circle", gallery=["a.png", "b.png"], gallery_type="image")  # image files named by strings

Which input is an image and which a text is decided by type alone, never by the file system: a `str` is always a
text; a PIL image, an `os.PathLike` (`pathlib.Path`) or a numpy array is an image. To pass image files as strings,
declare them with `gallery_type="image"` / `query_type="image"`; a declared path that is not an existing local file
raises `FileNotFoundError` naming it (no URLs: nothing is downloaded). Images are converted by the processor's
`to_rgb` (EXIF orientation, transparency on white), the conversion `AutoProcessor` and the training loaders use.

Why `__call__` is overridden: the base `Pipeline.__call__` maps one input to one output through a DataLoader (and
treats a list as a stream of independent inputs). Retrieval takes a query (or a list of queries) *and* a gallery that
all queries share and that must be encoded once, in batches, before any query is scored. `__call__` therefore packs
(queries, gallery) into one unit of work and runs it through the standard `preprocess` → `forward` → `postprocess`
steps once (`forward` keeps the base class's device placement and `no_grad`); `batch_size` is the encoder/fusion batch
size inside `_forward`, not a DataLoader batch size.

Making a model folder pipeline-ready (the folder needs `"custom_pipelines"` in config.json and this file):
  * either build the pipeline and save it: `ImageTextRetrievalPipeline(model=model, processor=processor)
    .save_pretrained(folder)` (or `.push_to_hub(repo)`): it writes model, processor and this file;
  * or, after `model.save_pretrained(folder)` and `processor.save_pretrained(folder)`, call
    `save_pipeline_files(folder)`.
Both also add `AutoModelForZeroShotImageClassification` to the config's `auto_map`, which the built-in
`pipeline("zero-shot-image-classification", model=folder, trust_remote_code=True)` needs to load the model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoModel, AutoModelForVisualQuestionAnswering, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.pipelines.zero_shot_image_classification import ZeroShotImageClassificationPipeline

from .index_efficientvlm import GalleryIndex, is_index_folder, load_gallery_index, model_fingerprint
from .processing_efficientvlm import input_side, open_image, prepare_images

TASK = "image-text-retrieval"
TEXT, IMAGE = "text", "image"
DEFAULT_ITM_SCORE = "logit_diff"  # the match log-odds: sigmoid(score) is the match probability
# Auto class the built-in zero-shot-image-classification pipeline loads its model with.
ZERO_SHOT_AUTO_CLASS = "AutoModelForZeroShotImageClassification"
DEFAULT_BATCH_SIZE = 32


# Types that are images by themselves; a `str` is a text unless the caller declares `<what>_type="image"`.
IMAGE_TYPES = (Image.Image, os.PathLike, np.ndarray)
STR_RULE = (
    "a `str` is always a text: pass images as PIL images, pathlib.Path objects or numpy arrays, or declare image "
    "file paths given as strings with `query_type='image'` / `gallery_type='image'`"
)


def _infer_modality(item: Any, what: str) -> str:
    """`str` → text; PIL image, `os.PathLike` (`pathlib.Path`) or numpy array → image (never the file system)."""
    if isinstance(item, str):
        return TEXT
    if isinstance(item, IMAGE_TYPES):
        return IMAGE
    raise TypeError(
        f"Each {what} item must be a text (str) or an image (PIL.Image, pathlib.Path, numpy array); "
        f"got {type(item).__name__}"
    )


def _check_declared(items: list[Any], declared: str, what: str) -> None:
    """Raises when an item cannot have the declared modality (texts are `str`; images may also be `str` paths)."""
    allowed = (str,) if declared == TEXT else (str, *IMAGE_TYPES)
    for i, item in enumerate(items):
        if not isinstance(item, allowed):
            raise TypeError(f"{what} item {i} is a {type(item).__name__}, but {what}_type={declared!r}")


def _check_image_files(items: list[Any], what: str) -> None:
    """Raises `FileNotFoundError` naming the first image path (str or PathLike) that is not an existing file."""
    for i, item in enumerate(items):
        if isinstance(item, (str, os.PathLike)) and not os.path.isfile(item):
            raise FileNotFoundError(
                f"{what} item {i}: image file not found: {os.fspath(item)!r} (an image path must name an existing "
                "local file; URLs are not downloaded)"
            )


def _resolve_modality(items: list[Any], declared: str | None, what: str) -> str:
    """The single modality of `items`: declared, or inferred from every item's type; raises on a mixed list.

    Image paths are checked here, before anything is encoded.
    """
    if declared is not None:
        _check_declared(items, declared, what)
        modality = declared
    else:
        found = {_infer_modality(item, what) for item in items}
        if len(found) != 1:
            raise ValueError(
                f"The {what} mixes texts and images; every {what} item must have the same modality "
                f"({STR_RULE})"
            )
        modality = found.pop()
    if modality == IMAGE:
        _check_image_files(items, what)
    return modality


def _declared_type(new: str | None, old: str | None, what: str) -> str | None:
    """`<what>_type`, or its older spelling `<what>_modality` (the same argument); raises if both disagree."""
    if new is not None and old is not None and new != old:
        raise ValueError(f"{what}_type={new!r} and {what}_modality={old!r} disagree; pass only {what}_type")
    return new if new is not None else old


def _load_image(item: Any, min_side: int | None = None) -> Any:
    """What the processor gets for one image: a file path (str or PathLike) read by `open_image`, a PIL image or an
    array converted by `prepare_images`; with `min_side` (the model's input side) reduced right after loading, so a
    batch holds small images, never every decoded full-size one."""
    if isinstance(item, (str, os.PathLike)):
        return open_image(item, min_side)
    return prepare_images(item, min_side)


def _load_images(items: list[Any], min_side: int | None, first: int = 0) -> list[Any]:
    """`_load_image` of every item; an unreadable one (truncated or not an image file, a bad array) raises the same
    error type naming its index (`first` + position) and path."""
    images = []
    for i, item in enumerate(items):
        try:
            images.append(_load_image(item, min_side))
        except (OSError, ValueError) as error:
            path = f" ({os.fspath(item)!r})" if isinstance(item, (str, os.PathLike)) else ""
            raise type(error)(f"image item {first + i}{path}: {error}") from error
    return images


def _pad_tokens(sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pads (T_i, D) token sequences to (B, max T_i, D) with zeros; returns them and the (B, T) 1/0 mask."""
    length = max(seq.shape[0] for seq in sequences)
    tokens = sequences[0].new_zeros(len(sequences), length, sequences[0].shape[-1])
    mask = torch.zeros(len(sequences), length, dtype=torch.long, device=sequences[0].device)
    for i, seq in enumerate(sequences):
        tokens[i, : seq.shape[0]] = seq
        mask[i, : seq.shape[0]] = 1
    return tokens, mask


class ImageTextRetrievalPipeline(Pipeline):
    """Ranks a gallery of images for a text query, or a gallery of texts for an image query.

    Scoring: every gallery item gets the ITC score, the cosine similarity of the L2-normalised embeddings from
    `get_image_features` / `get_text_features` (divided by the model's temperature with
    `scale_by_temperature=True`). With `rerank_k > 0`, the `rerank_k` best ITC candidates of each query are re-scored
    by the ITM head of the fusion encoder (`itm_logits`): one fusion pass per (query, candidate) pair, batched. The
    query is encoded once; each candidate once per call (shared by all queries), so a candidate's tokens are cached.
    Re-ranked candidates always come before the others, whatever the scores' scales.

    Loading: `_load_processor = True`: `pipeline(...)` loads the checkpoint's `AutoProcessor` (EfficientVLMProcessor,
    remote code) and takes the tokenizer and image processor from it. Constructing the class directly also accepts
    `tokenizer=` + `image_processor=` instead of `processor=`.

    Call arguments (also accepted by the constructor as defaults):
        top_k: how many gallery items to return per query (None = all).
        rerank_k: how many ITC candidates per query to re-score with the ITM head (0 = ITC only); the re-ranking
            is the model's own `rerank` (the one the evaluation and benchmark run).
        itm_score: one of the model's `ITM_SCORES`: "logit_diff" (default here: the match log-odds, sigmoid of it
            is the match probability), "match_logit" (X-VLM), "match_logit_plus_itc" (ALBEF: match logit + the ITC
            score shown), "probability".
        scale_by_temperature: divide ITC cosine similarities by the model's learned temperature.
        batch_size: encoder / fusion batch size (default 32).
        query_type / gallery_type: "text" or "image", declaring the modality instead of inferring it from the
            items' types (a `str` is a text; PIL images, `pathlib.Path` and numpy arrays are images).
            `gallery_type="image"` lets a gallery of image file paths be given as strings. `query_modality` /
            `gallery_modality` are accepted as older names of the same arguments.
    """

    _load_processor = True
    _load_tokenizer = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_video_processor = False

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.processor is None and (self.tokenizer is None or self.image_processor is None):
            raise ValueError(
                "ImageTextRetrievalPipeline needs a `processor` (EfficientVLMProcessor), or both a `tokenizer` and an "
                "`image_processor`"
            )
        for name in ("get_image_features", "get_text_features"):
            if not callable(getattr(self.model, name, None)):
                raise TypeError(f"{type(self.model).__name__} has no `{name}`; it cannot be used for retrieval")

    # ---------------------------------------------------------------------------------------------------------------
    # Pipeline API
    # ---------------------------------------------------------------------------------------------------------------

    def _sanitize_parameters(
        self,
        top_k: int | None | str = "unset",
        rerank_k: int | None = None,
        itm_score: str | None = None,
        scale_by_temperature: bool | None = None,
        query_modality: str | None = None,
        gallery_modality: str | None = None,
        batch_size: int | None = None,
        query_type: str | None = None,
        gallery_type: str | None = None,
        **unknown: Any,
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """Splits call / constructor keyword arguments into preprocess, forward and postprocess parameters."""
        if unknown:
            raise TypeError(f"Unknown argument(s) for {type(self).__name__}: {sorted(unknown)}")
        preprocess: dict[str, Any] = {}
        forward: dict[str, Any] = {}
        for what, declared in (("query", _declared_type(query_type, query_modality, "query")),
                               ("gallery", _declared_type(gallery_type, gallery_modality, "gallery"))):
            if declared is not None:
                if declared not in (TEXT, IMAGE):
                    raise ValueError(f"{what}_type must be 'text' or 'image', got {declared!r}")
                preprocess[f"{what}_type"] = declared
        if top_k != "unset":
            if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
                raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
            forward["top_k"] = top_k
        if rerank_k is not None:
            if not isinstance(rerank_k, int) or isinstance(rerank_k, bool) or rerank_k < 0:
                raise ValueError(f"rerank_k must be an int >= 0, got {rerank_k!r}")
            if rerank_k > 0 and not callable(getattr(self.model, "rerank", None)):
                raise ValueError(
                    f"rerank_k={rerank_k} needs an ITM head, but {type(self.model).__name__} has no `rerank`; load "
                    "the checkpoint with AutoModel (EfficientVLMForImageTextRetrieval) or use rerank_k=0"
                )
            forward["rerank_k"] = rerank_k
        if itm_score is not None:
            allowed = getattr(self.model, "ITM_SCORES", (DEFAULT_ITM_SCORE,))  # the re-ranker's own list
            if itm_score not in allowed:
                raise ValueError(f"itm_score must be one of {allowed}, got {itm_score!r}")
            forward["itm_score"] = itm_score
        if scale_by_temperature is not None:
            forward["scale_by_temperature"] = bool(scale_by_temperature)
        if batch_size is not None:
            if not isinstance(batch_size, int) or batch_size < 1:
                raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
            forward["batch_size"] = batch_size
        return preprocess, forward, {}

    def __call__(self, query: Any, gallery: list[Any] | None = None, **kwargs: Any) -> list[dict] | list[list[dict]]:
        """Ranks `gallery` for `query`.

        Args:
            query: a text (`str`) or an image (PIL image, `pathlib.Path`, numpy array; a `str` file path with
                `query_type="image"`); or a list of queries of one modality.
            gallery: a non-empty list of images (PIL / `pathlib.Path` / arrays; `str` paths with
                `gallery_type="image"`) if the query is a text, or of texts if the query is an image;
                same-modality retrieval is an error.
            **kwargs: `top_k=5`, `rerank_k=0`, `itm_score`, `scale_by_temperature`, `batch_size`,
                `query_type`, `gallery_type` (see the class docstring).

        Returns:
            For one query, the top-k gallery items, best first: dicts with `index` (position in `gallery`), `score`
            (ITM score if re-ranked, else ITC score), the item under `"image"` or `"text"`, and when `rerank_k > 0`
            also `itc_score` and `reranked`. For a list of queries, a list of such lists.
        """
        if gallery is None:
            raise ValueError("ImageTextRetrievalPipeline needs a `gallery` (a list of images or of texts) to rank")
        single = not isinstance(query, (list, tuple))
        queries = [query] if single else list(query)
        if not queries:
            return []
        # Defaults for values the caller and the constructor leave unset.
        kwargs.setdefault("batch_size", self._batch_size or DEFAULT_BATCH_SIZE)
        preprocess_params, forward_params, postprocess_params = self._sanitize_parameters(**kwargs)
        preprocess_params = {**self._preprocess_params, **preprocess_params}
        forward_params = {**self._forward_params, **forward_params}
        postprocess_params = {**self._postprocess_params, **postprocess_params}
        results = self.run_single(
            {"queries": queries, "gallery": gallery}, preprocess_params, forward_params, postprocess_params
        )
        return results[0] if single else results

    def preprocess(
        self, inputs: dict[str, Any], query_type: str | None = None, gallery_type: str | None = None
    ) -> dict[str, Any]:
        """Validates the inputs and resolves both modalities (images are loaded lazily, batch by batch)."""
        queries, gallery = inputs["queries"], inputs["gallery"]
        if isinstance(gallery, GalleryIndex) or is_index_folder(gallery):
            return self._preprocess_index(queries, gallery, query_type)
        if not isinstance(gallery, (list, tuple)):
            raise TypeError(f"`gallery` must be a list of images or a list of texts, got {type(gallery).__name__}")
        if len(gallery) == 0:
            raise ValueError("`gallery` is empty")
        gallery_mod = _resolve_modality(list(gallery), gallery_type, "gallery")
        query_mod = _resolve_modality(queries, query_type, "query")
        if query_mod == gallery_mod:
            hint = f" ({STR_RULE})" if query_mod == TEXT else ""
            raise ValueError(
                f"Query and gallery are both {query_mod}s: image-text retrieval needs a text query with an image "
                f"gallery, or an image query with a text gallery{hint}"
            )
        return {
            "queries": queries, "query_modality": query_mod, "gallery": list(gallery), "gallery_modality": gallery_mod
        }

    def _forward(
        self,
        model_inputs: dict[str, Any],
        top_k: int | None = 5,
        rerank_k: int = 0,
        itm_score: str = DEFAULT_ITM_SCORE,
        scale_by_temperature: bool = False,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> dict[str, Any]:
        """Encodes queries and gallery in batches, scores with ITC, re-scores the top candidates with ITM."""
        if "index" in model_inputs:
            return self._forward_index(model_inputs, top_k, rerank_k, itm_score, scale_by_temperature, batch_size)
        queries, gallery = model_inputs["queries"], model_inputs["gallery"]
        query_mod, gallery_mod = model_inputs["query_modality"], model_inputs["gallery_modality"]
        query_emb = self._embed(queries, query_mod, batch_size)  # (Q, E)
        gallery_emb = self._embed(gallery, gallery_mod, batch_size)  # (G, E)
        itc = query_emb @ gallery_emb.T  # (Q, G) cosine similarities
        if scale_by_temperature:
            itc = itc / self._temperature()
        num = len(gallery)
        k = num if top_k is None else min(top_k, num)
        rerank = min(rerank_k, num)
        order = itc.argsort(dim=1, descending=True, stable=True)  # (Q, G)
        scores = torch.gather(itc, 1, order)
        reranked = torch.zeros_like(order, dtype=torch.bool)
        if rerank > 0:
            itm, candidate = self._itm_scores(queries, query_mod, gallery, gallery_mod, itc, rerank, itm_score,
                                              batch_size)
            # re-ranked candidates by ITM first, then every other item in its ITC order
            head = torch.where(candidate, itm, float("-inf")).argsort(dim=1, descending=True, stable=True)[:, :rerank]
            tail = torch.where(candidate, float("-inf"), itc).argsort(dim=1, descending=True, stable=True)
            order = torch.cat([head, tail[:, : num - rerank]], dim=1)
            scores = torch.cat([torch.gather(itm, 1, head), torch.gather(itc, 1, order[:, rerank:])], dim=1)
            reranked[:, :rerank] = True
        return {
            "indices": order[:, :k],
            "scores": scores[:, :k],
            "itc_scores": torch.gather(itc, 1, order[:, :k]),
            "reranked": reranked[:, :k],
            "gallery": gallery,
            "gallery_modality": gallery_mod,
            "with_rerank": rerank > 0,
        }

    def postprocess(self, model_outputs: dict[str, Any]) -> list[list[dict[str, Any]]]:
        """Formats one ranked list per query."""
        gallery, key = model_outputs["gallery"], model_outputs["gallery_modality"]
        results = []
        rows = zip(
            model_outputs["indices"].tolist(),
            model_outputs["scores"].float().tolist(),
            model_outputs["itc_scores"].float().tolist(),
            model_outputs["reranked"].tolist(),
        )
        for indices, scores, itc_scores, reranked in rows:
            ranked = []
            for index, score, itc_score, was_reranked in zip(indices, scores, itc_scores, reranked):
                entry: dict[str, Any] = {"index": index, "score": score}
                if model_outputs["with_rerank"]:
                    entry.update(itc_score=itc_score, reranked=was_reranked)
                entry[key] = gallery[index]
                ranked.append(entry)
            results.append(ranked)
        return results

    # ---------------------------------------------------------------------------------------------------------------
    # A gallery index (`efficientvlm index`): texts or images → the index's images
    # ---------------------------------------------------------------------------------------------------------------

    def _preprocess_index(self, queries: list[Any], gallery: Any, query_type: str | None) -> dict[str, Any]:
        """Loads the index (once per folder and pipeline) and checks it was built with this pipeline's model."""
        if not isinstance(gallery, GalleryIndex):
            key = (os.path.realpath(gallery), os.path.getmtime(os.path.join(gallery, "index.json")))
            cache = self.__dict__.setdefault("_index_cache", {})
            if key not in cache:
                cache.clear()  # one index held at a time
                cache[key] = load_gallery_index(gallery)
            gallery = cache[key]
        if getattr(self, "_model_fingerprint", None) is None:
            self._model_fingerprint = model_fingerprint(self.model)  # hashed once per pipeline
        gallery.check_model(self.model, self._model_fingerprint)
        return {"queries": queries, "query_modality": _resolve_modality(queries, query_type, "query"),
                "index": gallery}

    def _forward_index(self, model_inputs: dict[str, Any], top_k: int | None, rerank_k: int, itm_score: str,
                       scale_by_temperature: bool, batch_size: int) -> dict[str, Any]:
        """ITC search of the index (the only step that reads the whole gallery), then ITM re-scoring of each text
        query's `rerank_k` best candidates with their stored or re-encoded image tokens (the brute-force path's
        ranking: re-ranked candidates by ITM first, then the rest by ITC)."""
        index, queries, query_mod = model_inputs["index"], model_inputs["queries"], model_inputs["query_modality"]
        num = len(index)
        k = num if top_k is None else min(top_k, num)
        rerank = min(rerank_k, num)
        if rerank and query_mod == IMAGE:
            raise ValueError("rerank_k > 0 re-scores (text, image) pairs with the ITM head: an image query ranks an "
                             "image index by ITC alone; pass rerank_k=0")
        query_emb = self._embed(queries, query_mod, batch_size)  # (Q, E)
        itc, order = index.search(query_emb, max(k, rerank))  # (Q, n) each, best first
        if scale_by_temperature:
            itc = itc / self._temperature()
        scores = itc.clone()
        reranked = torch.zeros_like(order, dtype=torch.bool)
        if rerank:
            itm = self._index_itm_scores(queries, index, order[:, :rerank], itc[:, :rerank], itm_score, batch_size)
            head = itm.argsort(dim=1, descending=True, stable=True)  # (Q, rerank)
            order[:, :rerank] = torch.gather(order[:, :rerank], 1, head)
            scores[:, :rerank] = torch.gather(itm, 1, head)
            itc[:, :rerank] = torch.gather(itc[:, :rerank], 1, head)
            reranked[:, :rerank] = True
        # only the returned rows' references: the base class walks every output container (O(G) for the full list)
        references = {row: index.references[row] for row in order[:, :k].unique().tolist()}
        return {"indices": order[:, :k], "scores": scores[:, :k], "itc_scores": itc[:, :k],
                "reranked": reranked[:, :k], "gallery": references, "gallery_modality": IMAGE,
                "with_rerank": rerank > 0}

    def _index_itm_scores(self, queries: list[str], index: GalleryIndex, candidates: torch.Tensor,
                          itc: torch.Tensor, itm_score: str, batch_size: int) -> torch.Tensor:
        """ITM scores (Q, R) of each text query's candidates (Q, R) (gallery rows): the model's pair scoring, each
        candidate image's tokens (stored in the index, else re-encoded from its source) read once."""
        if not callable(getattr(self.model, "itm_pair_scores", None)):
            raise ValueError(f"rerank_k > 0 needs an ITM head, but {type(self.model).__name__} has none")
        rows, image_idx = torch.unique(candidates, return_inverse=True)  # (U,), (Q, R)
        if index.has_image_tokens:
            image_tokens = index.image_tokens(rows.tolist()).to(self.device, self.model.dtype)
        else:
            image_tokens = torch.stack(self._tokens([index.image(r) for r in rows.tolist()], IMAGE, batch_size))
        text_tokens, text_mask = _pad_tokens(self._tokens(queries, TEXT, batch_size))
        text_idx = torch.arange(len(queries))[:, None].expand_as(candidates)
        scores = self.model.itm_pair_scores(
            image_tokens, text_tokens, text_mask, image_idx.reshape(-1).to(self.device),
            text_idx.reshape(-1).to(self.device), itm_score=itm_score, itc=itc.reshape(-1).to(self.device),
            batch_size=batch_size,
        )
        return scores.float().cpu().view_as(candidates)

    # ---------------------------------------------------------------------------------------------------------------
    # Encoding helpers
    # ---------------------------------------------------------------------------------------------------------------

    def _process_texts(self, texts: list[str]) -> dict[str, torch.Tensor]:
        if self.processor is not None:
            batch = self.processor(text=texts, return_tensors="pt", padding=True, truncation=True)
        else:
            batch = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True)
        return {
            "input_ids": batch["input_ids"].to(self.device),
            "attention_mask": batch["attention_mask"].to(self.device),
        }

    def _process_images(self, items: list[Any], first: int = 0) -> torch.Tensor:
        """(B, C, H, W) pixels through the processor's path (`to_rgb`, then the image processor); `first`: the index
        of `items[0]` in its list, for error messages."""
        image_processor = self.image_processor if self.processor is None else self.processor.image_processor
        images = _load_images(items, input_side(image_processor), first)
        if self.processor is not None:
            batch = self.processor(images=images, return_tensors="pt")
        else:  # tokenizer + image processor given separately: the same conversion the processor applies
            batch = self.image_processor(prepare_images(images), return_tensors="pt")
        return batch["pixel_values"].to(self.device, dtype=self.model.dtype)

    def _embed(self, items: list[Any], modality: str, batch_size: int) -> torch.Tensor:
        """(N, E) float32 L2-normalised ITC embeddings, computed `batch_size` items at a time."""
        chunks = []
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            if modality == TEXT:
                features = self.model.get_text_features(**self._process_texts(chunk))
            else:
                features = self.model.get_image_features(self._process_images(chunk, start))
            if not isinstance(features, torch.Tensor):  # models returning an output object (pooled embeddings)
                features = features.pooler_output
            chunks.append(F.normalize(features.float(), dim=-1))
        return torch.cat(chunks)

    def _temperature(self) -> torch.Tensor:
        temperature = getattr(self.model, "temperature", None)
        if isinstance(temperature, torch.Tensor):
            return temperature.float()
        logit_scale = getattr(self.model, "logit_scale", None)
        if isinstance(logit_scale, torch.Tensor):
            return 1.0 / logit_scale.float().exp()
        raise ValueError(f"scale_by_temperature=True, but {type(self.model).__name__} has no `temperature`")

    def _tokens(self, items: list[Any], modality: str, batch_size: int) -> list[torch.Tensor]:
        """Encoder tokens per item: images (1 + N, D_vision); texts (T_i, D_text) without their padding."""
        tokens: list[torch.Tensor] = []
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            if modality == TEXT:
                text = self._process_texts(chunk)
                hidden = self.model.encode_text(text["input_ids"], text["attention_mask"]).last_hidden_state
                lengths = text["attention_mask"].sum(dim=1).tolist()
                tokens.extend(hidden[i, : int(n)] for i, n in enumerate(lengths))
            else:
                hidden = self.model.encode_image(self._process_images(chunk, start)).last_hidden_state
                tokens.extend(hidden.unbind(0))
        return tokens

    def _itm_scores(
        self,
        queries: list[Any],
        query_mod: str,
        gallery: list[Any],
        gallery_mod: str,
        itc: torch.Tensor,
        rerank: int,
        itm_score: str,
        batch_size: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """ITM scores (Q, G) of each query's `rerank` best ITC candidates and the (Q, G) mask of those candidates.

        The re-ranking itself is the model's (`rerank`: ITC top-k → ITM, the one implementation evaluation and
        benchmark use too); only the candidates any query needs are encoded again for their tokens.
        """
        if not callable(getattr(self.model, "rerank", None)):
            raise ValueError(f"rerank_k > 0 needs an ITM head, but {type(self.model).__name__} has no `rerank`")
        needed = torch.unique(itc.topk(rerank, dim=1).indices)  # gallery items in some query's top-k
        query_tokens = self._tokens(queries, query_mod, batch_size)
        gallery_tokens = self._tokens([gallery[i] for i in needed.tolist()], gallery_mod, batch_size)
        texts, images = (query_tokens, gallery_tokens) if query_mod == TEXT else (gallery_tokens, query_tokens)
        text_tokens, text_mask = _pad_tokens(texts)
        sim = itc[:, needed]  # (Q, N): the candidates' ITC scores; ranks within a row are those of the full row
        sim_i2t = sim.t() if query_mod == TEXT else sim
        scores_i2t, scores_t2i = self.model.rerank(
            sim_i2t, rerank, torch.stack(images), text_tokens, text_mask, itm_score=itm_score, batch_size=batch_size,
            directions=("t2i",) if query_mod == TEXT else ("i2t",),
        )
        full = torch.full_like(itc, float("-inf"))
        full[:, needed] = (scores_t2i if query_mod == TEXT else scores_i2t).to(itc)  # (Q, N) → (Q, G)
        candidate = torch.zeros_like(itc, dtype=torch.bool)
        top = sim.topk(rerank, dim=1).indices
        candidate[:, needed] = torch.zeros_like(sim, dtype=torch.bool).scatter_(1, top, True)
        return full, candidate

    # ---------------------------------------------------------------------------------------------------------------
    # Saving
    # ---------------------------------------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Saves model, processor and this pipeline's code, so that `pipeline("image-text-retrieval", model=folder,
        trust_remote_code=True)` works without the EfficientVLM package (`push_to_hub` calls this too).

        The base class writes config.json with `custom_pipelines`, copies this file, and saves the model, tokenizer
        and image processor; it does not save a `processor`, which this override adds (processor_config.json with
        the `AutoProcessor` auto_map, and processing_efficientvlm.py). It also maps
        `AutoModelForZeroShotImageClassification` to the model class for the built-in zero-shot pipeline.
        """
        _add_zero_shot_auto_map(self.model)
        super().save_pretrained(save_directory, **kwargs)
        if self.processor is not None:
            self.processor.save_pretrained(save_directory)
        save_pipeline_files(save_directory)  # the zero-shot pipeline's entry (and the same files again)


# ----------------------------------------------------------------------------------------------------------------------
# Visual question answering
# ----------------------------------------------------------------------------------------------------------------------

VQA_TASK = "visual-question-answering"
VQA_AUTO_CLASS = "AutoModelForVisualQuestionAnswering"
DEFAULT_RANK_K = 128  # answers re-scored by their full log-likelihood (X-VLM's k_test)


class VisualQuestionAnsweringPipeline(Pipeline):
    """Answers a question about an image by ranking the model's answer list (`config.answer_list`), as the paper does.

    transformers 5 removed its own "visual-question-answering" pipeline (it only served classification-style VQA
    heads); this one is registered under that task name, so `pipeline("visual-question-answering", model=folder,
    trust_remote_code=True)` loads it from the model folder (`custom_pipelines` in config.json).

    Ranking (`model.rank_answers`): the first-token probability of every answer of the list, the `rank_k` best
    re-scored by their full-sequence log-likelihood. `score` is the softmax of those log-likelihoods over the re-scored
    candidates (the probability the model gives each answer among them).

    Call: `vqa(image, question="...", top_k=1, rank_k=128)` or `vqa({"image": ..., "question": ...})`; a list of
    such dicts (or of images with a list of questions) gives a list of results. Images: PIL images, numpy arrays, or
    local file paths (`str` / `pathlib.Path`; nothing is downloaded).
    """

    _load_processor = True
    _load_tokenizer = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_video_processor = False

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.processor is None:
            raise ValueError("VisualQuestionAnsweringPipeline needs a `processor` (EfficientVLMProcessor)")
        if not callable(getattr(self.model, "rank_answers", None)):
            raise TypeError(f"{type(self.model).__name__} has no `rank_answers`; load a VQA checkpoint "
                            "(EfficientVLMForQuestionAnswering)")
        answers = getattr(self.model.config, "answer_list", None)
        if not answers:
            raise ValueError("the model's config has no `answer_list` (the answers it ranks): set "
                             "model.config.answer_list = [...] and save the model again")
        self.answer_list = list(answers)
        tokens = self.processor.tokenizer(self.answer_list, padding="longest", return_tensors="pt")
        self._answer_tokens = (tokens["input_ids"], tokens["attention_mask"])

    def _sanitize_parameters(self, top_k: int | None = None, rank_k: int | None = None,
                             **unknown: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """Splits call / constructor keyword arguments into preprocess, forward and postprocess parameters."""
        if unknown:
            raise TypeError(f"Unknown argument(s) for {type(self).__name__}: {sorted(unknown)}")
        forward: dict[str, Any] = {}
        postprocess: dict[str, Any] = {}
        for name, value, target in (("top_k", top_k, postprocess), ("rank_k", rank_k, forward)):
            if value is not None:
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise ValueError(f"{name} must be a positive int, got {value!r}")
                target[name] = value
        return {}, forward, postprocess

    def __call__(self, image: Any, question: str | list[str] | None = None, **kwargs: Any) -> Any:
        """Answers `question` about `image` (see the class docstring); returns [{"answer", "score"}, ...] best first
        (top_k of them), or one such list per question when given lists."""
        if isinstance(image, dict):
            inputs: Any = image
        elif isinstance(image, (list, tuple)) and image and all(isinstance(item, dict) for item in image):
            inputs = list(image)
        elif isinstance(image, (list, tuple)) or isinstance(question, (list, tuple)):
            images = list(image) if isinstance(image, (list, tuple)) else [image] * len(question)  # type: ignore
            questions = list(question) if isinstance(question, (list, tuple)) else [question] * len(images)
            if len(images) != len(questions):
                raise ValueError(f"{len(images)} images and {len(questions)} questions: give one question per image")
            inputs = [{"image": i, "question": q} for i, q in zip(images, questions)]
        else:
            inputs = {"image": image, "question": question}
        return super().__call__(inputs, **kwargs)

    def preprocess(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Checks one (image, question) pair and encodes it with the processor."""
        if not isinstance(inputs, dict) or "image" not in inputs or "question" not in inputs:
            raise ValueError("each input must be an image with a `question=` (or a dict with 'image' and 'question')")
        question, image = inputs["question"], inputs["image"]
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"the question must be a non-empty string, got {question!r}")
        if not isinstance(image, (str, *IMAGE_TYPES)):
            raise TypeError(f"the image must be a PIL image, a numpy array or a local file path, got "
                            f"{type(image).__name__}")
        if isinstance(image, (str, os.PathLike)) and not os.path.isfile(image):
            raise FileNotFoundError(f"image file not found: {os.fspath(image)!r} (URLs are not downloaded)")
        image = _load_images([image], input_side(self.processor.image_processor))[0]
        encoded = self.processor(images=[image], text=[question], return_tensors="pt")
        return {key: encoded[key] for key in ("pixel_values", "input_ids", "attention_mask")}

    def _forward(self, model_inputs: dict[str, Any], rank_k: int = DEFAULT_RANK_K) -> dict[str, Any]:
        """Ranks the answer list for one question (top `rank_k` by first-token probability, then full likelihood)."""
        device = next(self.model.parameters()).device
        answer_ids, answer_mask = (tensor.to(device) for tensor in self._answer_tokens)
        dtype = next(self.model.parameters()).dtype
        scores, indices = self.model.rank_answers(
            pixel_values=model_inputs["pixel_values"].to(device=device, dtype=dtype),
            input_ids=model_inputs["input_ids"].to(device), attention_mask=model_inputs["attention_mask"].to(device),
            answer_ids=answer_ids, answer_attention_mask=answer_mask, k=rank_k,
        )
        return {"scores": scores[0], "indices": indices[0]}

    def postprocess(self, model_outputs: dict[str, Any], top_k: int = 1) -> list[dict[str, Any]]:
        """The `top_k` best answers with their probability among the re-scored candidates."""
        probabilities = model_outputs["scores"].float().softmax(dim=0)
        indices = model_outputs["indices"].tolist()
        return [{"answer": self.answer_list[index], "score": float(probability)}
                for index, probability in zip(indices[:top_k], probabilities[:top_k].tolist())]


ZERO_SHOT_TASK = "zero-shot-image-classification"


class EfficientVLMZeroShotImageClassificationPipeline(ZeroShotImageClassificationPipeline):
    """transformers' zero-shot-image-classification pipeline (CLIP-style: softmax over the ITC logits of the image
    and each label's prompt), checking `candidate_labels` first: transformers' own fails on an empty list with an
    IndexError from inside the tokenizer. `save_pipeline_files` declares it for the task in config.json."""

    def preprocess(self, image: Any, candidate_labels: Any = None, *args: Any, **kwargs: Any) -> Any:
        labels = [candidate_labels] if isinstance(candidate_labels, str) else candidate_labels
        if not isinstance(labels, (list, tuple)) or not labels:
            raise ValueError(f"candidate_labels must be a non-empty list of labels (str), got {candidate_labels!r}")
        bad = [label for label in labels if not isinstance(label, str)]
        if bad:
            raise TypeError(f"candidate_labels must be strings, got {type(bad[0]).__name__} {bad[0]!r}")
        return super().preprocess(image, candidate_labels, *args, **kwargs)


def _add_zero_shot_auto_map(model: Any) -> None:
    """Maps AutoModelForZeroShotImageClassification (if unmapped) in a remote-code model's config `auto_map`.

    The target is the config's `AutoModel` entry, else the model's own class when it is registered for an auto
    class (its file is then copied by `save_pretrained`). Models that are not remote code are left alone.
    """
    config = model.config
    auto_map = dict(getattr(config, "auto_map", None) or {})
    if ZERO_SHOT_AUTO_CLASS in auto_map:
        return
    target = auto_map.get("AutoModel")
    if target is None and getattr(type(model), "_auto_class", None) is not None:
        target = f"{type(model).__module__.split('.')[-1]}.{type(model).__name__}"
    if target is not None:
        config.auto_map = {**auto_map, ZERO_SHOT_AUTO_CLASS: target}


def save_pipeline_files(model_dir: str | os.PathLike) -> None:
    """Makes a saved model folder pipeline-ready: adds `custom_pipelines` to its config.json and copies this file
    and `processing_efficientvlm.py` and `index_efficientvlm.py`, which it imports (all of one version).

    Use it after `model.save_pretrained(model_dir)` and `processor.save_pretrained(model_dir)` (an alternative to
    `ImageTextRetrievalPipeline(...).save_pretrained`). It also maps `AutoModelForZeroShotImageClassification` in
    the config's `auto_map` to the `AutoModel` class when missing.

    Args:
        model_dir: a folder holding config.json (with an `auto_map`), the model weights and the processor files.

    Raises:
        FileNotFoundError: when `model_dir` has no config.json.
    """
    folder = Path(model_dir)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: save the model into {folder} first")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    module = Path(__file__).stem
    config["custom_pipelines"] = {
        **(config.get("custom_pipelines") or {}),
        TASK: {"impl": f"{module}.{ImageTextRetrievalPipeline.__name__}", "pt": ["AutoModel"], "type": "multimodal"},
    }
    config["custom_pipelines"][ZERO_SHOT_TASK] = {  # transformers' own, with its candidate_labels checked
        "impl": f"{module}.{EfficientVLMZeroShotImageClassificationPipeline.__name__}", "pt": [ZERO_SHOT_AUTO_CLASS],
        "type": "multimodal",
    }
    if config.get("decoder_config"):  # a VQA model (answer decoder): the visual-question-answering pipeline too
        config["custom_pipelines"][VQA_TASK] = {
            "impl": f"{module}.{VisualQuestionAnsweringPipeline.__name__}", "pt": [VQA_AUTO_CLASS], "type": "multimodal"
        }
    auto_map = config.get("auto_map") or {}
    if "AutoModel" in auto_map and ZERO_SHOT_AUTO_CLASS not in auto_map:
        auto_map[ZERO_SHOT_AUTO_CLASS] = auto_map["AutoModel"]
        config["auto_map"] = auto_map
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for source in (Path(__file__), *(Path(__file__).with_name(n) for n in ("processing_efficientvlm.py",
                                                                           "index_efficientvlm.py"))):
        destination = folder / source.name
        if source.resolve() != destination.resolve():
            shutil.copyfile(source, destination)


# `pipe.save_pretrained` turns this registration into config.json's "custom_pipelines" entry.
PIPELINE_REGISTRY.register_pipeline(
    TASK, pipeline_class=ImageTextRetrievalPipeline, pt_model=AutoModel, type="multimodal"
)

PIPELINE_REGISTRY.register_pipeline(
    VQA_TASK, pipeline_class=VisualQuestionAnsweringPipeline, pt_model=AutoModelForVisualQuestionAnswering,
    type="multimodal",
)

__all__ = [
    "EfficientVLMZeroShotImageClassificationPipeline", "ImageTextRetrievalPipeline", "VisualQuestionAnsweringPipeline",
    "save_pipeline_files",
]
