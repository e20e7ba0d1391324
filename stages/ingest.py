"""ingest: read the raw image/mask folders, write a manifest, validate it.

A failed expectation stops here with a report naming each bad file; the previous
artifacts/ingested stays as it was (the stage writes aside and swaps on success).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from segflow import tracking
from segflow.artifacts import INGESTED, SUMMARY, StageError, replace_dir, run_stage, write_json
from segflow.config import load_params
from segflow.datasets.folder import inspect_pairs, manifest_frame, scan_pairs
from segflow.validation import validate_ingest

FAILED_REPORT = Path("artifacts/ingest.failed.json")


def main() -> None:
    params = load_params()
    cfg = params.ingest
    source = Path(cfg.source)
    rows = inspect_pairs(
        scan_pairs(source, cfg.image_dir, cfg.mask_dir), source, cfg.mask_kind, cfg.mask_values
    )
    manifest = manifest_frame(rows)
    report = validate_ingest(manifest, cfg.min_images)
    print(report.render())
    if not report.success:
        report.save(FAILED_REPORT)
        raise StageError(
            f"ingest validation failed for {source}; fix or remove the files named above "
            f"(full report: {FAILED_REPORT}). Previous outputs in {INGESTED} are unchanged."
        )
    FAILED_REPORT.unlink(missing_ok=True)

    # Images and masks both: corrected annotations are new data too.
    pairs = sorted(f"{i}:{m}" for i, m in zip(manifest["content_hash"], manifest["mask_hash"], strict=True))
    digest = hashlib.sha256("\n".join(pairs).encode()).hexdigest()
    summary = {"source": str(source), "images": len(manifest), "data_hash": digest,
               "objects": int(manifest["objects"].fillna(0).sum())}  # fmt: skip
    with replace_dir(INGESTED) as out:
        manifest.to_csv(out / "manifest.csv", index=False)
        report.save(out / "validation.json")
        write_json(out / SUMMARY, summary)

    tags = tracking.lineage_tags("ingest", params.digest(), digest)
    with tracking.stage_run("ingest", tags) as _:
        import mlflow

        mlflow.log_params(tracking.flatten("ingest.", params.ingest.model_dump()))
        mlflow.log_metrics({"images": summary["images"], "objects": summary["objects"]})
        mlflow.log_artifact(str(INGESTED / "validation.json"))
    print(f"ingest: {summary['images']} images from {source}, data hash {digest[:12]}")


if __name__ == "__main__":
    run_stage(main)
