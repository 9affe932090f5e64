"""The held-out split of a JSON training set given without a test set (`--dataset X.json` and no `--eval_dataset`).

Every stage that reads the same file with the same `--holdout_fraction`, `--holdout_max` and `--eval_seed` holds out
the same records, so a student is never trained on the images its teacher was evaluated on.
"""

from __future__ import annotations

import random


def holdout_size(n: int, fraction: float, max_items: int) -> int:
    """How many of `n` records are held out: round(fraction · n), at least 1 and at most `max_items`.

    Raises:
        ValueError: when `n` < 2 (nothing would be left to train on).
    """
    if n < 2:
        raise ValueError(f"holding out a test share needs at least 2 records, the dataset has {n}; "
                         "give a test set with --eval_dataset")
    return max(1, min(int(round(fraction * n)), max_items, n - 1))


def holdout_indices(n: int, fraction: float, max_items: int, seed: int) -> list[int]:
    """The sorted indices (of `n` records) held out for evaluation; deterministic in `seed`."""
    return sorted(random.Random(seed).sample(range(n), holdout_size(n, fraction, max_items)))


def split_rows(ids: list[int], held_out: list[int], keep_held_out: bool) -> list[int]:
    """Row positions whose record id (`ids[row]`) is (keep_held_out=True) or is not in `held_out`."""
    held = set(held_out)
    return [row for row, record in enumerate(ids) if (record in held) == keep_held_out]


def held_out_rows(data, ids, keep_held_out: bool) -> list[int]:
    """Rows of a JSON `--dataset` whose record id (`ids[row]`: the image of a caption pair, or the NLVR2 item; ids
    are 0..K-1) is (keep_held_out=True) or is not held out, by `data`'s --holdout_fraction / --holdout_max /
    --eval_seed — the same records in every stage and task."""
    held_out = holdout_indices(len(set(ids)), data.holdout_fraction, data.holdout_max, data.eval_seed)
    return split_rows(ids, held_out, keep_held_out)


__all__ = ["held_out_rows", "holdout_indices", "holdout_size", "split_rows"]
