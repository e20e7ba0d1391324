"""evaluate: Dice, IoU, precision, recall on test and val through segflow.inference.

Writes reports/metrics.json (model and Otsu baseline on the same test images),
reports/plots/per_image.csv and overlay pictures of a few test predictions.
"""

from __future__ import annotations

import pandas as pd

from segflow import tracking
from segflow.artifacts import (
    CONVERTED,
    MODEL,
    OVERLAYS,
    PLOTS,
    REPORTS,
    SPLIT,
    data_hash,
    read_manifest,
    run_stage,
    write_json,
)
from segflow.config import load_params
from segflow.evaluation import score_split, threshold_baseline, write_overlays
from segflow.inference import Segmenter
from segflow.runtime import set_threads
from segflow.training import load_samples

METRICS = REPORTS / "metrics.json"
PER_IMAGE = PLOTS / "per_image.csv"


def main() -> None:
    params = load_params()
    set_threads(params.train.threads)
    segmenter = Segmenter.from_checkpoint(MODEL / "model.pt")
    samples = {
        name: load_samples(read_manifest(SPLIT / f"{name}.csv"), CONVERTED) for name in ("val", "test")
    }

    results, rows, predictions = {}, [], {}
    for name, split_samples in samples.items():
        results[name], split_rows, predictions[name] = score_split(segmenter, split_samples, name)
        rows += split_rows
    results["baseline"] = threshold_baseline(samples["val"], samples["test"])
    write_json(METRICS, results)
    PER_IMAGE.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(PER_IMAGE, index=False)
    write_overlays(OVERLAYS, samples["test"], predictions["test"], params.evaluate.overlays)

    tags = tracking.lineage_tags("evaluate", params.digest(), data_hash(SPLIT))
    with tracking.model_stage_run("evaluate", tags, MODEL) as (parent_id, _):
        import mlflow

        # Test scores go on the model's row; validation scores stay on the evaluate run,
        # since the parent's val_dice is the per-epoch training curve.
        test = {f"test_{k}": v for k, v in results["test"].items() if k != "images"}
        test["baseline_test_dice"] = results["baseline"]["test"]["dice"]
        mlflow.log_metrics(test | {f"val_{k}": v for k, v in results["val"].items() if k != "images"})
        tracking.log_to_parent(parent_id, metrics=test)
        client = mlflow.tracking.MlflowClient()
        client.log_artifact(parent_id, str(METRICS))
        client.log_artifact(parent_id, str(PER_IMAGE), "plots")
        if OVERLAYS.exists():
            client.log_artifacts(parent_id, str(OVERLAYS), "overlays")
    test, base = results["test"], results["baseline"]["test"]
    print(f"evaluate: test Dice {test['dice']:.4f} IoU {test['iou']:.4f} "
          f"(Otsu baseline Dice {base['dice']:.4f}) on {test['images']} images")  # fmt: skip


if __name__ == "__main__":
    run_stage(main)
