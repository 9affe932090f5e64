"""Evaluation: image-text retrieval (ITC ranking + ITM re-ranking, ALBEF/X-VLM protocol) and NLVR2 accuracy.

Retrieval protocol (REFERENCE.md §4): ITC cosine similarity for every (image, text) pair; for each query the top-k
candidates by ITC are re-scored by the ITM head and every other candidate gets −100. Text retrieval (TR) ranks the
texts of each image and counts the best-ranked of its ground-truth captions; image retrieval (IR) ranks the images
of each text. R@1/5/10 are in percent and r_mean is the mean of the six.

The same metric is a local `evaluate` module (`training/metrics/retrieval`, see `load_retrieval_metric`), so a
Trainer's `compute_metrics` and users' scripts share this one implementation.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

NOT_CANDIDATE_SCORE = -100.0  # X-VLM's score for pairs outside a query's top-k (below any re-scored candidate)
RECALL_AT = (1, 5, 10)
METRIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metrics", "retrieval")

ItmScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# ---------------------------------------------------------------------------------------------------------- metrics


def _as_float_array(scores: torch.Tensor | np.ndarray | Sequence, name: str) -> np.ndarray:
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().float().cpu().numpy()
    array = np.asarray(scores, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D score matrix, got shape {array.shape}")
    if np.isnan(array).any():
        raise ValueError(f"{name} contains NaN scores")
    return array


def _check_ground_truth(img2txt: Sequence[Sequence[int]], txt2img: Sequence[int], n_img: int, n_txt: int) -> None:
    """Raises ValueError unless img2txt / txt2img describe the same pairs of an (n_img, n_txt) matrix."""
    if len(img2txt) != n_img or len(txt2img) != n_txt:
        raise ValueError(f"scores are ({n_img}, {n_txt}) but img2txt has {len(img2txt)} images and txt2img "
                         f"{len(txt2img)} texts")
    for image, texts in enumerate(img2txt):
        if len(texts) == 0:
            raise ValueError(f"img2txt[{image}] is empty: every image needs at least one caption")
        for text in texts:
            if not 0 <= int(text) < n_txt or int(txt2img[text]) != image:
                raise ValueError(f"img2txt[{image}] lists text {text} but txt2img disagrees (or it is out of range)")
    bad = [j for j, image in enumerate(txt2img) if not 0 <= int(image) < n_img or j not in img2txt[int(image)]]
    if bad:
        raise ValueError(f"txt2img of texts {bad[:5]} does not match img2txt")


def _ranks(scores: np.ndarray, positives: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """0-based rank of each row's best-scored positive.

    Ties are resolved against the positives: rank = number of negatives scoring >= the best positive, so constant
    scores (an untrained model, or a positive left at −100 outside the top-k) never count as hits.

    Args:
        scores: (Q, C) query-by-candidate scores.
        positives: (Q, C) bool, the ground-truth candidates of each query (at least one per row).

    Returns:
        (Q,) int ranks.
    """
    ranks = np.empty(scores.shape[0], dtype=np.int64)
    for start in range(0, scores.shape[0], chunk):  # chunks bound memory on 5k x 25k COCO matrices
        s, p = scores[start : start + chunk], positives[start : start + chunk]
        best = np.where(p, s, -np.inf).max(axis=1, keepdims=True)
        ranks[start : start + chunk] = ((s >= best) & ~p).sum(axis=1)
    return ranks


def _recalls(ranks: np.ndarray, prefix: str) -> dict[str, float]:
    metrics = {f"{prefix}_r{k}": float(100.0 * (ranks < k).mean()) for k in RECALL_AT}
    metrics[f"{prefix}_r_mean"] = float(np.mean([metrics[f"{prefix}_r{k}"] for k in RECALL_AT]))
    return metrics


def retrieval_metrics(
    scores_i2t: torch.Tensor | np.ndarray | Sequence,
    img2txt: Sequence[Sequence[int]],
    txt2img: Sequence[int],
    scores_t2i: torch.Tensor | np.ndarray | Sequence | None = None,
) -> dict[str, float]:
    """TR / IR recall at 1, 5, 10 (percent) and their means.

    Args:
        scores_i2t: (N_img, N_txt) image-to-text scores (higher = better match).
        img2txt: per image, the indices of its ground-truth captions.
        txt2img: per text, the index of its image.
        scores_t2i: (N_txt, N_img) text-to-image scores; defaults to `scores_i2t.T` (they differ after ITM
            re-ranking, where each direction re-scores its own top-k).

    Returns:
        dict with txt_r1, txt_r5, txt_r10, txt_r_mean, img_r1, img_r5, img_r10, img_r_mean and r_mean (mean of six).
    """
    i2t = _as_float_array(scores_i2t, "scores_i2t")
    t2i = i2t.T if scores_t2i is None else _as_float_array(scores_t2i, "scores_t2i")
    if t2i.shape != i2t.shape[::-1]:
        raise ValueError(f"scores_t2i must be {i2t.shape[::-1]}, got {t2i.shape}")
    n_img, n_txt = i2t.shape
    _check_ground_truth(img2txt, txt2img, n_img, n_txt)
    txt_of_img = np.zeros((n_img, n_txt), dtype=bool)
    txt_of_img[np.asarray(txt2img, dtype=np.int64), np.arange(n_txt)] = True
    metrics = {**_recalls(_ranks(i2t, txt_of_img), "txt"), **_recalls(_ranks(t2i, txt_of_img.T), "img")}
    metrics["r_mean"] = (metrics["txt_r_mean"] + metrics["img_r_mean"]) / 2  # = mean of the six recalls
    return metrics


def make_retrieval_compute_metrics(
    img2txt: Sequence[Sequence[int]], txt2img: Sequence[int]
) -> Callable[[Any], dict[str, float]]:
    """A Trainer `compute_metrics` for a prediction step that yields the (N_img, N_txt) score matrix.

    Args:
        img2txt / txt2img: the ground truth of the evaluation set (see `retrieval_metrics`).

    Returns:
        fn(EvalPrediction) -> retrieval metrics; a tuple of predictions uses its first element.
    """

    def compute_metrics(eval_prediction: Any) -> dict[str, float]:
        scores = getattr(eval_prediction, "predictions", eval_prediction)
        if isinstance(scores, (tuple, list)) and scores and np.ndim(scores[0]) == 2:
            scores = scores[0]
        return retrieval_metrics(scores, img2txt, txt2img)

    return compute_metrics


def load_retrieval_metric(**kwargs: Any) -> Any:
    """The retrieval metric as an `evaluate` module loaded from this package's local copy (no Hub access).

    `metric.compute(predictions=score_rows, references=img2txt)` where `score_rows` is the (N_img, N_txt) matrix as
    rows and `references[i]` lists image i's caption indices; optional compute kwargs `txt2img` and `scores_t2i`.
    """
    import evaluate

    return evaluate.load(METRIC_DIR, **kwargs)


# -------------------------------------------------------------------------------------------------------- re-ranking


def _topk_pairs(sim: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows × their top-k columns of `sim` (Q, C) as flat (query, candidate) index tensors, each (Q * k,)."""
    top = sim.topk(k, dim=1).indices
    queries = torch.arange(sim.shape[0], device=sim.device).repeat_interleave(k)
    return queries, top.reshape(-1)


def _score_unique_pairs(
    pair_ids: torch.Tensor, n_txt: int, itm_score_fn: ItmScoreFn, batch_size: int, show_progress: bool
) -> torch.Tensor:
    """ITM scores (P,) of flat pair ids (image * n_txt + text), calling `itm_score_fn` in batches."""
    scores = torch.empty(pair_ids.numel(), dtype=torch.float32, device=pair_ids.device)
    starts = range(0, pair_ids.numel(), batch_size)
    for start in tqdm(starts, desc="ITM re-ranking", disable=not show_progress):
        ids = pair_ids[start : start + batch_size]
        batch = itm_score_fn(ids // n_txt, ids % n_txt).reshape(-1)
        if batch.numel() != ids.numel():
            raise ValueError(f"itm_score_fn returned {batch.numel()} scores for {ids.numel()} pairs")
        scores[start : start + ids.numel()] = batch.to(scores)
    return scores


def rerank_scores(
    sim_i2t: torch.Tensor,
    k: int,
    itm_score_fn: ItmScoreFn,
    batch_size: int = 32,
    show_progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ALBEF/X-VLM re-ranking: each query's top-k ITC candidates get their ITM score, all others −100.

    A pair in the top-k of both its image and its text is scored once, so `itm_score_fn` sees at most
    N_img * k + N_txt * k pairs (never N_img * N_txt).

    Args:
        sim_i2t: (N_img, N_txt) ITC similarities.
        k: candidates per query; 0 = ITC only (scores = similarities); clamped to the gallery size.
        itm_score_fn: fn(image_idx (P,) long, text_idx (P,) long) -> (P,) match scores; they must exceed −100
            (e.g. a match probability, or the match-minus-no-match logit used by `evaluate_retrieval`).
        batch_size: pairs per `itm_score_fn` call.
        show_progress: show a tqdm bar over the ITM batches.

    Returns:
        scores_i2t (N_img, N_txt) and scores_t2i (N_txt, N_img), float32 on `sim_i2t`'s device.
    """
    if k < 0 or batch_size < 1:
        raise ValueError(f"need k >= 0 and batch_size >= 1, got k={k}, batch_size={batch_size}")
    sim = sim_i2t.detach().float()
    if k == 0 or sim.numel() == 0:
        return sim.clone(), sim.t().clone()
    n_img, n_txt = sim.shape
    img_q, txt_c = _topk_pairs(sim, min(k, n_txt))
    txt_q, img_c = _topk_pairs(sim.t(), min(k, n_img))
    i2t_ids, t2i_ids = img_q * n_txt + txt_c, img_c * n_txt + txt_q
    unique_ids, inverse = torch.unique(torch.cat([i2t_ids, t2i_ids]), return_inverse=True)
    unique_scores = _score_unique_pairs(unique_ids, n_txt, itm_score_fn, batch_size, show_progress)
    pair_scores = unique_scores[inverse]
    scores_i2t = torch.full_like(sim, NOT_CANDIDATE_SCORE)
    scores_t2i = torch.full_like(sim.t(), NOT_CANDIDATE_SCORE)
    scores_i2t[img_q, txt_c] = pair_scores[: i2t_ids.numel()]
    scores_t2i[txt_q, img_c] = pair_scores[i2t_ids.numel() :]
    return scores_i2t, scores_t2i


# -------------------------------------------------------------------------------------------------------- retrieval


def _model_device_dtype(model: torch.nn.Module, device: torch.device | str | None) -> tuple[torch.device, Any]:
    parameter = next(model.parameters())
    return torch.device(device) if device is not None else parameter.device, parameter.dtype


def _encode_images(model, images: list, processor, batch_size: int, pruning_masks, device, dtype,
                   show_progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Image tokens (N_img, 1 + N, D_vision) and ITC embeddings (N_img, E), both on `device`."""
    tokens, embeds = [], []
    for start in tqdm(range(0, len(images), batch_size), desc="Encoding images", disable=not show_progress):
        pixel_values = processor(images=list(images[start : start + batch_size]))["pixel_values"]
        out = model.encode_image(pixel_values.to(device=device, dtype=dtype), pruning_masks=pruning_masks)
        tokens.append(out.last_hidden_state)
        embeds.append(model.image_itc_embeds(out.last_hidden_state))
    return torch.cat(tokens), torch.cat(embeds)


def _encode_texts(model, captions: list[str], processor, batch_size: int, max_length: int, pruning_masks, device,
                  show_progress: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Text tokens (N_txt, T, D_text), attention mask (N_txt, T) and ITC embeddings (N_txt, E), on `device`."""
    # one tokenizer call pads every caption to the same T, so the cache is a single tensor to gather from
    encoded = processor(text=list(captions), padding="longest", truncation=True, max_length=max_length)
    input_ids, mask = encoded["input_ids"].to(device), encoded["attention_mask"].to(device)
    tokens, embeds = [], []
    for start in tqdm(range(0, len(captions), batch_size), desc="Encoding texts", disable=not show_progress):
        ids, m = input_ids[start : start + batch_size], mask[start : start + batch_size]
        length = int(m.sum(1).max())  # trim to this batch's longest caption (right padding)
        out = model.encode_text(ids[:, :length], m[:, :length], pruning_masks=pruning_masks).last_hidden_state
        tokens.append(torch.nn.functional.pad(out, (0, 0, 0, mask.shape[1] - length)))
        embeds.append(model.text_itc_embeds(out))
    return torch.cat(tokens), mask, torch.cat(embeds)


def _cached_itm_score_fn(model, image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor,
                         pruning_masks) -> ItmScoreFn:
    """ITM match score of cached (image, text) token pairs: logit(match) − logit(no match).

    X-VLM ranks by the class-1 output; the logit difference is the log-odds of the softmax match probability, so it
    orders candidates exactly as that probability does, matches `score_pairs`, and stays far above −100.
    """

    def score(image_idx: torch.Tensor, text_idx: torch.Tensor) -> torch.Tensor:
        mask = text_mask[text_idx]
        length = int(mask.sum(1).max())
        logits, _ = model.itm_logits(text_tokens[text_idx, :length], mask[:, :length], image_tokens[image_idx],
                                     pruning_masks=pruning_masks)
        return logits[:, 1] - logits[:, 0]

    return score


def evaluate_retrieval(
    model: torch.nn.Module,
    images: Sequence,
    captions: Sequence[str],
    img2txt: Sequence[Sequence[int]],
    txt2img: Sequence[int],
    processor: Any,
    k: int = 16,
    batch_size: int = 32,
    pruning_masks: Any = None,
    device: torch.device | str | None = None,
    show_progress: bool = True,
    max_length: int = 40,
) -> dict[str, float]:
    """Image-text retrieval with ITC ranking and ITM re-ranking of each query's top-k (X-VLM protocol).

    Image and text tokens are encoded once and cached on `device`; re-ranking gathers them by index and runs only
    the fusion encoder + ITM head (at most N_img * k + N_txt * k pairs).

    Args:
        model: an `EfficientVLMForImageTextRetrieval` (an `EfficientVLMModel` suffices when k = 0).
        images: N_img PIL images.
        captions: N_txt captions.
        img2txt / txt2img: ground truth (see `retrieval_metrics`).
        processor: callable as `processor(images=[PIL])` -> {"pixel_values"} and `processor(text=[str], padding=,
            truncation=, max_length=)` -> {"input_ids", "attention_mask"} (an `EfficientVLMProcessor`).
        k: ITM candidates per query (COCO 256, Flickr 128 in the paper); 0 = ITC only.
        batch_size: images / texts / pairs per forward.
        pruning_masks: optional `PruningMasks` applied to every encoder (a gated model at its masks).
        device: where to run; default the model's device.
        show_progress: tqdm bars.
        max_length: caption truncation length in tokens (X-VLM: 40).

    Returns:
        `retrieval_metrics` of the re-ranked scores, plus the same keys suffixed `_itc` for ITC-only ranking.
    """
    if len(images) != len(img2txt) or len(captions) != len(txt2img):
        raise ValueError(f"{len(images)} images / {len(captions)} captions do not match img2txt ({len(img2txt)}) / "
                         f"txt2img ({len(txt2img)})")
    if k > 0 and not hasattr(model, "itm_logits"):
        raise ValueError(f"k={k} needs a model with an ITM head (itm_logits); use k=0 for ITC-only retrieval")
    device, dtype = _model_device_dtype(model, device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            image_tokens, image_embeds = _encode_images(model, list(images), processor, batch_size, pruning_masks,
                                                        device, dtype, show_progress)
            text_tokens, text_mask, text_embeds = _encode_texts(model, list(captions), processor, batch_size,
                                                                max_length, pruning_masks, device, show_progress)
            sim = image_embeds.float() @ text_embeds.float().t()  # cosine: the temperature does not change ranks
            score_fn = _cached_itm_score_fn(model, image_tokens, text_tokens, text_mask, pruning_masks)
            scores_i2t, scores_t2i = rerank_scores(sim, k, score_fn, batch_size, show_progress)
    finally:
        model.train(was_training)
    metrics = retrieval_metrics(scores_i2t, img2txt, txt2img, scores_t2i)
    itc = retrieval_metrics(sim, img2txt, txt2img)
    return {**metrics, **{f"{key}_itc": value for key, value in itc.items()}}


# ------------------------------------------------------------------------------------------------------------ NLVR2


def evaluate_nlvr2(
    model: torch.nn.Module,
    items: Sequence[dict],
    processor: Any,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    show_progress: bool = True,
    max_length: int = 40,
    pruning_masks: Any = None,
) -> dict[str, float]:
    """NLVR2 accuracy (percent) of a model with `forward(pixel_values (B, 2, C, H, W), input_ids, attention_mask)`
    returning `.logits` (B, 2) (index 1 = statement true).

    Args:
        model: the NLVR2 classifier.
        items: {"images": [left, right], "sentence": str, "label": 0 | 1} (see `training.collators.NLVR2Collator`).
        processor: an `EfficientVLMProcessor`-like callable.
        batch_size: items per forward.
        device: where to run; default the model's device.
        show_progress: tqdm bar.
        max_length: statement truncation length in tokens.
        pruning_masks: passed to the model's forward when given.

    Returns:
        {"accuracy": percent correct}.
    """
    from .collators import NLVR2Collator

    if len(items) == 0:
        raise ValueError("evaluate_nlvr2 needs at least one item")
    device, dtype = _model_device_dtype(model, device)
    collate = NLVR2Collator(processor, max_length=max_length)
    extra = {} if pruning_masks is None else {"pruning_masks": pruning_masks}
    was_training, correct = model.training, 0
    model.eval()
    try:
        with torch.no_grad():
            for start in tqdm(range(0, len(items), batch_size), desc="NLVR2", disable=not show_progress):
                batch = collate(list(items[start : start + batch_size]))
                logits = model(pixel_values=batch["pixel_values"].to(device=device, dtype=dtype),
                               input_ids=batch["input_ids"].to(device),
                               attention_mask=batch["attention_mask"].to(device), **extra).logits
                correct += int((logits.argmax(-1).cpu() == batch["labels"]).sum())
    finally:
        model.train(was_training)
    return {"accuracy": 100.0 * correct / len(items)}


__all__ = [
    "evaluate_nlvr2", "evaluate_retrieval", "load_retrieval_metric", "make_retrieval_compute_metrics",
    "rerank_scores", "retrieval_metrics",
]
