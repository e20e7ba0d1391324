"""Any supported source -> one manifest of image/mask pairs, validated.

`ingest.format` picks the reader: folder pairs (segflow.datasets.folder) or COCO
(segflow.datasets.coco, whose instance masks are drawn into the ingested folder). Both
end in the same manifest and the same ingest suite; with `ingest.on_error: skip` the
items with a problem are dropped here and returned for the report.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from segflow.config import IngestParams
from segflow.datasets.coco import rasterize, read_coco
from segflow.datasets.folder import inspect_pairs, manifest_frame, scan_pairs
from segflow.images import write_png
from segflow.validation import (
    COCO_ANNOTATION_RULES,
    COCO_IMAGE_RULES,
    ValidationReport,
    run_suite,
    validate_ingest,
)


@dataclass
class Ingested:
    manifest: pd.DataFrame
    masks_in_output: bool  # True: manifest mask paths are relative to the output folder
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


def read_source(cfg: IngestParams, out: Path) -> Ingested:
    """Read `cfg.source` in its format; COCO masks are written under `out/masks`.

    Raises:
        CocoFileError: the COCO file itself is unusable.
        FileNotFoundError, AmbiguousPairError: folder layout problems.
    """
    source = Path(cfg.source)
    if cfg.format == "coco":
        result = _read_coco(cfg, source, out)
    else:
        pairs = scan_pairs(source, cfg.image_dir, cfg.mask_dir)
        manifest = manifest_frame(inspect_pairs(pairs, source, cfg.mask_kind, cfg.mask_values))
        result = Ingested(manifest, masks_in_output=False)
    if cfg.on_error == "skip":
        manifest = result.manifest
        bad = manifest["problem"].fillna("") != ""
        result.skipped += [
            {"item": r.image or r.mask, "problem": r.problem} for r in manifest[bad].itertuples()
        ]
        result.manifest = manifest[~bad].reset_index(drop=True)
    result.suites["ingest"] = validate_ingest(result.manifest, cfg.min_images)
    return result


def _read_coco(cfg: IngestParams, source: Path, out: Path) -> Ingested:
    images, image_rows, annotation_rows = read_coco(source / cfg.annotations, source / cfg.image_dir)
    suites = {
        "coco images": run_suite("coco_images", image_rows, COCO_IMAGE_RULES),
        "coco annotations": run_suite("coco_annotations", annotation_rows, COCO_ANNOTATION_RULES),
    }
    skipped = []
    if cfg.on_error == "skip":
        for frame in (image_rows, annotation_rows):
            skipped += [{"item": r.image, "problem": r.problem} for r in frame.itertuples() if r.problem]
    pairs = []
    (out / "masks").mkdir()
    for image in images:
        if image.problem:
            continue  # reported by the suites; with on_error: skip, dropped here
        mask_path = out / "masks" / f"{image.stem}.png"
        write_png(mask_path, rasterize(image))  # (H, W) uint16 instance ids
        pairs.append((image.stem, image.path, mask_path))
    rows = inspect_pairs(pairs, source, "instance", None)
    for row in rows:
        row["mask"] = f"masks/{row['id']}.png"  # relative to the ingested folder
    return Ingested(manifest_frame(rows), masks_in_output=True, suites=suites, skipped=skipped)
