"""Confidence intervals for retrieval recall: a percentile bootstrap over query images, single and paired.

A retrieval set is a sample of images (each with its captions): resampling the images with replacement (and with
each image all of its captions) gives the spread of r_mean a different draw of the same kind of images would show.
Two models scored on the same images are compared *paired*: every resample scores both on the same images, so the
interval of the difference excludes the images' shared difficulty (Efron & Tibshirani 1993, ch. 13; the percentile
interval).

Inputs are the per-query ranks of the retrieval evaluation (`PerQueryRanks`): for each image the 0-based rank of its
best-ranked caption (text retrieval) and for each caption the rank of its image (image retrieval).
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


def _resample_weights(n_images: int, resamples: int, seed: int) -> np.ndarray:
    """(R, N_img) counts of each image in R bootstrap draws of N_img images with replacement."""
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


__all__ = ["BOOTSTRAP_RESAMPLES", "CI_LEVEL", "PerQueryRanks", "paired_r_mean_difference", "r_mean_ci"]
