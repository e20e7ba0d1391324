"""A classical reference: one global Otsu threshold per image.

Reported beside the model in reports/metrics.json so a trained model must show it beats
what a threshold already does on the same test images.
"""

from __future__ import annotations

import numpy as np

from segflow.inference import to_channels, to_unit_range


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of float values (maximises between-class variance)."""
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(hist)
    weight_high = weight_low[-1] - weight_low
    mean_low = np.cumsum(hist * centres) / np.maximum(weight_low, 1)
    mean_high = (np.sum(hist * centres) - np.cumsum(hist * centres)) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(centres[int(np.argmax(between))])


def otsu_segment(image: np.ndarray, foreground: str) -> np.ndarray:
    """(H, W) uint8 mask: pixels on the `foreground` side ("dark" or "bright") of Otsu."""
    gray = to_channels(to_unit_range(image), 1)[0]
    t = otsu_threshold(gray)
    return ((gray < t) if foreground == "dark" else (gray > t)).astype(np.uint8)
