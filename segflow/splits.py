"""Deterministic, grouped train/val/test splits and the leakage check."""

from __future__ import annotations

import numpy as np
import pandas as pd

SPLITS = ("train", "val", "test")


class LeakageError(ValueError):
    """The same image (or group) appears in more than one split."""


def assign_splits(
    manifest: pd.DataFrame, ratios: dict[str, float], seed: int, group_column: str = "content_hash"
) -> pd.Series:
    """Assign every row to train, val or test.

    Rows sharing `group_column` (by default the pixel-content hash, so identical images)
    always land together. Groups are shuffled with `seed` after sorting, so the result
    depends only on the data and the seed, not on row order.

    Args:
        manifest: one row per image; needs `group_column`.
        ratios: {"train": .., "val": .., "test": ..} summing to 1.
        seed: the shuffle seed.

    Returns:
        A Series of split names aligned with manifest.index.
    """
    groups = np.array(sorted(manifest[group_column].astype(str).unique()))
    n = len(groups)
    if n < 3:
        raise ValueError(f"need at least 3 distinct images to split into train/val/test, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    n_test = max(1, round(n * ratios["test"]))
    n_val = max(1, round(n * ratios["val"]))
    if n_test + n_val >= n:
        raise ValueError(
            f"{n} images leave no training data with split val={ratios['val']}, "
            f"test={ratios['test']}; add images or lower the ratios"
        )
    split_of_group = {}
    for rank, g in enumerate(order):
        split_of_group[groups[g]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return manifest[group_column].astype(str).map(split_of_group).rename("split")


def split_hash(frame: pd.DataFrame) -> str:
    """Identity of a split's contents: changes when any image or mask in it is added, removed or edited."""
    import hashlib

    masks = frame["mask_hash"].astype(str) if "mask_hash" in frame else [""] * len(frame)
    ids, images = frame["id"].astype(str), frame["content_hash"].astype(str)
    items = sorted(f"{i}:{h}:{m}" for i, h, m in zip(ids, images, masks, strict=True))
    return hashlib.sha256("\n".join(items).encode()).hexdigest()


def check_leakage(frames: dict[str, pd.DataFrame], columns: tuple[str, ...] = ("id", "content_hash")) -> None:
    """Raise LeakageError naming the items when any `columns` value is in two splits."""
    for column in columns:
        seen: dict[str, str] = {}
        for split, frame in frames.items():
            for value in frame[column].astype(str):
                if value in seen and seen[value] != split:
                    raise LeakageError(f"{column} {value!r} is in both {seen[value]} and {split}")
                seen[value] = split
