"""The answer for one image: JSON description, measurements, mask, labels and overlay images.

The service's endpoints and `segflow predict` both build their outputs here from the
same Prediction, so a file written by the CLI is byte-for-byte what the service returns
(apart from timings).
"""

from __future__ import annotations

import csv
import io

import cv2
import numpy as np

from segflow.core.measurements import channel_count, measure_objects, measurement_columns
from segflow.core.objects import SegmentedObject, class_name, coco_rle, describe_objects, draw_outlines
from segflow.core.postprocessing import Prediction

ANSWER_VERSION = 1


def _object_json(obj: SegmentedObject, classes: list[str]) -> dict:
    """One object as the answer lists it. Built field by field: dataclasses.asdict deep-copies
    every polygon, a third of the answer's cost for images with many objects."""
    return {
        "id": obj.id,
        "class_id": obj.class_id,
        "area": obj.area,
        "bbox": list(obj.bbox),
        "polygon": obj.polygon,
        "score": obj.score,
        "class": class_name(classes, obj.class_id),
    }


def answer(
    image: np.ndarray, prediction: Prediction, classes: list[str], model: dict, measurements: bool = False
) -> dict:
    """The JSON answer for one image.

    Args:
        image: the decoded input, (H, W) or (H, W, C).
        prediction: the Segmenter's result for it.
        classes: class names, index = class id (0 = background).
        model: who answered: name, version, alias, tag.
        measurements: also give each object its `measurements` (measure_objects' columns
            but id and class); off by default to keep the answer small.

    Returns:
        A JSON-ready dict: objects (id, class, area, bbox, polygon, score), object count,
        per-class pixel fractions, the class masks as COCO RLE, and the model.
    """
    mask = prediction.mask
    objects = [
        _object_json(obj, classes)
        for obj in describe_objects(
            prediction.instances, mask, prediction.probability, prediction.centres, prediction.object_score
        )
    ]
    if measurements:
        rows = {row.pop("id"): row for row in measure_objects(prediction.instances, mask, image, classes)}
        for obj in objects:
            obj["measurements"] = {k: v for k, v in rows[obj["id"]].items() if k != "class"}
    pixel_counts = np.bincount(mask.ravel(), minlength=len(classes))
    return {
        "version": ANSWER_VERSION,
        "image": {
            "height": int(image.shape[0]),
            "width": int(image.shape[1]),
            "channels": channel_count(image),
            "dtype": image.dtype.name,
        },
        "object_count": len(objects),
        "objects": objects,
        "class_fractions": {
            class_name(classes, c): round(float(n) / mask.size, 6) for c, n in enumerate(pixel_counts)
        },
        # One COCO RLE per non-background class (pycocotools.mask.decode reads them).
        "masks": {class_name(classes, c): coco_rle(mask == c) for c in range(1, len(classes))},
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


def mask_png(prediction: Prediction) -> bytes:
    """PNG of the (H, W) uint8 class ids (0 background, 1 first class, ...)."""
    return encode_png(prediction.mask)


LABEL_FORMATS = {"png": "image/png", "tiff": "image/tiff"}
LABEL_SUFFIXES = {"png": ".png", "tiff": ".tif"}


def label_format(prediction: Prediction, asked: str | None = None) -> str:
    """`asked` (png or tiff), else PNG up to 65,535 objects and TIFF beyond (PNG stops at
    16 bits). Raises ValueError when PNG is asked for more objects than it can hold."""
    wide = prediction.instances.dtype != np.uint16
    if asked == "png" and wide:
        raise ValueError(
            f"{int(prediction.instances.max())} objects do not fit a 16-bit PNG; ask for format=tiff"
        )
    return asked or ("tiff" if wide else "png")


def labels_image(prediction: Prediction, fmt: str = "png") -> bytes:
    """The instance label image: (H, W), 0 = background, each object its id (the `id` of
    the JSON answer's objects), as a 16-bit PNG or a 16/32-bit TIFF (label_format chooses);
    Fiji, QuPath, napari and CellProfiler read it as labels.
    """
    if fmt == "png":
        return encode_png(prediction.instances)
    if fmt == "tiff":
        import tifffile

        buffer = io.BytesIO()
        tifffile.imwrite(buffer, prediction.instances, compression="zlib")
        return buffer.getvalue()
    raise ValueError(f"label image format {fmt!r}; choose one of {sorted(LABEL_FORMATS)}")


def measurements_csv(rows: list[dict], channels: int) -> str:
    """One image's measure_objects rows as CSV text (the header even when there are no objects)."""
    return csv_text(rows, measurement_columns(channels))


def csv_text(rows: list[dict], columns: list[str]) -> str:
    """Rows as CSV with these columns, in order; a column a row lacks is left empty."""
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


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
