"""Scoring a segmenter on a split, the threshold baseline, and overlay pictures."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segflow.baseline import otsu_segment
from segflow.images import write_png
from segflow.inference import Segmenter, to_channels, to_unit_range
from segflow.masks import outline
from segflow.metrics import confusion, summarize
from segflow.training import Sample

TRUE_COLOUR = (0, 220, 0)  # green: ground-truth outlines
PRED_COLOUR = (255, 0, 200)  # magenta: predicted outlines


def score_split(segmenter: Segmenter, samples: list[Sample], split: str) -> tuple[dict, list[dict], list]:
    """Predict every sample and score it.

    Returns:
        (summary of mean scores, one row per image, the predictions in sample order).
    """
    predictions = segmenter.predict([s.image for s in samples])
    counts = [confusion(p.mask, s.mask) for p, s in zip(predictions, samples, strict=True)]
    rows = [
        {"split": split, "image": s.id, **{k: round(v, 6) for k, v in c.scores().items()}}
        for s, c in zip(samples, counts, strict=True)
    ]
    return summarize(counts), rows, predictions


def threshold_baseline(val: list[Sample], test: list[Sample]) -> dict:
    """Otsu per image; its polarity (dark or bright cells) is chosen on val, scored on test."""

    def dice(samples, side):
        return summarize([confusion(otsu_segment(s.image, side), s.mask) for s in samples])

    side = max(("dark", "bright"), key=lambda s: dice(val, s)["dice"])
    return {"method": "otsu", "foreground": side, "test": dice(test, side)}


def overlay(image: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: the image in gray with true (green) and predicted (magenta) outlines."""
    gray = (to_channels(to_unit_range(image), 1)[0] * 255).astype(np.uint8)
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
