"""split: deterministic, seeded train/val/test manifests; no image in two splits."""

from __future__ import annotations

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
from segflow.data.splits import SPLITS, assign_from_file, assign_splits, check_leakage, group_keys, split_hash
from segflow.errors import UserError
from segflow.paths import repo_root
from segflow.release import tracking


def main() -> None:
    params = load_params()
    cfg = params.split
    manifest = read_manifest(CONVERTED / "manifest.csv")
    ratios = {name: getattr(cfg, name) for name in SPLITS}
    try:
        manifest["group"] = group_keys(manifest, cfg.group_regex, cfg.group_column)
        if cfg.split_file is not None:
            manifest["split"] = assign_from_file(manifest, repo_root() / cfg.split_file)
        else:
            stratify = "foreground_fraction" if cfg.stratify else None
            manifest["split"] = assign_splits(manifest, ratios, params.base.seed, "group", stratify)
        frames = {name: manifest[manifest["split"] == name].drop(columns="split") for name in SPLITS}
        check_leakage(frames, ("id", "content_hash", "group"))
    except UserError as exc:  # too few images for the ratios, a bad grouping or split file, or leakage
        raise StageError(f"split: {exc} (see params.yaml `split` and `ingest.min_images`)") from None
    counts = {name: len(frame) for name, frame in frames.items()}
    with replace_dir(SPLIT) as out:
        for name, frame in frames.items():
            frame.to_csv(out / f"{name}.csv", index=False)
        summary = {
            "counts": counts,
            "seed": params.base.seed,
            "groups": {name: int(frame["group"].nunique()) for name, frame in frames.items()},
            "data_hash": data_hash(CONVERTED),
            "test_hash": split_hash(frames["test"]),  # the gate compares champions on the same test set
        }
        write_json(out / SUMMARY, summary)

    tags = tracking.lineage_tags("split", params.digest(), data_hash(CONVERTED))
    with tracking.stage_run("split", tags):
        import mlflow

        logged = {f"split.{k}": v for k, v in cfg.model_dump().items()}
        mlflow.log_params(logged | {"base.seed": params.base.seed})
        mlflow.log_metrics({f"{k}_images": v for k, v in counts.items()})
    print("split: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


if __name__ == "__main__":
    run_stage(main)
