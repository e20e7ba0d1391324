"""Scoring a segmenter on a split, the threshold baseline, and overlay pictures."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segflow.baseline import otsu_segment
from segflow.images import write_png
from segflow.inference import Preprocessing, Segmenter, scale_intensity, to_channels
from segflow.masks import outline
from segflow.metrics import class_confusions, confusion, image_scores, summarize, summarize_classes
from segflow.training import Sample

TRUE_COLOUR = (0, 220, 0)  # green: ground-truth outlines
PRED_COLOUR = (255, 0, 200)  # magenta: predicted outlines


def score_split(segmenter: Segmenter, samples: list[Sample], split: str) -> tuple[dict, list[dict], list]:
    """Predict every sample and score it, per class when there are more than two.

    Returns:
        (summary of mean scores, one row per image, the predictions in sample order).
    """
    classes = list(segmenter.prep.classes)
    predictions = segmenter.predict([s.image for s in samples])
    counts = [
        class_confusions(p.mask, s.mask, len(classes)) for p, s in zip(predictions, samples, strict=True)
    ]
    rows = []
    for sample, per_class in zip(samples, counts, strict=True):
        row = {"split": split, "image": sample.id, **image_scores(per_class)}
        if len(per_class) > 1:
            row |= {
                f"dice_{name}": c.scores()["dice"] for name, c in zip(classes[1:], per_class, strict=True)
            }
        rows.append({k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()})
    summary = summarize_classes(counts, classes)
    if len(classes) > 2:  # comparable with the (foreground-only) threshold baseline
        summary["dice_foreground"] = summarize(
            [confusion(p.mask, s.mask) for p, s in zip(predictions, samples, strict=True)]
        )["dice"]
    return summary, rows, predictions


def threshold_baseline(val: list[Sample], test: list[Sample]) -> dict:
    """Otsu per image, foreground against background; polarity (dark or bright cells) chosen on val."""

    def dice(samples, side):
        return summarize([confusion(otsu_segment(s.image, side), s.mask) for s in samples])

    side = max(("dark", "bright"), key=lambda s: dice(val, s)["dice"])
    return {"method": "otsu", "foreground": side, "test": dice(test, side)}


def overlay(image: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: the image in gray with true (green) and predicted (magenta) outlines."""
    display = Preprocessing(1, 0.0, 1.0, 1, 0.5, scaling="percentile")  # dim 16-bit images visible too
    gray = (np.clip(to_channels(scale_intensity(image, display), 1)[0], 0, 1) * 255).astype(np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    rgb[outline(truth)] = TRUE_COLOUR
    rgb[outline(pred)] = PRED_COLOUR
    return rgb


def write_overlays(folder: Path, samples: list[Sample], predictions: list, count: int) -> None:
    """Replace `folder` with overlays of the first `count` samples (named by sample id)."""
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    for sample, prediction in list(zip(samples, predictions, strict=True))[:count]:
        write_png(folder / f"{sample.id}.png", overlay(sample.image, sample.mask, prediction.mask))
