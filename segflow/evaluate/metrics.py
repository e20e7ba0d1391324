"""Pixel metrics: Dice, IoU, precision, recall per image and pooled; per class for K classes.

Object metrics (COCO mask AP, the object-count error) are segflow.evaluate.instance_metrics.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SCORES = ("dice", "iou", "precision", "recall")


@dataclass(frozen=True)
class Counts:
    """Pixel confusion counts of one prediction against its truth."""

    tp: int
    fp: int
    fn: int

    def scores(self) -> dict[str, float]:
        """Dice, IoU, precision and recall; an empty truth predicted empty scores 1."""
        tp, fp, fn = self.tp, self.fp, self.fn
        return {
            "dice": _ratio(2 * tp, 2 * tp + fp + fn),
            "iou": _ratio(tp, tp + fp + fn),
            "precision": _ratio(tp, tp + fp, empty=1.0 if fn == 0 else 0.0),
            "recall": _ratio(tp, tp + fn, empty=1.0 if fp == 0 else 0.0),
        }


def _ratio(num: int, den: int, empty: float = 1.0) -> float:
    return float(num) / den if den else empty


def confusion(pred: np.ndarray, truth: np.ndarray) -> Counts:
    """Counts for (H, W) masks where non-zero means foreground."""
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from truth shape {truth.shape}")
    p, t = pred > 0, truth > 0
    return Counts(tp=int((p & t).sum()), fp=int((p & ~t).sum()), fn=int((~p & t).sum()))


def summarize(counts: list[Counts]) -> dict[str, float]:
    """Mean of per-image scores (what papers report) plus pooled Dice over all pixels."""
    if not counts:
        raise ValueError("no images to summarise")
    per_image = [c.scores() for c in counts]
    summary = {name: float(np.mean([s[name] for s in per_image])) for name in SCORES}
    pooled = Counts(sum(c.tp for c in counts), sum(c.fp for c in counts), sum(c.fn for c in counts))
    summary["dice_pooled"] = pooled.scores()["dice"]
    summary["images"] = len(counts)
    return summary


def class_confusions(pred: np.ndarray, truth: np.ndarray, n_classes: int) -> list[Counts]:
    """Counts per foreground class (ids 1..n_classes-1) of (H, W) class-id masks."""
    return [confusion(pred == c, truth == c) for c in range(1, n_classes)]


def summarize_classes(per_image: list[list[Counts]], classes: list[str]) -> dict[str, float]:
    """Scores of a K-class task: each class like a binary task, then their mean.

    Args:
        per_image: for each image, its class_confusions.
        classes: the class names, background first.

    Returns:
        With two classes exactly `summarize` of the foreground class. With more, the plain
        keys (dice, iou, ...) are means over the foreground classes, and `dice_<class>`,
        `iou_<class>` give each class's own score.
    """
    if not per_image:
        raise ValueError("no images to summarise")
    by_class = [summarize([counts[k] for counts in per_image]) for k in range(len(classes) - 1)]
    if len(by_class) == 1:
        return by_class[0]
    summary = {name: float(np.mean([s[name] for s in by_class])) for name in (*SCORES, "dice_pooled")}
    for name, scores in zip(classes[1:], by_class, strict=True):
        summary[f"dice_{name}"] = scores["dice"]
        summary[f"iou_{name}"] = scores["iou"]
    summary["images"] = len(per_image)
    return summary


def image_scores(counts: list[Counts]) -> dict[str, float]:
    """One image's scores: with several foreground classes, the mean over them."""
    scores = [c.scores() for c in counts]
    return {name: float(np.mean([s[name] for s in scores])) for name in SCORES}
