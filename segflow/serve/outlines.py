"""Objects as outline files the desktop tools open: ImageJ ROI sets (Fiji) and GeoJSON (QuPath).

Fiji and QuPath place a polygon vertex (x, y) at the top-left corner of pixel (x, y) and
count a pixel as inside when its centre is. So each outline here runs along the pixel
edges around the object in the label image (x right, y down): turned back into a mask by
either tool, it gives exactly the object's pixels. (The JSON answer's `polygon` runs
through the centres of the boundary pixels instead, as OpenCV traces them; drawn with the
corner convention it would lose a row and a column.) Each object's outer boundary only:
a hole inside an object is part of its outline's area.
"""

from __future__ import annotations

import io
import zipfile

import cv2
import numpy as np

from segflow.core.objects import PALETTE


def imagej_rois(instances: np.ndarray, objects: list[dict]) -> bytes:
    """A ROI set: a zip of one ImageJ polygon `.roi` per object, named `<id>-<class>`
    (Fiji: File > Open, or drag it onto the image, fills the ROI Manager).

    Args:
        instances: (H, W) uint16 instance ids, the label image the objects come from.
        objects: the JSON answer's `objects` (id, class, bbox).
    """
    import roifile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for obj in objects:
            roi = roifile.ImagejRoi.frompoints(pixel_outline(instances, obj["id"], obj["bbox"]))
            roi.roitype = roifile.ROI_TYPE.TRACED  # what Fiji's wand and Analyze Particles make
            roi.name = f"{obj['id']:05d}-{obj['class']}"
            archive.writestr(f"{roi.name}.roi", roi.tobytes())
    return buffer.getvalue()


def geojson_collection(
    instances: np.ndarray, objects: list[dict], measurements: dict[int, dict] | None = None
) -> dict:
    """A GeoJSON FeatureCollection with one polygon Feature per object, in the form QuPath
    imports as detections (File > Import objects, or drag the file onto the image).

    Args:
        instances: (H, W) uint16 instance ids, the label image the objects come from.
        objects: the JSON answer's `objects` (id, class, class_id, bbox, score).
        measurements: optional rows of measure_objects by object id; each becomes the
            feature's `measurements` (QuPath's measurement table).

    Returns:
        A JSON-ready dict: properties hold objectType, classification (name and colour),
        the object's id and score, and its measurements when given.
    """
    features = []
    for obj in objects:
        ring = pixel_outline(instances, obj["id"], obj["bbox"]).tolist()
        ring.append(ring[0])  # GeoJSON rings are closed
        colour = PALETTE[obj["class_id"] % len(PALETTE)].tolist()
        properties = {
            "objectType": "detection",
            "name": str(obj["id"]),
            "classification": {"name": obj["class"], "color": colour},
            "score": obj["score"],
        }
        if measurements is not None:
            row = measurements[obj["id"]]
            properties["measurements"] = {k: v for k, v in row.items() if k not in ("id", "class")}
        geometry = {"type": "Polygon", "coordinates": [ring]}
        features.append({"type": "Feature", "id": obj["id"], "geometry": geometry, "properties": properties})
    return {"type": "FeatureCollection", "features": features}


def pixel_outline(instances: np.ndarray, obj_id: int, bbox: list[int]) -> np.ndarray:
    """(N, 2) int (x, y) pixel corners along the outer edge of object `obj_id`.

    OpenCV traces the centres of boundary pixels; on the object enlarged 2x, the traced
    centres x' of its boundary sub-pixels map to pixel corners as (x' + 1) // 2 (a pixel's
    left sub-pixel 2x to its left edge x, its right one 2x + 1 to x + 1), which gives the
    staircase along the pixel edges.
    """
    x, y, w, h = bbox
    crop = (instances[y : y + h, x : x + w] == obj_id).astype(np.uint8)
    doubled = np.kron(crop, np.ones((2, 2), np.uint8))  # (2h, 2w): each pixel as 2x2
    contours, _ = cv2.findContours(doubled, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    traced = max(contours, key=len).reshape(-1, 2)
    corners = (traced + 1) // 2 + (x, y)
    # A concave corner is traced twice (two sub-pixels meet there), and the end may repeat the start.
    keep = np.r_[True, (np.diff(corners, axis=0) != 0).any(axis=1)]
    corners = corners[keep]
    if len(corners) > 1 and (corners[-1] == corners[0]).all():
        corners = corners[:-1]
    return corners
