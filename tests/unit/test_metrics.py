"""segflow.evaluate.metrics against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from segflow.evaluate.metrics import SCORES, Counts, confusion, summarize


def four_by_four() -> tuple[np.ndarray, np.ndarray]:
    """Truth with 4 foreground pixels; prediction hits 3 of them plus 1 false positive."""
    truth = np.zeros((4, 4), np.uint8)
    truth[1:3, 1:3] = 1
    pred = np.zeros((4, 4), np.uint8)
    pred[1, 1] = pred[1, 2] = pred[2, 1] = 1  # 3 true positives, (2, 2) missed
    pred[0, 3] = 1  # false positive
    return pred, truth


def two_by_three() -> tuple[np.ndarray, np.ndarray]:
    """Truth with 2 foreground pixels; prediction finds one, no false positive."""
    truth = np.array([[1, 1, 0], [0, 0, 0]], np.uint8)
    pred = np.array([[1, 0, 0], [0, 0, 0]], np.uint8)
    return pred, truth


def test_confusion_counts_by_hand():
    assert confusion(*four_by_four()) == Counts(tp=3, fp=1, fn=1)


def test_scores_by_hand():
    scores = confusion(*four_by_four()).scores()

    assert scores["dice"] == pytest.approx(6 / 8)
    assert scores["iou"] == pytest.approx(3 / 5)
    assert scores["precision"] == pytest.approx(3 / 4)
    assert scores["recall"] == pytest.approx(3 / 4)
    assert set(scores) == set(SCORES)


def test_any_non_zero_value_is_foreground():
    pred, truth = four_by_four()

    # Instance ids in the truth, 255 in the prediction: same counts as 0/1 masks.
    ids = truth.astype(np.uint16) * np.arange(1, 17, dtype=np.uint16).reshape(4, 4)
    assert confusion(pred * 255, ids) == Counts(tp=3, fp=1, fn=1)


def test_both_empty_score_one():
    empty = np.zeros((5, 5), np.uint8)

    scores = confusion(empty, empty).scores()

    assert scores == {"dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0}


def test_empty_prediction_on_non_empty_truth_scores_zero():
    truth = np.zeros((5, 5), np.uint8)
    truth[2, 2:4] = 1

    scores = confusion(np.zeros_like(truth), truth).scores()

    assert scores["dice"] == 0.0
    assert scores["iou"] == 0.0
    assert scores["recall"] == 0.0
    assert scores["precision"] == 0.0


def test_prediction_on_empty_truth_scores_zero():
    pred = np.zeros((5, 5), np.uint8)
    pred[0, 0] = 1

    scores = confusion(pred, np.zeros_like(pred)).scores()

    assert scores["dice"] == 0.0
    assert scores["iou"] == 0.0
    assert scores["precision"] == 0.0


def test_perfect_prediction_scores_one():
    _, truth = four_by_four()

    assert confusion(truth, truth).scores() == {"dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0}


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        confusion(np.zeros((4, 4)), np.zeros((4, 5)))


def test_summarize_averages_per_image_scores_and_pools_dice():
    # Image A (4x4): tp=3 fp=1 fn=1 -> dice 3/4, iou 3/5, precision 3/4, recall 3/4.
    # Image B (2x3): tp=1 fp=0 fn=1 -> dice 2/3, iou 1/2, precision 1,   recall 1/2.
    # Pooled: tp=4 fp=1 fn=2 -> dice 8/11.
    summary = summarize([confusion(*four_by_four()), confusion(*two_by_three())])

    assert summary["dice"] == pytest.approx((3 / 4 + 2 / 3) / 2)
    assert summary["iou"] == pytest.approx((3 / 5 + 1 / 2) / 2)
    assert summary["precision"] == pytest.approx((3 / 4 + 1) / 2)
    assert summary["recall"] == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert summary["dice_pooled"] == pytest.approx(8 / 11)
    assert summary["images"] == 2


def test_summarize_of_nothing_raises():
    with pytest.raises(ValueError):
        summarize([])
