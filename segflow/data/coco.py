"""COCO instance annotations (and LIVECell's variant) -> per-image instance-id masks.

LIVECell ships `annotations` as an object keyed by annotation id instead of a list
(pycocotools' COCO class fails on those files); both layouts are read here. Segmentations
may be polygons, uncompressed RLE or compressed RLE; `iscrowd` regions are drawn like any
other object. Where objects overlap, the first annotation keeps the pixel.

Every defect is recorded as a row with a `problem` in words (unknown image id, polygon
with fewer than three points, missing image file, ...) so that the great-expectations
suites in segflow.data.validation report them, and `ingest.on_error: skip` can drop exactly
those items.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from segflow.data.folder import SourceFileError


class CocoFileError(SourceFileError):
    """The annotation file itself cannot be used (missing, not JSON, no images list)."""


@dataclass
class CocoImage:
    id: int
    file_name: str
    path: Path
    width: int
    height: int
    annotations: list[dict] = field(default_factory=list)
    classes: list[int] = field(default_factory=list)  # class id of each annotation, same order
    problem: str = ""

    @property
    def stem(self) -> str:
        return Path(self.file_name).stem


def load_coco(path: Path) -> dict:
    """Read the JSON, accepting `annotations` as a list or as an object keyed by id."""
    if not path.is_file():
        raise CocoFileError(f"ingest.annotations: {path} not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CocoFileError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise CocoFileError(f"{path} has no 'images' list; is it a COCO annotation file?")
    annotations = data.get("annotations", [])
    if isinstance(annotations, dict):  # LIVECell: {"<id>": {...}, ...}
        annotations = [{"id": _int_or(key), **ann} for key, ann in annotations.items()]
    # Reports name annotations by id; one without an id is named by its position.
    data["annotations"] = [{"id": f"#{n}", **ann} for n, ann in enumerate(annotations, start=1)]
    return data


def _int_or(value):
    try:
        return int(value)
    except (TypeError, ValueError):
        return value


def read_coco(
    path: Path, image_root: Path, classes: list[str] | None = None
) -> tuple[list[CocoImage], pd.DataFrame, pd.DataFrame]:
    """The images with their annotations, plus one row per image and per annotation.

    Args:
        path: the COCO JSON file.
        image_root: the folder `images[].file_name` is relative to.
        classes: base.classes. With two, every category is the foreground class; with
            more, each annotation's category name must be one of them.

    Returns:
        (images, image rows, annotation rows); rows carry `image` (the item's name for
        reports), check columns and `problem` ("" when fine).
    """
    data = load_coco(path)
    categories = {c.get("id"): str(c.get("name", "")) for c in data.get("categories", [])}
    class_ids = category_classes(data.get("categories", []), classes or ["background", "object"])
    images: dict = {}
    image_rows = []
    for info in data["images"]:
        file_name = str(info.get("file_name", ""))
        image = CocoImage(info.get("id"), file_name, image_root / file_name,
                          int(info.get("width") or 0), int(info.get("height") or 0))  # fmt: skip
        problems = []
        if image.id in images:
            problems.append(f"image id {image.id} is listed twice")
        if not file_name or not image.path.is_file():
            problems.append(f"listed image file {image.path} is missing")
        image.problem = "; ".join(problems)
        images.setdefault(image.id, image)
        image_rows.append({"image": file_name or f"image id {image.id}", "file_exists": image.path.is_file(),
                           "unique_id": "twice" not in image.problem, "problem": image.problem})  # fmt: skip
    annotation_rows = []
    for ann in data["annotations"]:
        image = images.get(ann.get("image_id"))
        label = f"{image.file_name if image else '?'} annotation {ann.get('id')}"
        problem = _annotation_problem(ann, image, categories) or _class_problem(ann, categories, classes)
        annotation_rows.append(
            {"image": label, "image_known": image is not None,
             "category_known": ann.get("category_id") in categories and not problem.endswith("annotations"),
             "shape_ok": not problem or "image id" in problem or "category" in problem, "problem": problem}
        )  # fmt: skip
        if image is not None and not problem:
            image.annotations.append(ann)
            image.classes.append(class_ids.get(ann.get("category_id"), 1))
    return list(images.values()), pd.DataFrame(image_rows), pd.DataFrame(annotation_rows)


def category_classes(categories: list[dict], classes: list[str]) -> dict:
    """Category id -> class id: all 1 with two classes, else by name (unknown names -> 0;
    their annotations are reported by _class_problem and never drawn)."""
    if len(classes) == 2:
        return {c.get("id"): 1 for c in categories}
    return {c.get("id"): classes.index(c["name"]) if c.get("name") in classes[1:] else 0 for c in categories}


def _class_problem(ann: dict, categories: dict, classes: list[str] | None) -> str:
    if classes is None or len(classes) == 2:
        return ""
    name = categories.get(ann.get("category_id"))
    if name in classes[1:]:
        return ""
    return (
        f"annotation {ann.get('id')} has category {name!r}, which is not a class in base.classes "
        f"{classes}; add it there or remove its annotations"
    )


def _annotation_problem(ann: dict, image: CocoImage | None, categories: set) -> str:
    if image is None:
        return f"annotation {ann.get('id')} refers to unknown image id {ann.get('image_id')}"
    if ann.get("category_id") not in categories:
        return f"annotation {ann.get('id')} has unknown category {ann.get('category_id')}"
    segmentation = ann.get("segmentation")
    if isinstance(segmentation, list):
        if not segmentation:
            return f"annotation {ann.get('id')} has an empty segmentation"
        for polygon in segmentation:
            if not isinstance(polygon, list) or len(polygon) % 2 or len(polygon) < 6:
                points = len(polygon) // 2 if isinstance(polygon, list) else 0
                return (
                    f"annotation {ann.get('id')} has a polygon with {points} point(s); at least 3 are needed"
                )
        return ""
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        if list(segmentation["size"]) != [image.height, image.width]:
            return (
                f"annotation {ann.get('id')} RLE size {segmentation['size']} differs from the image's "
                f"{[image.height, image.width]}"
            )
        return ""
    return f"annotation {ann.get('id')} has no polygon or RLE segmentation"


def rasterize(image: CocoImage) -> np.ndarray:
    """(H, W) uint16 instance ids, 1..n in annotation order; 0 = background."""
    from pycocotools import mask as coco_mask

    h, w = image.height, image.width
    instances = np.zeros((h, w), np.uint16)
    for number, ann in enumerate(image.annotations, start=1):
        segmentation = ann["segmentation"]
        if isinstance(segmentation, list):
            rle = coco_mask.merge(coco_mask.frPyObjects(segmentation, h, w))
        elif isinstance(segmentation["counts"], list):  # uncompressed RLE
            rle = coco_mask.frPyObjects(segmentation, h, w)
        else:
            rle = {"size": segmentation["size"], "counts": segmentation["counts"].encode()}
        pixels = coco_mask.decode(rle).astype(bool) & (instances == 0)
        instances[pixels] = number
    return instances
