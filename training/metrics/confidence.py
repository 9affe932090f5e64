"""Confidence intervals for the tasks' metrics: a percentile bootstrap over the evaluated items, single and paired.

An evaluation set is a sample of items (query images for retrieval; questions for VQA, statements for NLVR2, images
for captioning): resampling the items with replacement gives the spread of the metric a different draw of the same
kind of items would show. Two models scored on the same items are compared *paired*: every resample scores both on the
same items, so the interval of the difference excludes the items' shared difficulty (Efron & Tibshirani 1993, ch. 13;
the percentile interval).

Two kinds of input:
- retrieval: the per-query ranks of the retrieval evaluation (`PerQueryRanks`): for each image the 0-based rank of its
  best-ranked caption (text retrieval) and for each caption the rank of its image (image retrieval); an image is
  resampled with all of its captions (`r_mean_ci`, `paired_r_mean_difference`).
- metrics that are the mean of per-item scores (VQA accuracy, NLVR2 accuracy, captioning CIDEr-D: the tasks'
  `evaluate(..., return_per_item=True)`): the per-item scores, in the metric's units (`mean_ci95`,
  `paired_mean_difference`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .retrieval_ranks import RECALL_AT

BOOTSTRAP_RESAMPLES = 2000
CI_LEVEL = 0.95


@dataclass(frozen=True)
class PerQueryRanks:
    """Per-query ranks of one model on one retrieval set.

    Attributes:
        txt_ranks: (N_img,) rank of each image's best caption among all texts (0 = first).
        img_ranks: (N_txt,) rank of each caption's image among all images.
        txt2img: (N_txt,) the image of each caption.
    """

    txt_ranks: np.ndarray
    img_ranks: np.ndarray
    txt2img: np.ndarray

    def hits(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(TR hits (N_img, 3), IR hits per image (N_img, 3) = its captions found at 1/5/10, captions per image)."""
        n_img = len(self.txt_ranks)
        ks = np.asarray(RECALL_AT)
        tr = (self.txt_ranks[:, None] < ks).astype(np.float64)
        ir = np.zeros((n_img, len(ks)))
        np.add.at(ir, self.txt2img, (self.img_ranks[:, None] < ks).astype(np.float64))
        return tr, ir, np.bincount(self.txt2img, minlength=n_img).astype(np.float64)


def _r_means(ranks: PerQueryRanks, weights: np.ndarray) -> np.ndarray:
    """r_mean (percent) of each row of image weights (R, N_img) (how often each image was drawn)."""
    tr, ir, captions = ranks.hits()
    tr_recall = weights @ tr / weights.sum(axis=1, keepdims=True)  # (R, 3)
    ir_recall = weights @ ir / (weights @ captions)[:, None]
    return 100.0 * (tr_recall.sum(axis=1) + ir_recall.sum(axis=1)) / (2 * len(RECALL_AT))


def _resample_weights(n_images: int, resamples: int, seed: int | np.random.Generator) -> np.ndarray:
    """(R, N_img) counts of each image in R bootstrap draws of N_img images with replacement.

    `seed` may be a Generator, to draw R rows in blocks from one stream (the same rows as one draw of all R).
    """
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_images, np.full(n_images, 1.0 / n_images), size=resamples).astype(np.float64)


def _check(ranks: Sequence[PerQueryRanks]) -> int:
    n_img = len(ranks[0].txt_ranks)
    for r in ranks:
        if len(r.txt_ranks) != n_img or not np.array_equal(r.txt2img, ranks[0].txt2img):
            raise ValueError("paired ranks must come from the same retrieval set (same images and captions)")
        if len(r.img_ranks) != len(r.txt2img):
            raise ValueError(f"{len(r.img_ranks)} image ranks for {len(r.txt2img)} captions")
    if n_img < 2:
        raise ValueError("a bootstrap needs at least 2 query images")
    return n_img


def _interval(values: np.ndarray, level: float) -> list[float]:
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


def r_mean_ci(ranks: PerQueryRanks, resamples: int = BOOTSTRAP_RESAMPLES, level: float = CI_LEVEL,
              seed: int = 0) -> list[float]:
    """Percentile bootstrap interval [lo, hi] of r_mean over query images (their captions go with them)."""
    weights = _resample_weights(_check([ranks]), resamples, seed)
    return _interval(_r_means(ranks, weights), level)


def paired_r_mean_difference(a: PerQueryRanks, b: PerQueryRanks, resamples: int = BOOTSTRAP_RESAMPLES,
                             level: float = CI_LEVEL, seed: int = 0) -> dict:
    """r_mean(a) − r_mean(b) on the same images, with its paired bootstrap interval.

    Returns:
        {"mean": the difference on the full set, "ci95": [lo, hi] (at `level`), "resamples": R}.
    """
    n_img = _check([a, b])
    full = np.ones((1, n_img))
    weights = _resample_weights(n_img, resamples, seed)
    difference = _r_means(a, weights) - _r_means(b, weights)
    return {"mean": float((_r_means(a, full) - _r_means(b, full))[0]), "ci95": _interval(difference, level),
            "resamples": resamples}


# ------------------------------------------------------------------------------------- metrics that are item means
_BLOCK_ENTRIES = 1 << 22  # resample weights held at once (32 MiB of float64): R × N would not fit for 10^5 items


def _per_item_scores(*per_item: Sequence[float] | np.ndarray) -> list[np.ndarray]:
    """The per-item score arrays as 1-D float64, checked: finite, the same length, at least 2 items."""
    arrays = [np.asarray(scores, dtype=np.float64) for scores in per_item]
    for scores in arrays:
        if scores.ndim != 1:
            raise ValueError(f"per-item scores must be a 1-D sequence, got shape {scores.shape}")
        if not np.isfinite(scores).all():
            raise ValueError("per-item scores must be finite (got NaN or inf)")
    if len({len(scores) for scores in arrays}) > 1:
        raise ValueError(f"paired per-item scores must score the same items, got lengths "
                         f"{[len(scores) for scores in arrays]}")
    if len(arrays[0]) < 2:
        raise ValueError(f"a bootstrap needs at least 2 items, got {len(arrays[0])}")
    return arrays


def _resampled_means(scores: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """(R,) means of `scores` over R bootstrap draws of its items (weights drawn in blocks from one stream)."""
    if resamples < 1:
        raise ValueError(f"a bootstrap needs at least 1 resample, got {resamples}")
    n = len(scores)
    rng = np.random.default_rng(seed)
    block = max(1, _BLOCK_ENTRIES // n)
    means = [_resample_weights(n, min(block, resamples - start), rng) @ scores / n
             for start in range(0, resamples, block)]
    return np.concatenate(means)


def mean_ci95(per_item: Sequence[float] | np.ndarray, *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
              level: float = CI_LEVEL) -> list[float]:
    """Percentile bootstrap interval [lo, hi] of the mean of per-item scores (items resampled with replacement).

    Args:
        per_item: (N,) one score per evaluated item, in the metric's units (e.g. `evaluate(..., return_per_item=True)`
            of VQA, NLVR2 or captioning: percent), N >= 2.
        resamples: bootstrap resamples R.
        seed: the resampling seed (the same seed draws the same items for every call with the same N).
        level: coverage of the interval (0.95: the 2.5 % and 97.5 % quantiles of the R resampled means).

    Raises:
        ValueError: fewer than 2 items, not 1-D, a non-finite score, or resamples < 1.
    """
    (scores,) = _per_item_scores(per_item)
    return _interval(_resampled_means(scores, resamples, seed), level)


def paired_mean_difference(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, *,
                           resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0, level: float = CI_LEVEL) -> dict:
    """mean(a) − mean(b) of two models' per-item scores on the same items, with its paired bootstrap interval.

    Every resample draws the same items for both models, so the interval excludes the items' shared difficulty.

    Args:
        a, b: (N,) per-item scores of the two models on the same N items in the same order, in the metric's units.
        resamples, seed, level: as in `mean_ci95`.

    Returns:
        {"mean": the difference on the full set, "ci95": [lo, hi] (at `level`), "resamples": R}.

    Raises:
        ValueError: different lengths, fewer than 2 items, not 1-D, a non-finite score, or resamples < 1.
    """
    a, b = _per_item_scores(a, b)
    difference = _resampled_means(a - b, resamples, seed)  # the mean of a − b is the difference of the means
    return {"mean": float(a.mean() - b.mean()), "ci95": _interval(difference, level), "resamples": resamples}


__all__ = ["BOOTSTRAP_RESAMPLES", "CI_LEVEL", "PerQueryRanks", "mean_ci95", "paired_mean_difference",
           "paired_r_mean_difference", "r_mean_ci"]
