"""Evaluation: tuning on val, the report files, extra sets."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from segflow.config import ExtraSet, InferenceParams
from segflow.core.images import write_png
from segflow.core.instances import interior_target
from segflow.core.postprocessing import Prediction, to_prediction
from segflow.core.preprocessing import Preprocessing
from segflow.data.extra import check_tracked, load_extra_set
from segflow.data.folder import SourceFileError
from segflow.data.samples import Sample
from segflow.evaluate.reports import EvaluationReport
from segflow.evaluate.scoring import classical_baseline, score_predictions, tune_postprocessing

PREP = Preprocessing(1, 0.5, 0.25, 32, threshold=0.5, instances="watershed", seed_threshold=0.5)


def sample_with_touching_pair(index: int) -> tuple[Sample, np.ndarray]:
    """A sample and logits whose interior is only confident at P = 0.65: seeds need a lower threshold."""
    instances = np.zeros((24, 40), np.uint16)
    instances[4:20, 2:18] = 1
    instances[4:20, 18:34] = 2
    image = np.where(instances > 0, 80, 180).astype(np.uint8)
    foreground = np.where(instances > 0, 4.0, -4.0)
    interior = np.where(interior_target(instances, 2) > 0, np.log(0.65 / 0.35), -4.0)
    logits = np.stack([foreground, interior]).astype(np.float32)
    return Sample(f"s{index}", image, (instances > 0).astype(np.uint8), instances), logits


def test_scores_count_the_unmatched_objects_by_kind_over_the_images():
    truth = np.zeros((40, 48), np.uint16)
    truth[2:12, 2:12], truth[2:12, 12:22] = 1, 2  # a touching pair
    truth[20:30, 2:12], truth[20:30, 20:30], truth[20:30, 35:45] = 3, 4, 5
    pred = np.zeros_like(truth)
    pred[1:13, 1:23] = 1  # the pair as one object (IoU 0.38 with each)
    pred[20:30, 2:12] = 2  # object 3, right
    pred[20:30, 35:38], pred[20:30, 38:45] = 3, 4  # object 5 found (IoU 0.7) less a 3-pixel strip
    pred[35:37, 35:37] = 5  # a speck where nothing is annotated; object 4 is not found
    mask = (pred > 0).astype(np.uint8)
    sample = Sample("s", np.zeros(truth.shape, np.uint8), (truth > 0).astype(np.uint8), truth)
    prediction = Prediction(mask.astype(np.float32), mask.astype(np.float32), mask, pred)
    scores = score_predictions([prediction, prediction], [sample, sample], ["bg", "cell"], "test")
    expected = {"merged": 2, "missed": 1, "outlined": 0, "fragments": 1, "unannotated": 1}
    assert all(row | expected == row for row in scores.rows)
    assert {k: scores.summary[k] for k in expected} == {k: 2 * v for k, v in expected.items()}
    assert (scores.summary["objects_true"], scores.summary["objects_pred"]) == (10, 10)


def test_tuning_finds_the_seed_threshold_that_separates_objects():
    pairs = [sample_with_touching_pair(i) for i in range(3)]
    samples, logits = [p[0] for p in pairs], [p[1] for p in pairs]
    # At the default seed threshold 0.5 < 0.65 the seeds exist; at 0.7 they vanish and the pair merges.
    merged = score_predictions(
        [to_prediction(x, PREP.with_postprocess({"seed_threshold": 0.7})) for x in logits],
        samples,
        ["bg", "cell"],
        "val",
    ).summary
    assert merged["objects_pred"] == 3 and merged["ap"] < 0.1  # a merged pair matches at IoU 0.5 at best
    grids = InferenceParams(threshold_grid=[0.5], seed_threshold_grid=[0.6, 0.7, 0.8], min_area_grid=[0, 300])
    tuned, grid = tune_postprocessing(logits, samples, PREP, grids)
    assert (tuned.seed_threshold, tuned.min_area) == (0.6, 0)  # 300 pixels would drop every cell
    assert len(grid) == 6 and {row["seed_threshold"] for row in grid} == {0.6, 0.7, 0.8}
    assert max(grid, key=lambda r: r["ap"])["seed_threshold"] == 0.6
    assert min(row["ap"] for row in grid if row["min_area"] == 300) == 0.0


def test_components_models_only_tune_the_threshold():
    pairs = [sample_with_touching_pair(0)]
    prep = Preprocessing(1, 0.5, 0.25, 32, threshold=0.5)
    grids = InferenceParams(threshold_grid=[0.3, 0.5], seed_threshold_grid=[0.6, 0.7], min_area_grid=[0])
    _, grid = tune_postprocessing([pairs[0][1][:1]], [pairs[0][0]], prep, grids)
    assert [row["threshold"] for row in grid] == [0.3, 0.5]


def test_report_files_hold_every_set_side_by_side(tmp_path):
    pairs = [sample_with_touching_pair(i) for i in range(2)]
    samples = [p[0] for p in pairs]
    predictions = [to_prediction(p[1], PREP) for p in pairs]
    report = EvaluationReport(PREP, grid=[], tuned_by=None)
    for name in ("val", "test", "other"):
        report.add(name, score_predictions(predictions, samples, ["bg", "cell"], name))
    report.baseline = classical_baseline(samples, samples, ["bg", "cell"])
    report.write(tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics) == {"val", "test", "extra_sets", "baseline"}
    assert (
        metrics["test"]["ap50"] == pytest.approx(1.0) and metrics["extra_sets"]["other"]["count_error"] == 0
    )
    assert metrics["baseline"]["method"] == "otsu+watershed" and "ap_by_iou" not in metrics["baseline"]
    domains = list(csv.DictReader((tmp_path / "plots" / "domains.csv").open()))
    assert [row["set"] for row in domains] == ["test", "other"]
    curve = list(csv.DictReader((tmp_path / "plots" / "ap_by_iou.csv").open()))
    assert len(curve) == 10 and set(curve[0]) == {"iou_threshold", "val", "test", "other", "baseline"}
    post = json.loads((tmp_path / "postprocess.json").read_text())
    assert post["instances"] == "watershed" and post["tuned_on"] is None
    assert (tmp_path / "figures" / "ap_by_iou.png").stat().st_size > 1000
    assert "other" in report.describe()


def write_set(root: Path, names=("a", "b"), mask_value=1) -> None:
    for name in names:
        write_png(root / "images" / f"{name}.png", np.full((8, 8), 100, np.uint8))
        mask = np.zeros((8, 8), np.uint16)
        mask[2:5, 2:5] = mask_value
        write_png(root / "masks" / f"{name}.png", mask)


def test_extra_sets_load_instances_and_explain_bad_folders(tmp_path):
    write_set(tmp_path / "other", mask_value=7)
    samples = load_extra_set(ExtraSet(name="other", source="other"), 2, root=tmp_path)
    assert [s.id for s in samples] == ["a", "b"] and samples[0].instances.max() == 1
    with pytest.raises(SourceFileError, match="expected images in"):
        load_extra_set(ExtraSet(name="x", source="missing"), 2, root=tmp_path)
    with pytest.raises(SourceFileError, match="class ids 0-1"):
        load_extra_set(ExtraSet(name="other", source="other", mask_kind="semantic"), 2, root=tmp_path)
    (tmp_path / "other" / "masks" / "b.png").unlink()
    with pytest.raises(SourceFileError, match="unpaired"):
        load_extra_set(ExtraSet(name="other", source="other"), 2, root=tmp_path)


def test_extra_set_folders_must_be_evaluate_deps(tmp_path):
    dvc_yaml = tmp_path / "dvc.yaml"
    dvc_yaml.write_text(
        "stages:\n  evaluate:\n    cmd: x\n    deps:\n      - data\n      - stages/evaluate.py\n"
    )
    check_tracked([ExtraSet(name="a", source="data/shifted")], dvc_yaml)  # inside a tracked folder
    with pytest.raises(SourceFileError, match="- elsewhere/set"):
        check_tracked([ExtraSet(name="b", source="elsewhere/set")], dvc_yaml)
