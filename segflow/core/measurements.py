"""Per-object measurements: the table CellProfiler, QuPath and Fiji's Analyze Particles give.

scikit-image's `regionprops_table` computes every value (its definitions are documented,
and napari's regionprops plugins show the same ones); segflow only names the columns, adds
each object's class and puts the box in the answer's COCO order. Lengths are in pixels,
areas in pixels², intensities in the uploaded image's own units (not rescaled), so a value
here matches what Fiji measures on the same file.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from segflow.core.objects import class_name

# regionprops_table's name -> ours. Centroids and boxes are split into x/y below.
_SHAPE = {
    "area": "area",
    "perimeter": "perimeter",
    "equivalent_diameter_area": "equivalent_diameter",
    "axis_major_length": "major_axis_length",
    "axis_minor_length": "minor_axis_length",
    "eccentricity": "eccentricity",
    "solidity": "solidity",
}
_INTENSITY = {
    "intensity_mean": "mean_intensity",
    "intensity_min": "min_intensity",
    "intensity_max": "max_intensity",
}
_POSITION = ("centroid_x", "centroid_y", "bbox_x", "bbox_y", "bbox_width", "bbox_height")


def channel_count(image: np.ndarray) -> int:
    """Channels of an (H, W) or (H, W, C) image."""
    return 1 if image.ndim == 2 else int(image.shape[2])


def measurement_columns(channels: int = 1) -> list[str]:
    """Column names of measure_objects' rows for an image with this many channels."""
    intensity = [
        f"{name}_{c}" if channels > 1 else name for name in _INTENSITY.values() for c in range(channels)
    ]
    return ["id", "class", *_POSITION, *_SHAPE.values(), *intensity]


def measure_objects(
    instances: np.ndarray, mask: np.ndarray, image: np.ndarray, classes: list[str]
) -> list[dict]:
    """One row per object, in id order.

    Args:
        instances: (H, W) uint16 instance ids, 0 = background.
        mask: (H, W) uint8 class ids (which class each object is).
        image: the original (H, W) or (H, W, C) image the objects were found in.
        classes: class names, index = class id.

    Returns:
        Dicts keyed by measurement_columns(channels): id and class, centroid and box
        (COCO order: x, y, width, height), shape (area, perimeter, equivalent diameter,
        major and minor axis, eccentricity, solidity) and mean/min/max intensity per channel.
    """
    from skimage.measure import regionprops_table

    channels = channel_count(image)
    if not instances.any():
        return []
    table = regionprops_table(
        instances,
        intensity_image=image,
        properties=("label", "centroid", "bbox", *_SHAPE, *_INTENSITY),
    )
    ids = table["label"]
    # All pixels of an object have one class: post-processing splits objects by class.
    class_ids = ndi.maximum(mask, labels=instances, index=ids)
    rows = []
    for k, obj_id in enumerate(ids):
        y0, x0, y1, x1 = (int(table[f"bbox-{i}"][k]) for i in range(4))
        row = {
            "id": int(obj_id),
            "class": class_name(classes, int(class_ids[k])),
            "centroid_x": _round(table["centroid-1"][k]),
            "centroid_y": _round(table["centroid-0"][k]),
            "bbox_x": x0,
            "bbox_y": y0,
            "bbox_width": x1 - x0,
            "bbox_height": y1 - y0,
        }
        row.update({ours: _round(table[theirs][k]) for theirs, ours in _SHAPE.items()})
        for theirs, ours in _INTENSITY.items():
            if channels == 1:
                row[ours] = _round(table[theirs][k])
            else:
                row.update({f"{ours}_{c}": _round(table[f"{theirs}-{c}"][k]) for c in range(channels)})
        rows.append(row)
    return rows


def _round(value) -> float:
    return round(float(value), 4)
