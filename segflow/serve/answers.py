"""The answer for one image: JSON description, mask PNG and overlay PNG.

The service's endpoints and `segflow predict` both build their outputs here from the
same Prediction, so a file written by the CLI is byte-for-byte what the service returns
(apart from timings).
"""

from __future__ import annotations

from dataclasses import asdict

import cv2
import numpy as np

from segflow.core.inference import Prediction
from segflow.core.objects import coco_rle, describe_objects, draw_outlines

ANSWER_VERSION = 1


def answer(image: np.ndarray, prediction: Prediction, classes: list[str], model: dict) -> dict:
    """The JSON answer for one image.

    Args:
        image: the decoded input, (H, W) or (H, W, C).
        prediction: the Segmenter's result for it.
        classes: class names, index = class id (0 = background).
        model: who answered: name, version, alias, tag.

    Returns:
        A JSON-ready dict: objects (id, class, area, bbox, polygon, score), object count,
        per-class pixel fractions, the class masks as COCO RLE, and the model.
    """
    mask = prediction.mask
    objects = describe_objects(prediction.instances, mask, prediction.probability)
    pixel_counts = np.bincount(mask.ravel(), minlength=len(classes))
    return {
        "version": ANSWER_VERSION,
        "image": {
            "height": int(image.shape[0]),
            "width": int(image.shape[1]),
            "channels": 1 if image.ndim == 2 else int(image.shape[2]),
            "dtype": image.dtype.name,
        },
        "object_count": len(objects),
        "objects": [
            {**asdict(obj), "bbox": list(obj.bbox), "class": _name(classes, obj.class_id)} for obj in objects
        ],
        "class_fractions": {
            _name(classes, c): round(float(n) / mask.size, 6) for c, n in enumerate(pixel_counts)
        },
        # One COCO RLE per non-background class (pycocotools.mask.decode reads them).
        "masks": {_name(classes, c): coco_rle(mask == c) for c in range(1, len(classes))},
        "model": model,
    }


def model_info(labels: dict, tag: str | None) -> dict:
    """Who answered, from a BentoML model's labels (the `model` field of every answer)."""
    return {
        "name": labels.get("registry_name"),
        "version": labels.get("registry_version"),
        "alias": labels.get("alias"),
        "tag": tag,
    }


def _name(classes: list[str], class_id: int) -> str:
    return classes[class_id] if class_id < len(classes) else f"class_{class_id}"


def mask_png(prediction: Prediction) -> bytes:
    """PNG of the (H, W) uint8 class ids (0 background, 1 first class, ...)."""
    return encode_png(prediction.mask)


def overlay_png(image: np.ndarray, prediction: Prediction) -> bytes:
    """PNG of the input with every predicted object outlined in its own colour."""
    return encode_png(draw_outlines(image, prediction.instances))


def encode_png(array: np.ndarray) -> bytes:
    """(H, W) or (H, W, 3) RGB uint8/uint16 -> PNG bytes (fast compression: served per request)."""
    if array.ndim == 3:
        array = array[..., ::-1]  # OpenCV writes BGR
    ok, buffer = cv2.imencode(".png", np.ascontiguousarray(array), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise ValueError(f"could not encode a {array.shape} {array.dtype} array as PNG")
    return buffer.tobytes()
