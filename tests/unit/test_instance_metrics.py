"""segflow.evaluate.instance_metrics (COCO mask AP, count error) against hand-computed values.

COCO AP averages precision at 101 recall points 0, 0.01, ..., 1 (the precision at recall r is
the best precision at any recall >= r, 0 past the recall reached). So a single operating point
with precision P and recall R gives AP = P * (number of points <= R) / 101.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
from pycocotools import mask as coco_mask

from segflow.evaluate.instance_metrics import (
    IOU_THRESHOLDS,
    _instance_rles,
    image_instance_scores,
    instance_summary,
    object_errors,
)

# Only rounding is allowed: AP is a mean of 101 floats and pycocotools divides by tp + fp + eps.
EXACT = {"abs": 1e-12}


def labels(shape: tuple[int, int], boxes: dict[int, tuple[int, int, int, int]]) -> np.ndarray:
    """(H, W) int32 instance ids with box id painted over rows y0:y1 and columns x0:x1."""
    image = np.zeros(shape, np.int32)
    for instance_id, (y0, y1, x0, x1) in boxes.items():
        image[y0:y1, x0:x1] = instance_id
    return image


def three_objects() -> np.ndarray:
    return labels((40, 40), {4: (2, 10, 2, 10), 9: (15, 25, 5, 12), 30: (28, 38, 20, 36)})


def grid(n: int, side: int = 3) -> np.ndarray:
    """n separate side x side squares on a grid, ids 1..n."""
    per_row = int(np.ceil(np.sqrt(n)))
    step = side + 1
    boxes = {
        k + 1: (
            (k // per_row) * step,
            (k // per_row) * step + side,
            (k % per_row) * step,
            (k % per_row) * step + side,
        )
        for k in range(n)
    }
    return labels((per_row * step, per_row * step), boxes)


def test_iou_thresholds_are_cocos():
    assert IOU_THRESHOLDS == (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


def test_perfect_match_scores_one():
    truth = three_objects()
    prediction = np.where(truth > 0, truth + 100, 0)  # same objects, other ids
    summary = instance_summary([truth, truth], [prediction, prediction])
    assert summary["ap"] == summary["ap50"] == summary["ap75"] == 1.0
    assert summary["ap_by_iou"] == [1.0] * 10
    assert summary["count_error"] == 0.0
    assert (summary["objects_true"], summary["objects_pred"], summary["images"]) == (6, 6, 2)


@pytest.mark.parametrize(("n_true", "n_found", "points"), [(2, 1, 51), (4, 3, 76)])
def test_missed_objects_give_precision_one_up_to_recall(n_true, n_found, points):
    truth = grid(n_true, side=4)
    prediction = np.where(truth <= n_found, truth, 0)  # recall n_found / n_true at precision 1
    summary = instance_summary([truth], [prediction])
    assert summary["ap_by_iou"] == pytest.approx([points / 101] * 10, **EXACT)
    assert summary["ap"] == pytest.approx(points / 101, **EXACT)
    assert summary["count_error"] == (n_true - n_found) / n_true


@pytest.mark.parametrize("ids", [(1, 2), (2, 1)])
def test_split_object_scores_half_at_low_thresholds(ids):
    """A 10x50 object predicted as halves of 31 and 19 columns: IoU 0.62 and 0.38.

    At IoU 0.50-0.60 the larger half matches and the smaller is a false positive with the same
    score: one operating point, precision 1/2 at recall 1, so AP 0.5. From 0.65 nothing matches.
    Swapping the ids checks that tied scores do not depend on instance numbering.
    """
    truth = labels((20, 60), {1: (5, 15, 5, 55)})
    prediction = labels((20, 60), {ids[0]: (5, 15, 5, 36), ids[1]: (5, 15, 36, 55)})
    summary = instance_summary([truth], [prediction])
    assert summary["ap_by_iou"] == pytest.approx([0.5] * 3 + [0.0] * 7, **EXACT)
    assert (summary["ap50"], summary["ap75"]) == (pytest.approx(0.5, **EXACT), 0.0)
    assert summary["ap"] == pytest.approx(0.15, **EXACT)
    assert summary["count_error"] == 1.0


def test_split_into_exact_halves_still_matches_at_050():
    """Each half has IoU exactly 0.5, and COCO matches at IoU >= threshold: the higher-scored
    half is a true positive ranked first (precision 1 at recall 1), the other comes after it."""
    truth = labels((20, 60), {1: (5, 15, 5, 55)})
    prediction = labels((20, 60), {1: (5, 15, 5, 30), 2: (5, 15, 30, 55)})
    summary = instance_summary([truth], [prediction], scores=[{1: 0.9, 2: 0.8}])
    assert summary["ap_by_iou"] == pytest.approx([1.0] + [0.0] * 9, **EXACT)
    assert summary["ap"] == pytest.approx(0.1, **EXACT)


def test_empty_prediction_scores_zero():
    truth = three_objects()
    summary = instance_summary([truth], [np.zeros_like(truth)])
    assert summary["ap"] == summary["ap50"] == summary["ap75"] == 0.0
    assert summary["count_error"] == 1.0
    assert summary["objects_pred"] == 0


def test_shifted_prediction_passes_thresholds_up_to_its_iou():
    """A 10x10 square shifted 2 columns: IoU 80/120 = 0.667 passes 0.50, 0.55, 0.60 and 0.65."""
    truth = labels((20, 20), {1: (5, 15, 3, 13)})
    prediction = labels((20, 20), {1: (5, 15, 5, 15)})
    summary = instance_summary([truth], [prediction])
    assert summary["ap_by_iou"] == pytest.approx([1.0] * 4 + [0.0] * 6, **EXACT)
    assert (summary["ap50"], summary["ap75"], summary["ap"]) == pytest.approx((1.0, 0.0, 0.4), **EXACT)


def test_iou_equal_to_a_threshold_passes_it():
    """COCO matches at IoU >= threshold: IoU exactly 3/5 passes 0.60 but not 0.65."""
    truth = labels((20, 20), {1: (5, 15, 0, 10)})
    prediction = labels((20, 20), {1: (5, 15, 0, 6)})  # 60 of 100 pixels, nothing outside
    assert instance_summary([truth], [prediction])["ap_by_iou"] == pytest.approx(
        [1.0] * 3 + [0.0] * 7, **EXACT
    )


def test_false_positive_ranked_below_true_positives_costs_less():
    """Two perfect objects and one false positive. Ranked last, the false positive comes after
    recall 1 was reached at precision 1: AP 1. Ranked first, precision is 1/2 at recall 1/2 and
    2/3 at recall 1, so the interpolated precision is 2/3 everywhere."""
    truth = labels((30, 30), {1: (2, 8, 2, 8), 2: (12, 18, 12, 18)})
    prediction = labels((30, 30), {1: (2, 8, 2, 8), 2: (12, 18, 12, 18), 3: (22, 28, 2, 8)})
    low = instance_summary([truth], [prediction], scores=[{1: 0.9, 2: 0.8, 3: 0.1}])
    high = instance_summary([truth], [prediction], scores=[{1: 0.9, 2: 0.8, 3: 0.95}])
    assert low["ap"] == 1.0
    assert high["ap"] == pytest.approx(2 / 3, **EXACT)
    # Without scores the tie counts as one threshold: precision 2/3 at recall 1, as ranked first.
    assert instance_summary([truth], [prediction])["ap"] == pytest.approx(2 / 3, **EXACT)


def test_more_than_100_objects_are_not_capped():
    truth = grid(150)
    prediction = np.where(truth > 0, truth + 1000, 0)  # ids above the truth's, same order
    summary = instance_summary([truth], [prediction])
    # With COCO's default maxDets=100, recall would stop at 100/150 and AP at 67/101.
    assert (summary["ap"], summary["objects_true"], summary["objects_pred"]) == (1.0, 150, 150)
    assert image_instance_scores(truth, prediction)["ap50"] == 1.0


def test_images_without_truth_count_their_predictions_as_false_positives():
    """Image 0: one object found. Image 1: no truth, one prediction, tied score. As one
    threshold: precision 1/2 at recall 1, AP 0.5."""
    truth = labels((20, 20), {1: (2, 8, 2, 8)})
    summary = instance_summary([truth, np.zeros_like(truth)], [truth, truth])
    assert summary["ap"] == pytest.approx(0.5, **EXACT)
    assert summary["count_error"] == pytest.approx((0 + 1 / 1) / 2)


@pytest.mark.parametrize(("prediction_ids", "expected"), [({}, 1.0), ({1: (2, 8, 2, 8)}, 0.0)])
def test_no_truth_anywhere_is_one_only_without_predictions(prediction_ids, expected):
    empty = np.zeros((20, 20), np.int32)
    summary = instance_summary([empty, empty], [labels((20, 20), prediction_ids), empty])
    assert summary["ap_by_iou"] == [expected] * 10  # never pycocotools' -1
    assert (summary["ap"], summary["ap50"], summary["ap75"]) == (expected, expected, expected)


def test_classes_are_scored_separately():
    """Classes a=1, b=2, c=3. Truth: object 1 is a, objects 2 and 3 are b, nothing is c.
    Prediction: all three found perfectly, but object 2 called a; object 4 called c.

    a: truth {1}, detections {1, 2}, tied -> precision 1/2 at recall 1 -> 0.5.
    b: truth {2, 3}, detection {3} -> precision 1 up to recall 1/2 -> 51/101.
    c: no truth but a prediction -> 0.0, and left out of the mean over classes (COCO).
    """
    boxes = {1: (2, 8, 2, 8), 2: (12, 18, 2, 8), 3: (22, 28, 2, 8)}
    truth = labels((40, 40), boxes)
    prediction = labels((40, 40), {**boxes, 4: (30, 38, 20, 28)})
    truth_classes = np.choose(truth, [0, 1, 2, 2]).astype(np.uint8)
    truth_classes[2, 2:5] = 2  # a minority of b pixels does not change object 1's class
    pred_classes = np.choose(prediction, [0, 1, 1, 2, 3]).astype(np.uint8)
    summary = instance_summary(
        [truth],
        [prediction],
        truth_classes=[truth_classes],
        pred_classes=[pred_classes],
        classes=("background", "a", "b", "c"),
    )
    assert (summary["ap_a"], summary["ap50_a"]) == pytest.approx((0.5, 0.5), **EXACT)
    assert (summary["ap_b"], summary["ap50_b"]) == pytest.approx((51 / 101, 51 / 101), **EXACT)
    assert (summary["ap_c"], summary["ap50_c"]) == (0.0, 0.0)
    expected = (0.5 + 51 / 101) / 2
    assert (summary["ap"], summary["ap50"]) == pytest.approx((expected, expected), **EXACT)
    assert summary["count_error"] == pytest.approx(1 / 3)


def test_two_classes_have_no_per_class_keys():
    truth = three_objects()
    summary = instance_summary([truth], [truth])
    assert set(summary) == {
        "ap",
        "ap50",
        "ap75",
        "ap_by_iou",
        "count_error",
        "objects_true",
        "objects_pred",
        "images",
    }


def test_matches_pycocotools_own_evaluation():
    """Random scenes with distinct scores agree with a plain COCOeval run (files-free, default
    params), so the in-memory COCO objects and the reading of its precision array are right."""
    rng = np.random.default_rng(7)
    truths, predictions, scores = [], [], []
    for n in range(3):
        truth = np.zeros((64, 64), np.int32)
        for k in range(1, 12):
            y, x = rng.integers(0, 54, 2)
            truth[y : y + rng.integers(4, 11), x : x + rng.integers(4, 11)] = k
        prediction = np.roll(truth, rng.integers(-2, 3, 2), axis=(0, 1)) * (rng.random(12) > 0.2)[truth]
        prediction[rng.integers(0, 60) :, :3] = 50  # a false positive strip
        ids = [int(i) for i in np.unique(prediction) if i]
        truths.append(truth)
        predictions.append(prediction)
        # Distinct across images too: pycocotools breaks ties by image order, segflow by match.
        scores.append(dict(zip(ids, (rng.permutation(len(ids)) * 3 + n + 1) / 100, strict=True)))
    ours = instance_summary(truths, predictions, scores=scores)
    reference = _pycocotools_stats(truths, predictions, scores)
    assert [ours["ap"], ours["ap50"], ours["ap75"]] == pytest.approx(reference[:3], **EXACT)
    assert 0 < ours["ap"] < ours["ap50"] < 1  # a scene that exercises partial matches


def _pycocotools_stats(truths, predictions, scores) -> list[float]:
    """COCOeval.stats of the scenes, built the textbook way (encode each mask, loadRes)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def masks(image):
        for i in np.unique(image)[1:]:
            yield int(i), coco_mask.encode(np.asfortranarray(image == i, dtype=np.uint8))

    images = [{"id": n, "height": t.shape[0], "width": t.shape[1]} for n, t in enumerate(truths)]
    gts = [
        {
            "image_id": n,
            "category_id": 1,
            "segmentation": rle,
            "area": float(coco_mask.area(rle)),
            "iscrowd": 0,
        }
        for n, t in enumerate(truths)
        for _, rle in masks(t)
    ]
    dts = [
        {"image_id": n, "category_id": 1, "segmentation": rle, "score": float(scores[n][i])}
        for n, p in enumerate(predictions)
        for i, rle in masks(p)
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO()
        truth.dataset = {
            "images": images,
            "categories": [{"id": 1, "name": "cell"}],
            "annotations": [{**g, "id": n} for n, g in enumerate(gts, start=1)],
        }
        truth.createIndex()
        evaluation = COCOeval(truth, truth.loadRes(dts), "segm")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return [float(s) for s in evaluation.stats]


def test_image_instance_scores():
    truth = grid(4, side=4)
    prediction = np.where(truth <= 3, truth, 0)
    row = image_instance_scores(truth, prediction)
    assert row == {
        "objects_true": 4,
        "objects_pred": 3,
        "count_error": 0.25,
        "ap50": pytest.approx(76 / 101, **EXACT),
        **NO_ERRORS,
        "missed": 1,
    }
    assert row["ap50"] == pytest.approx(instance_summary([truth], [prediction])["ap50"], **EXACT)
    empty = np.zeros_like(truth)
    assert image_instance_scores(empty, empty)["ap50"] == 1.0
    assert image_instance_scores(empty, truth) == {
        "objects_true": 0,
        "objects_pred": 4,
        "count_error": 4.0,
        "ap50": 0.0,
        **NO_ERRORS,
        "unannotated": 4,
    }


def test_shape_mismatch_names_the_image():
    truth = three_objects()
    with pytest.raises(ValueError, match=r"image 1: predictions\[1\] has shape \(40, 39\)"):
        instance_summary([truth, truth], [truth, truth[:, :39]])
    with pytest.raises(ValueError, match=r"image 0: truth_classes\[0\]"):
        instance_summary([truth], [truth], truth_classes=[np.zeros((5, 5), np.uint8)])


def test_bad_inputs_say_what_to_fix():
    truth = three_objects()
    with pytest.raises(ValueError, match="prediction 30 has no finite score"):
        instance_summary([truth], [truth], scores=[{4: 0.5, 9: 0.5}])
    with pytest.raises(ValueError, match="integer instance ids"):
        image_instance_scores(truth, truth > 0)
    with pytest.raises(ValueError, match="predictions has 1 entries for 2"):
        instance_summary([truth, truth], [truth])
    with pytest.raises(ValueError, match="lie entirely on class 0"):
        instance_summary([truth], [truth], truth_classes=[np.zeros(truth.shape, np.uint8)])
    with pytest.raises(ValueError, match="class id 3"):
        instance_summary([truth], [truth], truth_classes=[(truth > 0).astype(np.uint8) * 3])


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int64])
def test_rles_are_byte_identical_to_pycocotools_encode(dtype):
    rng = np.random.default_rng(3)
    image = rng.choice(np.array([0, 7, 200, 255], dtype), size=(23, 17), p=[0.4, 0.2, 0.2, 0.2])
    image[:, -1] = 7  # an object that runs to the last pixel
    ids, rles, areas = _instance_rles(image)
    assert ids == [7, 200, 255]
    for instance_id, rle, area in zip(ids, rles, areas, strict=True):
        assert rle == coco_mask.encode(np.asfortranarray(image == instance_id, dtype=np.uint8))
        assert area == (image == instance_id).sum()


NO_ERRORS = {"merged": 0, "missed": 0, "outlined": 0, "fragments": 0, "unannotated": 0}


def test_object_errors_say_why_objects_do_not_match():
    truth = np.zeros((40, 80), np.uint16)
    prediction = np.zeros_like(truth)
    truth[2:10, 2:10], truth[2:10, 10:18] = 1, 2  # two touching objects...
    prediction[2:10, 2:19] = 1  # ...segmented as one (IoU 64/136 with each)
    truth[20:32, 2:14] = 3  # one object cut in three pieces
    prediction[20:24, 2:14], prediction[24:28, 2:14], prediction[28:32, 2:14] = 2, 3, 4
    truth[2:10, 30:38] = 4  # not found at all
    prediction[20:28, 30:38] = 5  # found where nothing is annotated
    truth[20:30, 50:60] = prediction[20:30, 50:60] = 6  # a match
    assert object_errors(truth, prediction) == {
        "merged": 2, "missed": 1, "outlined": 1, "fragments": 3, "unannotated": 1,
    }  # fmt: skip
    assert object_errors(truth, truth) == NO_ERRORS
    # Sparse ids count the same as compact ones (and do not need a 65,535-squared table).
    sparse_truth = np.where(truth == 6, 65000, truth).astype(np.uint16)
    sparse_prediction = np.where(prediction > 0, prediction + 60000, 0).astype(np.uint16)
    assert object_errors(sparse_truth, sparse_prediction) == object_errors(truth, prediction)
