"""convert: canonical images and masks — semantic class ids, plus instance ids when known."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from segflow import tracking
from segflow.artifacts import (
    CONVERTED,
    INGESTED,
    SUMMARY,
    StageError,
    data_hash,
    read_json,
    read_manifest,
    replace_dir,
    run_stage,
    write_json,
)
from segflow.config import load_params
from segflow.datasets.canonical import convert_one


def main() -> None:
    params = load_params()
    ingested = read_json(INGESTED / SUMMARY)
    source = Path(ingested["source"])
    mask_root = Path(ingested.get("mask_root", ingested["source"]))  # COCO masks live in artifacts/ingested
    manifest = read_manifest(INGESTED / "manifest.csv")
    rows = []
    with replace_dir(CONVERTED) as out:
        for row in manifest.itertuples():
            rows.append(
                convert_one(
                    row, source, mask_root, out, params.ingest.mask_kind, params.convert.foreground_values
                )
            )
        converted = pd.DataFrame(rows)
        if not (converted["foreground_fraction"] > 0).any():
            raise StageError(
                "convert: every mask is empty after conversion; check ingest.mask_kind, "
                "ingest.mask_values and convert.foreground_values in params.yaml"
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
