"""A classical reference: a global Otsu threshold per image, objects split by a distance-transform watershed.

Reported beside the model in reports/metrics.json so a trained model must show it beats
what classical image processing already does on the same test images.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from segflow.core.preprocessing import to_channels, to_unit_range


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


def otsu_watershed(image: np.ndarray, foreground: str, min_distance: int) -> np.ndarray:
    """Classical instance segmentation: Otsu, then a watershed on the distance transform.

    Args:
        image: any accepted image.
        foreground: "dark" or "bright" cells.
        min_distance: the least distance (pixels) between two objects' centres; specks smaller
            than min_distance**2 pixels are dropped as noise.

    Returns:
        (H, W) uint16 instance ids, 0 = background.
    """
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    from segflow.core.instances import drop_small
    from segflow.core.masks import relabel_sequential

    mask = ndi.binary_opening(otsu_segment(image, foreground).astype(bool), np.ones((3, 3), bool))
    mask = ndi.binary_fill_holes(mask)
    distance = ndi.distance_transform_edt(mask)  # (H, W) float64: pixels to the background
    blobs, _ = ndi.label(mask)
    peaks = peak_local_max(distance, min_distance=min_distance, labels=blobs, exclude_border=False)
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = watershed(-distance, markers, mask=mask)
    return drop_small(relabel_sequential(labels), min_distance**2)
