"""ingest: read the raw dataset (folder pairs or COCO), write a manifest, validate it.

A failed expectation stops here with a report naming each bad file or annotation, unless
`ingest.on_error: skip`, which drops exactly those items and lists them in the report and
the summary. A failed run leaves the previous artifacts/ingested as it was (the stage
writes aside and swaps on success).
"""

from __future__ import annotations

from pathlib import Path

from segflow.artifacts import INGESTED, REPORTS, SUMMARY, StageError, replace_dir, run_stage, write_json
from segflow.config import load_params
from segflow.data.folder import SourceFileError
from segflow.data.sources import read_source
from segflow.release import tracking

FAILED_REPORT = Path("artifacts/ingest.failed.json")
REPORT = REPORTS / "validation.json"


def main() -> None:
    params = load_params()
    cfg = params.ingest
    with replace_dir(INGESTED) as out:
        try:
            ingested = read_source(cfg, out, list(params.base.classes))
        except SourceFileError as exc:  # the COCO / CVAT labelmap / .npz file itself
            raise StageError(f"ingest: {exc}") from None
        for name, report in ingested.suites.items():
            print(f"[{name}] " + report.render())
        failed = ingested.failed(cfg.on_error)
        if failed:
            write_json(FAILED_REPORT, ingested.report())
            raise StageError(
                f"ingest validation failed ({', '.join(failed)}) for {cfg.source}; fix or remove the items "
                f"named above, or set ingest.on_error: skip to drop them (full report: {FAILED_REPORT})."
            )
        FAILED_REPORT.unlink(missing_ok=True)
        manifest, digest = ingested.manifest, ingested.data_hash()
        source = str(Path(cfg.source))
        summary = {"source": source, "format": cfg.format,
                   "image_root": str(INGESTED) if ingested.images_in_output else source,
                   "mask_root": str(INGESTED) if ingested.masks_in_output else source,
                   "mask_kind": ingested.mask_kind,
                   "images": len(manifest), "data_hash": digest,
                   "objects": int(manifest["objects"].fillna(0).sum()),
                   "skipped": len(ingested.skipped)}  # fmt: skip
        manifest.to_csv(out / "manifest.csv", index=False)
        write_json(out / "validation.json", ingested.report())
        write_json(out / SUMMARY, summary)
    write_json(REPORT, ingested.report())

    tags = tracking.lineage_tags("ingest", params.digest(), digest)
    with tracking.stage_run("ingest", tags):
        import mlflow

        mlflow.log_params(tracking.flatten("ingest.", cfg.model_dump()))
        mlflow.log_metrics({k: summary[k] for k in ("images", "objects", "skipped")})
        mlflow.log_artifact(str(REPORT))
    print(f"ingest: {summary['images']} images from {cfg.source}, data hash {digest[:12]}")
    if ingested.skipped:
        print(f"ingest: skipped {len(ingested.skipped)} item(s) (ingest.on_error: skip), listed in {REPORT}")


if __name__ == "__main__":
    run_stage(main)
