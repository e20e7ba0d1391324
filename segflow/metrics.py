"""Segmentation metrics: Dice, IoU, precision, recall (binary, per image and pooled)."""

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
