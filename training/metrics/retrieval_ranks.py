"""The retrieval metric's maths: TR / IR recall at 1, 5, 10 and r_mean from score matrices (ALBEF / X-VLM protocol:
TR counts the best-ranked ground-truth caption of each image, IR the rank of each text's image; a tie counts against
the ground truth). Also a local `evaluate` module (`training/metrics/retrieval`, see `load_retrieval_metric`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from modeling_efficientvlm.modeling_efficientvlm import RERANK_BLOCK_SCORES

RECALL_AT = (1, 5, 10)
METRIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "retrieval")


def _as_float_array(scores: torch.Tensor | np.ndarray | Sequence, name: str) -> np.ndarray:
    """`scores` as a 2-D float array without a copy where possible: float32 stays float32 (a 5k × 25k matrix is
    500 MB; float64 would double it), other dtypes become float64 (exact for ints), torch float16/bfloat16 float32."""
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu()
        scores = (scores if scores.dtype in (torch.float32, torch.float64) else scores.float()).numpy()
    array = np.asarray(scores)
    if array.dtype not in (np.float32, np.float64):
        array = array.astype(np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D score matrix, got shape {array.shape}")
    return array


def check_ground_truth(img2txt: Sequence[Sequence[int]], txt2img: Sequence[int], n_img: int, n_txt: int) -> None:
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


def best_positive_ranks(scores: np.ndarray, positives: Sequence[Sequence[int]], name: str) -> np.ndarray:
    """0-based rank of each row's best-scored positive, a block of rows at a time (memory: a few block-sized
    temporaries, never a copy of the matrix).

    Ties are resolved against the positives: rank = number of negatives scoring >= the best positive, so constant
    scores (an untrained model) never count as hits.

    Args:
        scores: (Q, C) query-by-candidate scores (a view is fine, e.g. the transpose of the other direction).
        positives: per query, the indices of its ground-truth candidates (at least one each).
        name: what `scores` is, for the NaN error.

    Returns:
        (Q,) int ranks.
    """
    n_queries, n_candidates = scores.shape
    step = max(1, RERANK_BLOCK_SCORES // max(n_candidates, 1))
    ranks = np.empty(n_queries, dtype=np.int64)
    for start in range(0, n_queries, step):
        block, rows = scores[start : start + step], positives[start : start + step]
        if np.isnan(block).any():
            raise ValueError(f"{name} contains NaN scores (in rows {start}..{start + len(block) - 1})")
        mask = np.zeros(block.shape, dtype=bool)  # (B, C) the block's positives
        mask[np.repeat(np.arange(len(rows)), [len(p) for p in rows]),
             np.concatenate([np.asarray(p, dtype=np.int64) for p in rows])] = True
        best = np.where(mask, block, -np.inf).max(axis=1, keepdims=True)
        ranks[start : start + len(block)] = ((block >= best) & ~mask).sum(axis=1)
    return ranks


def _recalls(ranks: np.ndarray, prefix: str) -> dict[str, float]:
    metrics = {f"{prefix}_r{k}": float(100.0 * (ranks < k).mean()) for k in RECALL_AT}
    metrics[f"{prefix}_r_mean"] = float(np.mean([metrics[f"{prefix}_r{k}"] for k in RECALL_AT]))
    return metrics


def recall_metrics(txt_ranks: np.ndarray, img_ranks: np.ndarray) -> dict[str, float]:
    """TR recalls from the ranks of each image's best caption, IR recalls from each caption's image, r_mean."""
    metrics = {**_recalls(txt_ranks, "txt"), **_recalls(img_ranks, "img")}
    metrics["r_mean"] = (metrics["txt_r_mean"] + metrics["img_r_mean"]) / 2  # = mean of the six recalls
    return metrics


def image_of_text(txt2img: Sequence[int]) -> np.ndarray:
    """(N_txt, 1) the ground-truth image of each text, as the t2i `positives` of `best_positive_ranks`."""
    return np.asarray(txt2img, dtype=np.int64).reshape(-1, 1)


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
    check_ground_truth(img2txt, txt2img, *i2t.shape)
    return recall_metrics(best_positive_ranks(i2t, img2txt, "scores_i2t"), best_positive_ranks(t2i, image_of_text(txt2img), "scores_t2i"))


def make_retrieval_compute_metrics(
    img2txt: Sequence[Sequence[int]], txt2img: Sequence[int]
) -> Callable[[Any], dict[str, float]]:
    """A Trainer `compute_metrics` for a prediction step that yields the (N_img, N_txt) score matrix."""

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
