"""ingest: read the raw dataset (folder pairs or COCO), write a manifest, validate it.

A failed expectation stops here with a report naming each bad file or annotation, unless
`ingest.on_error: skip`, which drops exactly those items and lists them in the report and
the summary. A failed run leaves the previous artifacts/ingested as it was (the stage
writes aside and swaps on success).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd

from segflow import tracking
from segflow.artifacts import INGESTED, REPORTS, SUMMARY, StageError, replace_dir, run_stage, write_json
from segflow.config import IngestParams, load_params
from segflow.datasets.coco import CocoFileError, rasterize, read_coco
from segflow.datasets.folder import inspect_pairs, manifest_frame, scan_pairs
from segflow.images import write_png
from segflow.validation import (
    COCO_ANNOTATION_RULES,
    COCO_IMAGE_RULES,
    ValidationReport,
    run_suite,
    validate_ingest,
)

FAILED_REPORT = Path("artifacts/ingest.failed.json")
REPORT = REPORTS / "validation.json"


def main() -> None:
    params = load_params()
    cfg = params.ingest
    source = Path(cfg.source)
    with replace_dir(INGESTED) as out:
        if cfg.format == "coco":
            manifest, suites, skipped = _read_coco(cfg, source, out)
            mask_root = INGESTED  # masks drawn from the annotations live beside the manifest
        else:
            pairs = scan_pairs(source, cfg.image_dir, cfg.mask_dir)
            manifest = manifest_frame(inspect_pairs(pairs, source, cfg.mask_kind, cfg.mask_values))
            suites, skipped, mask_root = {}, [], source
        if cfg.on_error == "skip":
            bad = manifest["problem"].fillna("") != ""
            skipped += [{"item": r.image or r.mask, "problem": r.problem} for r in manifest[bad].itertuples()]
            manifest = manifest[~bad].reset_index(drop=True)
        suites["ingest"] = validate_ingest(manifest, cfg.min_images)
        _report(suites, skipped, cfg)

        # Images and masks both: corrected annotations are new data too.
        pairs = sorted(
            f"{i}:{m}" for i, m in zip(manifest["content_hash"], manifest["mask_hash"], strict=True)
        )
        digest = hashlib.sha256("\n".join(pairs).encode()).hexdigest()
        summary = {"source": str(source), "format": cfg.format, "mask_root": str(mask_root),
                   "images": len(manifest), "data_hash": digest,
                   "objects": int(manifest["objects"].fillna(0).sum()),
                   "skipped": len(skipped)}  # fmt: skip
        manifest.to_csv(out / "manifest.csv", index=False)
        write_json(out / "validation.json", _report_dict(suites, skipped))
        write_json(out / SUMMARY, summary)
    write_json(REPORT, _report_dict(suites, skipped))

    tags = tracking.lineage_tags("ingest", params.digest(), digest)
    with tracking.stage_run("ingest", tags) as _:
        import mlflow

        mlflow.log_params(tracking.flatten("ingest.", params.ingest.model_dump()))
        mlflow.log_metrics(
            {"images": summary["images"], "objects": summary["objects"], "skipped": len(skipped)}
        )
        mlflow.log_artifact(str(REPORT))
    print(f"ingest: {summary['images']} images from {source}, data hash {digest[:12]}")
    if skipped:
        print(f"ingest: skipped {len(skipped)} item(s) (ingest.on_error: skip), listed in {REPORT}")


def _read_coco(cfg: IngestParams, source: Path, out: Path) -> tuple[pd.DataFrame, dict, list]:
    """COCO -> instance masks drawn under out/masks, the manifest, the per-format suites."""
    try:
        images, image_rows, annotation_rows = read_coco(source / cfg.annotations, source / cfg.image_dir)
    except CocoFileError as exc:
        raise StageError(f"ingest: {exc}") from None
    suites = {
        "coco images": run_suite("coco_images", image_rows, COCO_IMAGE_RULES),
        "coco annotations": run_suite("coco_annotations", annotation_rows, COCO_ANNOTATION_RULES),
    }
    skipped = []
    if cfg.on_error == "skip":
        for frame in (image_rows, annotation_rows):
            skipped += [{"item": r.image, "problem": r.problem} for r in frame.itertuples() if r.problem]
    elif not all(report.success for report in suites.values()):
        _report(suites, [], cfg)
    pairs = []
    (out / "masks").mkdir()
    for image in images:
        if image.problem:
            continue  # reported above; with on_error: skip, dropped here
        mask_path = out / "masks" / f"{image.stem}.png"
        write_png(mask_path, rasterize(image))  # (H, W) uint16 instance ids
        pairs.append((image.stem, image.path, mask_path))
    rows = inspect_pairs(pairs, source, "instance", None)
    for row in rows:
        row["mask"] = f"masks/{row['id']}.png"  # relative to the ingested folder (mask_root)
    return manifest_frame(rows), suites, skipped


def _report(suites: dict[str, ValidationReport], skipped: list, cfg: IngestParams) -> None:
    """Print every suite; stop with the report saved when one failed and errors are not skipped."""
    for name, report in suites.items():
        print(f"[{name}] " + report.render())
    failed = [name for name, report in suites.items() if not report.success]
    if failed and (cfg.on_error == "fail" or "ingest" in failed):
        write_json(FAILED_REPORT, _report_dict(suites, skipped))
        raise StageError(
            f"ingest validation failed ({', '.join(failed)}) for {cfg.source}; fix or remove the items "
            f"named above, or set ingest.on_error: skip to drop them (full report: {FAILED_REPORT}). "
            f"Previous outputs in {INGESTED} are unchanged."
        )
    FAILED_REPORT.unlink(missing_ok=True)


def _report_dict(suites: dict[str, ValidationReport], skipped: list) -> dict:
    return {"suites": {name: report.to_dict() for name, report in suites.items()}, "skipped": skipped}


if __name__ == "__main__":
    run_stage(main)
