"""Deterministic, grouped train/val/test splits and the leakage check."""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from segflow.errors import UserError

SPLITS = ("train", "val", "test")


class LeakageError(UserError):
    """The same image (or group) appears in more than one split."""


def group_keys(manifest: pd.DataFrame, regex: str | None = None, column: str | None = None) -> pd.Series:
    """The group of every row: images of one group never land in two splits.

    The group comes from `regex` on the image file name (its first capture group, or the
    whole match), or from a manifest `column`, or else is the image itself. Images with
    identical pixels are always merged into one group as well, so a duplicate can never
    leak across splits under another group's name.

    Raises:
        ValueError: the regex matches no part of some file names, or the column is missing.
    """
    if regex is not None:
        pattern = re.compile(regex)
        names = manifest["image"].astype(str).map(lambda p: PurePosixPath(p).name)
        found = names.map(pattern.search)
        unmatched = names[found.isna()].tolist()
        if unmatched:
            raise UserError(
                f"split.group_regex {regex!r} matches no part of {len(unmatched)} file name(s), "
                f"e.g. {unmatched[:3]}; every image needs a group"
            )
        labels = found.map(lambda m: m.group(1) if m.re.groups else m.group(0))
    elif column is not None:
        if column not in manifest:
            raise UserError(f"split.group_column {column!r} is not a manifest column: {list(manifest)}")
        labels = manifest[column].astype(str)
    else:
        labels = manifest["content_hash"].astype(str)
    return _merge_duplicates(labels.astype(str), manifest["content_hash"].astype(str)).rename("group")


def _merge_duplicates(labels: pd.Series, hashes: pd.Series) -> pd.Series:
    """Union of groups that share an image hash; each merged group is named by its smallest label."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    first_label_of_hash: dict[str, str] = {}
    for label, digest in zip(labels, hashes, strict=True):
        other = first_label_of_hash.setdefault(digest, label)
        a, b = find(label), find(other)
        if a != b:
            parent[max(a, b)] = min(a, b)
    return labels.map(find)


def assign_splits(
    manifest: pd.DataFrame,
    ratios: dict[str, float],
    seed: int,
    group_column: str = "content_hash",
    stratify_column: str | None = None,
) -> pd.Series:
    """Assign every row to train, val or test.

    Rows sharing `group_column` (by default the pixel-content hash, so identical images)
    always land together. Groups are shuffled with `seed` after sorting, so the result
    depends only on the data and the seed, not on row order.

    Args:
        manifest: one row per image; needs `group_column`.
        ratios: {"train": .., "val": .., "test": ..} summing to 1.
        seed: the shuffle seed.
        group_column: the column naming each row's group.
        stratify_column: when given (e.g. "foreground_fraction"), every split gets groups
            from the whole range of this value's group means, in proportion.

    Returns:
        A Series of split names aligned with manifest.index.
    """
    keys = manifest[group_column].astype(str)
    groups = np.array(sorted(keys.unique()))
    n = len(groups)
    if n < 3:
        raise UserError(f"need at least 3 distinct images (or groups) to split into train/val/test, got {n}")
    n_test = max(1, round(n * ratios["test"]))
    n_val = max(1, round(n * ratios["val"]))
    if n_test + n_val >= n:
        raise UserError(
            f"{n} images (or groups) leave no training data with split val={ratios['val']}, "
            f"test={ratios['test']}; add images or lower the ratios"
        )
    rng = np.random.default_rng(seed)
    if stratify_column is None:
        split_of_group = {}
        for rank, g in enumerate(rng.permutation(n)):
            split = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
            split_of_group[groups[g]] = split
    else:
        means = manifest.groupby(keys)[stratify_column].mean().reindex(groups).to_numpy()
        quotas = {"test": n_test, "val": n_val, "train": n - n_test - n_val}
        split_of_group = _stratified(groups, means, quotas, rng)
    return keys.map(split_of_group).rename("split")


def _stratified(groups: np.ndarray, values: np.ndarray, quotas: dict[str, int], rng) -> dict[str, str]:
    """Deal groups, in order of `values` (shuffled within small windows), to the split
    furthest below its share so far: each split spans the whole range of values."""
    order = np.argsort(values, kind="stable")
    window = max(2, int(np.ceil(len(groups) / min(quotas.values()))))
    for start in range(0, len(order), window):
        order[start : start + window] = rng.permutation(order[start : start + window])
    total = sum(quotas.values())
    given = dict.fromkeys(quotas, 0)
    result = {}
    for dealt, index in enumerate(order, start=1):
        open_splits = [s for s in quotas if given[s] < quotas[s]]
        split = max(open_splits, key=lambda s: (quotas[s] * dealt / total - given[s], -SPLITS.index(s)))
        given[split] += 1
        result[groups[index]] = split
    return result


def assign_from_file(manifest: pd.DataFrame, path: Path) -> pd.Series:
    """Splits a user chose: a CSV with columns `image` (file name or id) and `split`.

    Raises:
        ValueError: naming missing or unknown images, unknown split names, or a bad file.
    """
    if not path.is_file():
        raise UserError(f"split.split_file {path} not found")
    table = pd.read_csv(path, dtype=str)
    if not {"image", "split"} <= set(table.columns):
        raise UserError(f"{path} needs columns 'image' and 'split'; it has {list(table.columns)}")
    bad = sorted(set(table["split"]) - set(SPLITS))
    if bad:
        raise UserError(f"{path}: unknown split name(s) {bad}; use {', '.join(SPLITS)}")
    chosen = {PurePosixPath(str(k)).stem: v for k, v in zip(table["image"], table["split"], strict=True)}
    ids = manifest["id"].astype(str)
    missing = sorted(set(ids) - set(chosen))
    if missing:
        raise UserError(f"{path} does not list {len(missing)} image(s), e.g. {missing[:5]}; list them all")
    unknown = sorted(set(chosen) - set(ids))
    if unknown:
        raise UserError(f"{path} lists {len(unknown)} image(s) not in the dataset, e.g. {unknown[:5]}")
    return ids.map(chosen).rename("split")


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
