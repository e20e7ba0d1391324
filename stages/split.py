"""split: deterministic, seeded train/val/test manifests; no image in two splits."""

from __future__ import annotations

from segflow import tracking
from segflow.artifacts import (
    CONVERTED,
    SPLIT,
    SUMMARY,
    StageError,
    data_hash,
    read_manifest,
    replace_dir,
    run_stage,
    write_json,
)
from segflow.config import load_params
from segflow.splits import SPLITS, assign_splits, check_leakage, split_hash


def main() -> None:
    params = load_params()
    manifest = read_manifest(CONVERTED / "manifest.csv")
    ratios = params.split.model_dump()
    try:
        manifest["split"] = assign_splits(manifest, ratios, params.base.seed)
        frames = {name: manifest[manifest["split"] == name].drop(columns="split") for name in SPLITS}
        check_leakage(frames)
    except ValueError as exc:  # too few images for the ratios, or leakage
        raise StageError(f"split: {exc} (see params.yaml `split` and `ingest.min_images`)") from None
    counts = {name: len(frame) for name, frame in frames.items()}
    with replace_dir(SPLIT) as out:
        for name, frame in frames.items():
            frame.to_csv(out / f"{name}.csv", index=False)
        summary = {
            "counts": counts,
            "seed": params.base.seed,
            "data_hash": data_hash(CONVERTED),
            "test_hash": split_hash(frames["test"]),  # the gate compares champions on the same test set
        }
        write_json(out / SUMMARY, summary)

    tags = tracking.lineage_tags("split", params.digest(), data_hash(CONVERTED))
    with tracking.stage_run("split", tags):
        import mlflow

        mlflow.log_params({f"split.{k}": v for k, v in ratios.items()} | {"base.seed": params.base.seed})
        mlflow.log_metrics({f"{k}_images": v for k, v in counts.items()})
    print("split: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


if __name__ == "__main__":
    run_stage(main)
