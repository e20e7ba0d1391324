"""Object metrics: COCO mask AP (pycocotools) at IoU 0.50:0.05:0.95, and the object-count error.

Pixel metrics (Dice, IoU, precision, recall) are segflow.evaluate.metrics.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np

from segflow.core.masks import sequential_ids

# COCO's 0.50:0.05:0.95, as decimals (pycocotools' linspace gives 0.8999999999999999, which no
# ratio of pixel counts can tell apart). A match needs IoU >= threshold.
IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


def instance_summary(
    truths: list[np.ndarray],
    predictions: list[np.ndarray],
    scores: list[dict[int, float]] | None = None,
    truth_classes: list[np.ndarray] | None = None,
    pred_classes: list[np.ndarray] | None = None,
    classes: tuple[str, ...] | list[str] = ("background", "cell"),
) -> dict:
    """COCO mask AP (pycocotools, iouType "segm", area "all") and object-count error over images.

    Recall is never capped: maxDets is raised to the largest number of predictions in an image
    (COCO's default of 100 would silently drop detections on crowded cell images).

    Args:
        truths: per image, (H, W) integer instance ids, 0 = background; ids need not be contiguous.
        predictions: per image, (H, W) integer instance ids of the same shape as its truth.
        scores: per image, {prediction id: confidence}; every prediction id needs one. None gives
            every object 1.0: AP then scores one operating point (precision at recall <= the
            recall reached, 0 beyond). Equal scores always count as one threshold (worse-matching
            detections ranked first), so results never depend on how instances are numbered.
        truth_classes: per image, (H, W) uint8 class ids; an object's class is the majority
            foreground class under its pixels. None makes every object class 1.
        pred_classes: the same for predictions.
        classes: class names, background first; with more than two, AP is per class.

    Returns:
        ap (AP@[.50:.95]), ap50, ap75, ap_by_iou (10 floats, AP at each of IOU_THRESHOLDS),
        count_error (mean over images of |n_pred - n_true| / max(n_true, 1)), objects_true and
        objects_pred (totals over images), images. The AP keys are COCO's mean over the classes
        that have ground truth; with more than two classes also ap_<class> and ap50_<class>. A
        class (or the whole set) without ground truth scores 1.0 if nothing was predicted for it
        and 0.0 otherwise. Predictions of a class with no ground truth anywhere are not counted
        in the mean (COCO behaviour); predictions in images without truth are false positives.
    """
    images = _checked_images(truths, predictions, scores, truth_classes, pred_classes, classes)
    gt_anns, dt_anns = [], []
    for i, (truth, prediction) in enumerate(zip(truths, predictions, strict=True)):
        gt_anns += _rle_annotations(truth, i, _pick(truth_classes, i))
        dt_anns += _detections(prediction, i, _pick(pred_classes, i), _pick(scores, i))
    category_ids = list(range(1, len(classes)))
    by_class = _ap_by_iou(images, gt_anns, dt_anns, category_ids, IOU_THRESHOLDS)  # (T, K)
    with_truth = [k for k, c in enumerate(category_ids) if any(a["category_id"] == c for a in gt_anns)]
    if with_truth:
        by_iou = by_class[:, with_truth].mean(axis=1)  # COCO's mean over classes with ground truth
    else:
        by_iou = np.full(len(IOU_THRESHOLDS), _ap_without_truth(len(dt_anns)))
    summary = _ap_keys(by_iou)
    if len(category_ids) > 1:
        for name, column in zip(classes[1:], by_class.T, strict=True):
            summary[f"ap_{name}"] = float(column.mean())
            summary[f"ap50_{name}"] = float(column[IOU_THRESHOLDS.index(0.5)])
    n_true, n_pred = _per_image(gt_anns, len(images)), _per_image(dt_anns, len(images))
    errors = [_count_error(t, p) for t, p in zip(n_true.tolist(), n_pred.tolist(), strict=True)]
    summary["count_error"] = float(np.mean(errors))
    summary.update(objects_true=int(n_true.sum()), objects_pred=int(n_pred.sum()), images=len(images))
    return summary


def image_instance_scores(
    truth: np.ndarray, prediction: np.ndarray, scores: dict[int, float] | None = None
) -> dict:
    """One image's object counts and class-agnostic AP50, through the same pycocotools path.

    Args:
        truth: (H, W) integer instance ids, 0 = background.
        prediction: (H, W) integer instance ids.
        scores: {prediction id: confidence}; None gives every object 1.0 (see instance_summary).

    Returns:
        objects_true, objects_pred, count_error (|n_pred - n_true| / max(n_true, 1)), ap50
        (1.0 for an image without truth objects only if nothing was predicted, else 0.0) and
        the unmatched objects by kind (object_errors: merged, missed, outlined, fragments,
        unannotated).
    """
    images = [_checked_image(0, truth, prediction)]
    gt_anns = _rle_annotations(truth, 0)
    dt_anns = _detections(prediction, 0, None, scores)
    if gt_anns:
        ap50 = float(_ap_by_iou(images, gt_anns, dt_anns, [1], (0.5,))[0, 0])
    else:
        ap50 = _ap_without_truth(len(dt_anns))
    return {
        "objects_true": len(gt_anns),
        "objects_pred": len(dt_anns),
        "count_error": _count_error(len(gt_anns), len(dt_anns)),
        "ap50": ap50,
    } | object_errors(truth, prediction)


# An annotated object less than this share covered by predicted objects was missed.
MISSED_COVER = 0.2
# The kinds object_errors counts, in the order reports list them.
ERROR_KINDS = ("merged", "missed", "outlined", "fragments", "unannotated")


def object_errors(truth: np.ndarray, prediction: np.ndarray) -> dict[str, int]:
    """What went wrong with the objects that do not match at IoU 0.5, counted per kind.

    AP says how many objects were lost, not why; a user choosing between more training
    data, another instance method or other thresholds needs to know whether the model merges
    touching objects, cuts them up, or misses them. Of the annotated objects without a
    prediction of IoU >= 0.5:
      merged: at least half of it lies in one prediction that also covers at least half of
        another annotated object (touching objects segmented as one);
      missed: predictions cover under MISSED_COVER of it;
      outlined: the rest (found, but outlined too small or large, or cut in pieces).
    Of the predicted objects without an annotated one of IoU >= 0.5:
      fragments: at least half of it lies inside one annotated object (a piece of a cut one);
      unannotated: under half of it lies on annotated objects (a false detection, or an
      object the annotators left out).
    One spanning several annotated objects is neither: they count it, as merged.
    """
    area_t, area_p, inside, iou = _overlaps(truth, prediction)
    true_ids = np.flatnonzero(area_t[1:])  # ids that occur (0-based into inside)
    pred_ids = np.flatnonzero(area_p[1:])
    errors = dict.fromkeys(ERROR_KINDS, 0)
    for i in true_ids:
        if iou[i].max(initial=0) >= 0.5:
            continue
        if inside[i].sum() < MISSED_COVER * area_t[i + 1]:
            errors["missed"] += 1
            continue
        main = int(np.argmax(inside[i]))
        others = (inside[:, main] >= 0.5 * area_t[1:]) & (np.arange(len(inside)) != i) & (area_t[1:] > 0)
        errors["merged" if others.any() and inside[i, main] >= 0.5 * area_t[i + 1] else "outlined"] += 1
    for j in pred_ids:
        if iou[:, j].max(initial=0) >= 0.5:
            continue
        if inside[:, j].max(initial=0) >= 0.5 * area_p[j + 1]:
            errors["fragments"] += 1
        elif inside[:, j].sum() < 0.5 * area_p[j + 1]:
            errors["unannotated"] += 1
        # else it spans several annotated objects: those count it, as merged
    return errors


def best_overlaps(truth: np.ndarray, prediction: np.ndarray) -> dict[int, float]:
    """Each predicted object's largest IoU with an annotated one (0.0 if it overlaps none).

    Args:
        truth: (H, W) integer instance ids, 0 = background.
        prediction: (H, W) integer instance ids of the same shape.

    Returns:
        {prediction id: IoU}, for the ids present in `prediction`.
    """
    present = np.unique(prediction)
    present = present[present > 0]
    # Numbered 1..n, the columns of _overlaps' IoU are the present ids in order.
    iou = _overlaps(truth, sequential_ids(prediction))[3]
    return {int(i): float(v) for i, v in zip(present, iou.max(axis=0, initial=0.0), strict=True)}


def _overlaps(truth: np.ndarray, prediction: np.ndarray):
    """What object_errors and best_overlaps read from the pixel counts of every (annotated,
    predicted) id pair: annotated areas, predicted areas (by id, 0 = background), the counts
    of object pairs (background left out) and their IoU."""
    t, p = truth.ravel(), prediction.ravel()
    if (int(t.max(initial=0)) + 1) * (int(p.max(initial=0)) + 1) > 2**24:
        t, p = sequential_ids(t), sequential_ids(p)  # sparse ids (a few numbered up to 65,535)
    t, p = t.astype(np.int64), p.astype(np.int64)
    n_t, n_p = int(t.max(initial=0)) + 1, int(p.max(initial=0)) + 1
    overlap = np.bincount(t * n_p + p, minlength=n_t * n_p).reshape(n_t, n_p)  # pixels per id pair
    area_t, area_p = overlap.sum(1), overlap.sum(0)
    inside = overlap[1:, 1:]  # object pairs, background left out
    iou = inside / np.maximum(area_t[1:, None] + area_p[None, 1:] - inside, 1)
    return area_t, area_p, inside, iou


def error_totals(counts: list[dict]) -> dict[str, int]:
    """The unmatched objects by kind (ERROR_KINDS) summed over per-image rows or per-set summaries;
    {} where one of them has no counts (no instance ids), so a caller can merge it unconditionally."""
    if not counts or not all(kind in c for c in counts for kind in ERROR_KINDS):
        return {}
    return {kind: int(sum(c[kind] for c in counts)) for kind in ERROR_KINDS}


def _ap_keys(by_iou: np.ndarray) -> dict:
    return {
        "ap": float(by_iou.mean()),
        "ap50": float(by_iou[IOU_THRESHOLDS.index(0.5)]),
        "ap75": float(by_iou[IOU_THRESHOLDS.index(0.75)]),
        "ap_by_iou": [float(v) for v in by_iou],
    }


def _per_image(annotations: list[dict], n_images: int) -> np.ndarray:
    """(n_images,) int64 number of objects in each image."""
    return np.bincount(np.array([a["image_id"] for a in annotations], dtype=np.int64), minlength=n_images)


def _count_error(n_true: int, n_pred: int) -> float:
    return abs(n_pred - n_true) / max(n_true, 1)


def _ap_without_truth(n_pred: int) -> float:
    # AP is undefined without ground truth (pycocotools says -1); like Counts.scores, an empty
    # truth predicted empty is perfect and any prediction is wrong.
    return 1.0 if n_pred == 0 else 0.0


def _pick(values: list | None, i: int):
    return None if values is None else values[i]


def _checked_images(truths, predictions, scores, truth_classes, pred_classes, classes) -> list[dict]:
    """Validate the inputs of instance_summary; return the COCO image records."""
    if not truths:
        raise ValueError("no images to summarise")
    if len(classes) < 2:
        raise ValueError(f"classes {list(classes)} needs background plus at least one class")
    optional = {"scores": scores, "truth_classes": truth_classes, "pred_classes": pred_classes}
    for name, values in {"predictions": predictions, **optional}.items():
        if values is not None and len(values) != len(truths):
            raise ValueError(f"{name} has {len(values)} entries for {len(truths)} truth images")
    for name, masks in (("truth_classes", truth_classes), ("pred_classes", pred_classes)):
        for i, mask in enumerate(masks or []):
            _check_shape(i, name, mask, truths[i])
            if mask.max(initial=0) >= len(classes):
                raise ValueError(
                    f"image {i}: {name}[{i}] holds class id {mask.max()} but classes names only "
                    f"{len(classes)}: {list(classes)}"
                )
    return [
        _checked_image(i, truth, prediction)
        for i, (truth, prediction) in enumerate(zip(truths, predictions, strict=True))
    ]


def _checked_image(i: int, truth: np.ndarray, prediction: np.ndarray) -> dict:
    """Validate one truth/prediction pair; return its COCO image record."""
    for name, labels in (("truths", truth), ("predictions", prediction)):
        if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"image {i}: {name}[{i}] is {labels.dtype} {labels.shape}; expected (H, W) integer "
                "instance ids (segflow.core.objects.label_instances turns a class mask into them)"
            )
    _check_shape(i, "predictions", prediction, truth)
    return {"id": i, "height": truth.shape[0], "width": truth.shape[1]}


def _check_shape(i: int, name: str, array: np.ndarray, truth: np.ndarray) -> None:
    if array.shape != truth.shape:
        raise ValueError(f"image {i}: {name}[{i}] has shape {array.shape} but its truth has {truth.shape}")


def _rle_annotations(labels: np.ndarray, image_id: int, class_mask: np.ndarray | None = None) -> list[dict]:
    """COCO annotations, one compressed RLE per instance of an (H, W) instance-id image.

    Args:
        labels: (H, W) integer instance ids, 0 = background.
        image_id: the COCO image id (the image's index).
        class_mask: (H, W) class ids giving each instance its majority class; None = class 1.

    Returns:
        Dicts with image_id, category_id, segmentation, area, iscrowd and instance_id, ordered
        by instance id; COCO ids are assigned by _coco, detection scores by _detections.
    """
    ids, rles, areas = _instance_rles(labels)
    classes = _majority_classes(labels, class_mask, ids, image_id)
    return [
        {
            "image_id": image_id,
            "category_id": c,
            "segmentation": rle,
            "area": a,
            "iscrowd": 0,
            "instance_id": i,
        }
        for i, c, rle, a in zip(ids, classes, rles, areas, strict=True)
    ]


def _instance_rles(labels: np.ndarray) -> tuple[list[int], list[dict], list[float]]:
    """Instance ids, their compressed COCO RLEs and areas, from one pass over the pixels.

    Why not pycocotools.mask.encode per instance: each call scans the whole image, which costs
    ~50 ms for 100 objects in 1024x1024; the runs of the label image give every mask at once.
    The RLEs are byte-identical to encode's (a unit test checks).
    """
    from pycocotools import mask as coco_mask

    height, width = labels.shape
    flat = labels.ravel(order="F")  # (H*W,) COCO RLE runs down columns
    starts = np.flatnonzero(np.r_[True, flat[1:] != flat[:-1]])  # first pixel of each run
    ends = np.r_[starts[1:], flat.size]
    foreground = flat[starts] != 0
    starts, ends, values = starts[foreground], ends[foreground], flat[starts][foreground]
    order = np.argsort(values, kind="stable")  # group runs by instance, in pixel order
    starts, ends, values = starts[order], ends[order], values[order]
    ids, first = np.unique(values, return_index=True)
    if not len(ids):
        return [], [], []
    uncompressed = []
    for run_starts, run_ends in zip(np.split(starts, first[1:]), np.split(ends, first[1:]), strict=True):
        # COCO counts alternate background and object runs, starting with background.
        bounds = np.r_[0, np.column_stack([run_starts, run_ends]).ravel(), flat.size]
        counts = np.diff(bounds).tolist()
        uncompressed.append({"counts": counts[:-1] if counts[-1] == 0 else counts, "size": [height, width]})
    rles = coco_mask.frPyObjects(uncompressed, height, width)
    areas = [float(sum(c["counts"][1::2])) for c in uncompressed]
    return ids.tolist(), rles, areas


def _detections(
    prediction: np.ndarray, image_id: int, class_mask: np.ndarray | None, scores: dict[int, float] | None
) -> list[dict]:
    """_rle_annotations of a prediction plus each object's score (1.0 when scores is None)."""
    annotations = _rle_annotations(prediction, image_id, class_mask)
    for a in annotations:
        score = 1.0 if scores is None else scores.get(a["instance_id"], np.nan)
        if not np.isfinite(score):
            raise ValueError(
                f"image {image_id}: prediction {a['instance_id']} has no finite score; scores must "
                "give one for every prediction id, or be None"
            )
        a["score"] = float(score)
    return annotations


def _majority_classes(labels: np.ndarray, class_mask: np.ndarray | None, ids: list[int], image_id: int):
    """The most frequent non-zero class under each instance (ties: the lower class id)."""
    if class_mask is None:
        return [1] * len(ids)
    inside = (labels != 0) & (class_mask != 0)
    # One code per (instance, class) pair, so a single np.unique counts all of them.
    base = int(class_mask.max()) + 1
    pairs, counts = np.unique(labels[inside].astype(np.int64) * base + class_mask[inside], return_counts=True)
    best: dict[int, tuple[int, int]] = {}
    for pair, count in zip(pairs.tolist(), counts.tolist(), strict=True):
        instance_id, class_id = divmod(pair, base)
        if instance_id not in best or count > best[instance_id][0]:
            best[instance_id] = (count, class_id)
    missing = [i for i in ids if i not in best]
    if missing:
        raise ValueError(
            f"image {image_id}: instances {missing[:5]} lie entirely on class 0 of their class mask; "
            "class masks must give every instance a foreground class"
        )
    return [best[i][1] for i in ids]


def _ap_by_iou(images, gt_anns, dt_anns, category_ids, thresholds) -> np.ndarray:
    """(T, K) AP per IoU threshold and category; categories without truth get _ap_without_truth.

    Re-scores dt_anns in place (_rank_ties).
    """
    from pycocotools.cocoeval import COCOeval

    _rank_ties(gt_anns, dt_anns)
    per_image = _per_image(dt_anns, len(images))
    categories = [{"id": c, "name": str(c)} for c in category_ids]
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        evaluation = COCOeval(_coco(images, gt_anns, categories), _coco(images, dt_anns, categories), "segm")
        evaluation.params.iouThrs = np.array(thresholds)
        evaluation.params.maxDets = [max(per_image.max(), 1)]  # never cap recall
        evaluation.params.areaRng, evaluation.params.areaRngLbl = [[0, 1e10]], ["all"]
        evaluation.evaluate()
        evaluation.accumulate()
    # (T, R=101 recall points, K, A=1, M=1) precision; -1 marks categories without truth.
    ap = evaluation.eval["precision"][:, :, :, 0, -1].mean(axis=1)  # (T, K)
    for k, category_id in enumerate(category_ids):
        if not any(a["category_id"] == category_id for a in gt_anns):
            ap[:, k] = _ap_without_truth(sum(a["category_id"] == category_id for a in dt_anns))
    return ap


def _rank_ties(gt_anns: list[dict], dt_anns: list[dict]) -> None:
    """Replace detection scores by distinct ranks that put worse matches first among equal scores.

    Why: pycocotools keeps tied detections in listed order, so with equal scores AP would depend
    on how instances happen to be numbered. Ranking a tie's worse-matching detections first makes
    it count as one threshold, as scikit-learn's PR curve does (except two detections with IoU
    exactly 0.5 to one object, where the first listed matches). COCO only uses scores to order.
    """
    from pycocotools import mask as coco_mask

    truths: dict[tuple[int, int], list] = {}
    for a in gt_anns:
        truths.setdefault((a["image_id"], a["category_id"]), []).append(a["segmentation"])
    groups: dict[tuple[int, int], list[int]] = {}
    for i, a in enumerate(dt_anns):
        groups.setdefault((a["image_id"], a["category_id"]), []).append(i)
    best_iou = np.zeros(len(dt_anns))
    for key, members in groups.items():
        if key in truths:
            ious = coco_mask.iou(
                [dt_anns[i]["segmentation"] for i in members], truths[key], [0] * len(truths[key])
            )
            best_iou[members] = np.asarray(ious).max(axis=1)  # (D, G) -> (D,)
    order = np.lexsort((best_iou, -np.array([a["score"] for a in dt_anns])))
    for rank, i in enumerate(order.tolist()):
        dt_anns[i]["score"] = float(len(order) - rank)


def _coco(images: list[dict], annotations: list[dict], categories: list[dict]):
    """An in-memory pycocotools COCO; annotations get ids 1.. (COCOeval treats id 0 as unmatched)."""
    from pycocotools.coco import COCO

    coco = COCO()
    annotations = [{**a, "id": n} for n, a in enumerate(annotations, start=1)]
    coco.dataset = {"images": images, "annotations": annotations, "categories": categories}
    coco.createIndex()
    return coco
