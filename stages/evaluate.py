"""evaluate: tune post-processing on val, then score test, extra sets and a classical baseline.

Writes reports/metrics.json (pixel and object scores per set, the Otsu + watershed baseline
on the same test images), reports/postprocess.json (the values chosen on val, which export
ships in preprocessing.json), plots (per image, AP against IoU threshold, one row per
domain) and overlay pictures of test predictions.
"""

from __future__ import annotations

from segflow.artifacts import (
    CONVERTED,
    MODEL,
    OVERLAYS,
    REPORTS,
    SPLIT,
    data_hash,
    read_json,
    read_manifest,
    run_stage,
)
from segflow.config import load_params
from segflow.core.postprocessing import to_prediction
from segflow.data.extra import check_tracked, load_extra_set
from segflow.data.samples import load_samples
from segflow.evaluate.reports import EvaluationReport
from segflow.evaluate.scoring import (
    choose_postprocessing,
    classical_baseline,
    score_predictions,
    val_as_served,
    write_overlays,
)
from segflow.release import tracking
from segflow.runtime import set_threads
from segflow.train.checkpoints import checkpoint_segmenter


def main() -> None:
    params = load_params()
    cfg = params.inference
    set_threads(params.train.threads)
    segmenter = checkpoint_segmenter(MODEL / "model.pt")
    classes = list(segmenter.prep.classes)
    sets = {name: load_samples(read_manifest(SPLIT / f"{name}.csv"), CONVERTED) for name in ("val", "test")}
    check_tracked(params.evaluate.extra_sets)
    sets |= {extra.name: load_extra_set(extra, len(classes)) for extra in params.evaluate.extra_sets}

    # Post-processing and TTA are chosen on val only; test and the extra sets are scored once, with them.
    tuning = choose_postprocessing(segmenter, sets["val"], cfg)
    prep = tuning.prep
    report = EvaluationReport(prep, tuning.grid, tuned_by=cfg.tune_metric if cfg.tune else None)
    report.seconds_per_image = tuning.seconds_per_image
    report.history = read_json(MODEL / "history.json")
    for name, samples in sets.items():
        if name == "val":
            logits, scales = val_as_served(tuning, segmenter, samples)
        else:
            logits, scales = segmenter.scaled_logits([s.image for s in samples])
        predictions = [to_prediction(logit, prep, scale) for logit, scale in zip(logits, scales, strict=True)]
        report.add(name, score_predictions(predictions, samples, classes, name))
    report.baseline = classical_baseline(sets["val"], sets["test"], classes)
    report.write(REPORTS)
    write_overlays(OVERLAYS, sets["test"], report.scores["test"].predictions, params.evaluate.overlays)

    tags = tracking.lineage_tags("evaluate", params.digest(), data_hash(SPLIT))
    with tracking.model_stage_run("evaluate", tags, MODEL) as (parent_id, _):
        tracking.log_datasets(SPLIT, ("val", "test"))  # val chose the post-processing; test scored it
        report.log_to_mlflow(parent_id, OVERLAYS)
    print(report.describe())


if __name__ == "__main__":
    run_stage(main)
