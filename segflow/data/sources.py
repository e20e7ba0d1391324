"""Any supported source -> one manifest of image/mask pairs, validated.

`ingest.format` picks the reader: folder pairs (segflow.data.folder), COCO
(segflow.data.coco, whose instance masks are drawn into the ingested folder), CVAT
colour masks (segflow.data.cvat, decoded to class ids there) or a NumPy .npz
(segflow.data.arrays, whose images and masks are both written there). All end in the
same manifest and the same ingest suite; with `ingest.on_error: skip` the items with a
problem are dropped here and returned for the report.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from segflow.config import IngestParams
from segflow.core.images import write_png
from segflow.data.arrays import read_arrays
from segflow.data.coco import rasterize, read_coco
from segflow.data.cvat import read_cvat
from segflow.data.folder import Pairing, inspect_pairs, manifest_frame, scan_pairs
from segflow.data.validation import (
    COCO_ANNOTATION_RULES,
    COCO_IMAGE_RULES,
    CVAT_MASK_RULES,
    ValidationReport,
    run_suite,
    validate_ingest,
)


@dataclass
class Ingested:
    manifest: pd.DataFrame
    masks_in_output: bool  # True: manifest mask paths are relative to the output folder
    # What mask pixels hold: "instance" ids, raw "semantic" values (mapped to classes by
    # convert), or "class_ids" already (palette and multi-class COCO readers).
    mask_kind: str = "instance"
    images_in_output: bool = False  # True: manifest image paths are relative to the output folder
    suites: dict[str, ValidationReport] = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)  # {"item", "problem"}

    def failed(self, on_error: str) -> list[str]:
        """Suites that stop the stage: any with on_error fail; the pair suite always."""
        return [n for n, r in self.suites.items() if not r.success and (on_error == "fail" or n == "ingest")]

    def report(self) -> dict:
        return {"suites": {n: r.to_dict() for n, r in self.suites.items()}, "skipped": self.skipped}

    def data_hash(self) -> str:
        """Images and masks both: corrected annotations are new data too."""
        m = self.manifest
        pairs = sorted(f"{i}:{k}" for i, k in zip(m["content_hash"], m["mask_hash"], strict=True))
        return hashlib.sha256("\n".join(pairs).encode()).hexdigest()


def read_source(cfg: IngestParams, out: Path, classes: list[str]) -> Ingested:
    """Read `cfg.source` in its format; masks drawn or decoded here go under `out/masks`.

    Args:
        cfg: the ingest params.
        out: the ingested folder being built.
        classes: base.classes; readers with named classes (palettes, COCO categories)
            map names to class ids with it.

    Raises:
        CocoFileError: the COCO file itself is unusable.
        CvatFileError, ArraysFileError: the labelmap/palette or the .npz is unusable
            (both are SourceFileError, like AmbiguousPairError).
        FileNotFoundError, AmbiguousPairError: folder layout problems.
    """
    source = Path(cfg.source)
    if cfg.format == "coco":
        result = _read_coco(cfg, source, out, classes)
    elif cfg.format == "cvat":
        result = _read_cvat(cfg, source, out, classes)
    elif cfg.format == "numpy":
        manifest = read_arrays(cfg, source, out)
        result = Ingested(manifest, masks_in_output=True, mask_kind=cfg.mask_kind, images_in_output=True)
    else:
        result = _read_folder(cfg, source)
    if cfg.on_error == "skip":
        manifest = result.manifest
        bad = manifest["problem"].fillna("") != ""
        result.skipped += [
            {"item": r.image or r.mask, "problem": r.problem} for r in manifest[bad].itertuples()
        ]
        result.manifest = manifest[~bad].reset_index(drop=True)
    result.suites["ingest"] = validate_ingest(result.manifest, cfg.min_images)
    return result


def _read_folder(cfg: IngestParams, source: Path) -> Ingested:
    pairing = Pairing.from_params(cfg)
    pairs = scan_pairs(source, cfg.image_dir, cfg.mask_dir, pairing)
    rows = inspect_pairs(pairs, source, cfg.mask_kind, cfg.mask_values, pairing.hint())
    return Ingested(manifest_frame(rows), masks_in_output=False, mask_kind=cfg.mask_kind)


def _read_cvat(cfg: IngestParams, source: Path, out: Path, classes: list[str]) -> Ingested:
    manifest = read_cvat(cfg, source, out, classes)  # masks decoded to class ids in out/masks
    # Its own suite, before on_error: skip drops rows, so every unknown colour is reported.
    suites = {"cvat masks": run_suite("cvat_masks", manifest, CVAT_MASK_RULES)}
    return Ingested(manifest, masks_in_output=True, mask_kind="class_ids", suites=suites)


def _read_coco(cfg: IngestParams, source: Path, out: Path, classes: list[str]) -> Ingested:
    path = source / cfg.annotations
    images, image_rows, annotation_rows = read_coco(path, source / cfg.image_dir, classes)
    suites = {
        "coco images": run_suite("coco_images", image_rows, COCO_IMAGE_RULES),
        "coco annotations": run_suite("coco_annotations", annotation_rows, COCO_ANNOTATION_RULES),
    }
    skipped = []
    if cfg.on_error == "skip":
        for frame in (image_rows, annotation_rows):
            skipped += [{"item": r.image, "problem": r.problem} for r in frame.itertuples() if r.problem]
    pairs, class_files = [], {}
    (out / "masks").mkdir()
    for image in images:
        if image.problem:
            continue  # reported by the suites; with on_error: skip, dropped here
        mask_path = out / "masks" / f"{image.stem}.png"
        instances = rasterize(image)  # (H, W) uint16 instance ids
        write_png(mask_path, instances)
        if len(classes) > 2:  # each object's category is drawn too, as a class-id mask
            lookup = np.array([0, *image.classes], np.uint8)
            class_files[image.stem] = f"classes/{image.stem}.png"
            write_png(out / class_files[image.stem], lookup[instances])  # (H, W) uint8 class ids
        pairs.append((image.stem, image.path, mask_path))
    rows = inspect_pairs(pairs, source, "instance", None)
    for row in rows:
        row["mask"] = f"masks/{row['id']}.png"  # relative to the ingested folder
    manifest = manifest_frame(rows)
    if class_files:
        manifest["classes"] = manifest["id"].map(class_files)
    return Ingested(manifest, masks_in_output=True, suites=suites, skipped=skipped)
