"""convert: canonical images and masks — semantic class ids, plus instance ids when known."""

from __future__ import annotations

from pathlib import Path

from segflow.artifacts import (
    CONVERTED,
    INGESTED,
    SUMMARY,
    data_hash,
    read_json,
    read_manifest,
    replace_dir,
    run_stage,
    write_json,
)
from segflow.config import load_params
from segflow.data.canonical import convert_all
from segflow.release import tracking


def main() -> None:
    params = load_params()
    ingested = read_json(INGESTED / SUMMARY)
    # Readers that draw or decode files write them into artifacts/ingested.
    image_root = Path(ingested.get("image_root", ingested["source"]))
    mask_root = Path(ingested.get("mask_root", ingested["source"]))
    mask_kind = ingested.get("mask_kind", params.ingest.mask_kind)
    manifest = read_manifest(INGESTED / "manifest.csv")
    with replace_dir(CONVERTED) as out:
        converted = convert_all(
            manifest, image_root, mask_root, out, mask_kind, params.convert, list(params.base.classes)
        )
        converted.to_csv(out / "manifest.csv", index=False)
        summary = {"images": len(converted), "data_hash": data_hash(INGESTED),
                   "foreground_fraction": float(converted["foreground_fraction"].mean())}  # fmt: skip
        write_json(out / SUMMARY, summary)

    tags = tracking.lineage_tags("convert", params.digest(), summary["data_hash"])
    with tracking.stage_run("convert", tags):
        import mlflow

        mlflow.log_metrics(
            {"images": summary["images"], "foreground_fraction": summary["foreground_fraction"]}
        )
    print(f"convert: {len(converted)} images, mean foreground {summary['foreground_fraction']:.3f}")


if __name__ == "__main__":
    run_stage(main)
