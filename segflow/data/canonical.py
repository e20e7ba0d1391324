"""Canonical form of a dataset: the image as found, class-id mask, instance ids when known."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from segflow.config import ConvertParams
from segflow.core.images import content_hash, read_image, write_png
from segflow.core.masks import instances_to_semantic, relabel_sequential, semantic_from_values
from segflow.errors import UserError


def convert_all(
    manifest: pd.DataFrame,
    image_root: Path,
    mask_root: Path,
    out: Path,
    mask_kind: str,
    cfg: ConvertParams,
    classes: list[str],
) -> pd.DataFrame:
    """Every ingest manifest row converted into `out` (convert_one); the converted manifest.

    Raises:
        UserError: a class no mask contains (with more than two classes), or every mask
            empty after conversion: a model could not learn from them.
    """
    class_values = _class_values_by_id(cfg.class_values, classes)
    rows = [
        convert_one(
            row,
            image_root,
            mask_root,
            out,
            mask_kind,
            cfg.foreground_values,
            class_values=class_values,
            n_classes=len(classes),
        )
        for row in manifest.itertuples()
    ]
    converted = pd.DataFrame(rows)
    absent = _absent_classes(converted, classes)
    if absent:
        raise UserError(
            f"convert: no mask contains class(es) {absent} of base.classes {classes}; check the "
            "class names against your annotations (palette, COCO categories or convert.class_values)"
        )
    if not (converted["foreground_fraction"] > 0).any():
        raise UserError(
            "convert: every mask is empty after conversion; check ingest.mask_kind, "
            "ingest.mask_values and convert.foreground_values in params.yaml"
        )
    return converted


def convert_one(
    row,
    source: Path,
    mask_root: Path,
    out: Path,
    mask_kind: str,
    foreground_values,
    class_values: dict[int, list[int]] | None = None,
    n_classes: int = 2,
) -> dict:
    """Write one image's canonical files under `out`.

    Args:
        row: an ingest manifest row (id, image, mask, height, width, content_hash; a
            `classes` path when the reader drew a class-id mask beside instance ids).
        source: the folder the manifest's image paths are relative to.
        mask_root: the folder its mask paths are relative to (the source, or
            artifacts/ingested for masks drawn from annotations, palettes or arrays).
        out: the converted folder being built.
        mask_kind: "instance", "semantic" (raw values, mapped to classes here) or
            "class_ids" (already class ids).
        foreground_values: raw semantic values meaning foreground (convert.foreground_values).
        class_values: class id -> raw semantic values (convert.class_values by id).
        n_classes: len(base.classes).

    Returns:
        The converted manifest row.
    """
    image_src = source / row.image
    raw_mask = read_image(mask_root / row.mask)
    image_rel = f"images/{row.id}{image_src.suffix.lower()}"
    (out / "images").mkdir(exist_ok=True)
    shutil.copyfile(image_src, out / image_rel)  # the pixels are kept exactly as found
    result = {"id": row.id, "image": image_rel, "mask": f"masks/{row.id}.png", "instances": "",
              "height": row.height, "width": row.width, "content_hash": row.content_hash}  # fmt: skip
    if mask_kind == "instance":
        instances = relabel_sequential(raw_mask)  # (H, W) uint16 ids 1..n
        classes_file = getattr(row, "classes", None)
        if isinstance(classes_file, str) and classes_file:  # multi-class COCO: drawn per category
            semantic = read_image(mask_root / classes_file).astype(np.uint8)
        else:
            semantic = instances_to_semantic(instances)  # (H, W) uint8 class ids
        result["instances"] = f"instances/{row.id}.png"
        write_png(out / result["instances"], instances)
        result["objects"] = int(instances.max())
    elif mask_kind == "class_ids":
        semantic = raw_mask.astype(np.uint8)  # (H, W) uint8 class ids, from a palette or categories
        result["objects"] = ""
    else:
        semantic = semantic_from_values(raw_mask, foreground_values, class_values, n_classes)
        result["objects"] = ""
    write_png(out / result["mask"], semantic)
    result["mask_hash"] = content_hash(semantic)
    result["foreground_fraction"] = float(np.mean(semantic > 0))
    for class_id in range(1, n_classes) if n_classes > 2 else ():
        result[f"fraction_{class_id}"] = float(np.mean(semantic == class_id))
    return result


def _class_values_by_id(by_name: dict[str, list[int]] | None, classes: list[str]) -> dict | None:
    return None if by_name is None else {classes.index(name): values for name, values in by_name.items()}


def _absent_classes(converted: pd.DataFrame, classes: list[str]) -> list[str]:
    """With K > 2 classes, the classes no converted mask contains (they cannot be learned)."""
    if len(classes) <= 2:
        return []
    return [name for k, name in enumerate(classes[1:], start=1) if not (converted[f"fraction_{k}"] > 0).any()]
