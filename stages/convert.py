"""convert: canonical images and masks — semantic class ids, plus instance ids when known."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
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
from segflow.images import content_hash, read_image, write_png
from segflow.masks import instances_to_semantic, relabel_sequential, semantic_from_values


def main() -> None:
    params = load_params()
    source = Path(read_json(INGESTED / SUMMARY)["source"])
    manifest = read_manifest(INGESTED / "manifest.csv")
    rows = []
    with replace_dir(CONVERTED) as out:
        for row in manifest.itertuples():
            rows.append(
                convert_one(row, source, out, params.ingest.mask_kind, params.convert.foreground_values)
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


def convert_one(row, source: Path, out: Path, mask_kind: str, foreground_values) -> dict:
    """Write one image's canonical files under `out`; returns its converted manifest row."""
    image_src = source / row.image
    raw_mask = read_image(source / row.mask)
    image_rel = f"images/{row.id}{image_src.suffix.lower()}"
    (out / "images").mkdir(exist_ok=True)
    shutil.copyfile(image_src, out / image_rel)  # the pixels are kept exactly as found
    result = {"id": row.id, "image": image_rel, "mask": f"masks/{row.id}.png", "instances": "",
              "height": row.height, "width": row.width, "content_hash": row.content_hash}  # fmt: skip
    if mask_kind == "instance":
        instances = relabel_sequential(raw_mask)  # (H, W) uint16 ids 1..n
        semantic = instances_to_semantic(instances)  # (H, W) uint8 class ids
        result["instances"] = f"instances/{row.id}.png"
        write_png(out / result["instances"], instances)
        result["objects"] = int(instances.max())
    else:
        semantic = semantic_from_values(raw_mask, foreground_values)
        result["objects"] = ""
    write_png(out / result["mask"], semantic)
    result["mask_hash"] = content_hash(semantic)
    result["foreground_fraction"] = float(np.mean(semantic > 0))
    return result


if __name__ == "__main__":
    run_stage(main)
