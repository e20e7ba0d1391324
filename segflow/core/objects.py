"""Objects in a predicted mask: instance labels, polygons, COCO RLE and outlines.

Shared by evaluation, the CLI and the service (through segflow.serve.answers), so an object
counted in a report is the object a client receives. OpenCV does the pixel work: it is
already a dependency of the augmentations and keeps per-request post-processing at a
fraction of a millisecond for typical images.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage as ndi

from segflow.core.masks import id_dtype
from segflow.errors import UserError

# Distinct outline colours (RGB), cycled by object id so touching objects differ.
PALETTE = np.array(
    [
        (255, 64, 64), (64, 200, 255), (255, 210, 0), (0, 230, 120), (255, 90, 220), (160, 120, 255),
        (255, 150, 40), (0, 190, 190), (200, 255, 80), (255, 120, 150), (90, 150, 255), (230, 230, 230),
    ],
    dtype=np.uint8,
)  # fmt: skip


@dataclass(frozen=True)
class SegmentedObject:
    """One connected object of one class."""

    id: int  # the object's value in the instance label image
    class_id: int
    area: int  # pixels
    bbox: tuple[int, int, int, int]  # COCO order: x, y, width, height
    polygon: list[int]  # outer contour, COCO order: x1, y1, x2, y2, ... (at least 3 points)
    score: float  # confidence in [0, 1] (object_scores)


def class_name(classes: list[str], class_id: int) -> str:
    """The name of a class id (class_<id> for an id the model's class list lacks)."""
    return classes[class_id] if class_id < len(classes) else f"class_{class_id}"


def label_instances(mask: np.ndarray) -> np.ndarray:
    """(H, W) uint8 class ids -> (H, W) instance ids, 0 = background: uint16, or uint32
    beyond 65,535 objects.

    Each class's 4-connected components get ids in raster order, class 1 first; the
    same connectivity the pipeline uses for ground-truth instances.
    """
    instances = np.zeros(mask.shape, np.uint32)
    next_id = 1
    for class_id in np.flatnonzero(np.bincount(mask.ravel())[1:]) + 1:  # classes present (faster than unique)
        count, labels = cv2.connectedComponents((mask == class_id).astype(np.uint8), connectivity=4)
        found = labels > 0
        instances[found] = labels[found] + (next_id - 1)
        next_id += count - 1
    return instances.astype(id_dtype(next_id - 1))


def object_scores(
    instances: np.ndarray,
    probability: np.ndarray,
    centres: np.ndarray | None = None,
    scorer: dict | None = None,
) -> dict[int, float]:
    """Each object's confidence in [0, 1]: what AP ranks objects by, and the answer's `score`.

    With `scorer` (Preprocessing.object_score, fitted on validation by
    segflow.evaluate.objectscore): the logistic regression it holds over object_features, an
    estimate of the chance the object matches a real one (IoU 0.5). Otherwise a rule.
    Distance models (`centres` given): the geometric mean of the predicted distance map's peak
    inside the object (how sure the model is that it has a centre) and its mean over it (how
    much of it the model sees as interior rather than rim). Other models: the mean
    probability over the object's pixels. Why not the mean probability for all: it is mostly
    the object's rim, which a fragment cut off a nucleus or a blob of background has as
    crisply as a real object; on dsb's 5-fold CV the distance rule ranked them lower
    (README). Watershed models keep the mean: their interior probability is near 1 inside
    every object, and ranking by it lowered the sample's AP50:95.

    Args:
        instances: (H, W) uint16 instance ids.
        probability: (H, W) float32 probability of each pixel's predicted class.
        centres: (H, W) float32 distance map in [0, 1] (Prediction.centres), or None.
        scorer: a fitted object score (see check_scorer), or None for the rule.
    """
    if scorer is not None:
        ids, features = object_features(instances, probability, centres)
        return dict(zip(ids.tolist(), learned_scores(features, scorer).tolist(), strict=True))
    areas = np.bincount(instances.ravel())
    ids = np.flatnonzero(areas[1:]) + 1
    values = probability if centres is None else centres
    means = np.bincount(instances.ravel(), weights=values.ravel().astype(np.float64))[ids] / areas[ids]
    if centres is not None:
        means = np.sqrt(means * ndi.maximum(centres, instances, ids))
    return {int(i): float(m) for i, m in zip(ids, means, strict=True)}


# What a learned object score weighs, in this order (names as preprocessing.json lists them).
# None depends on the object's size in pixels, so one fit serves images whose objects were
# rescaled differently (train.diameter) and images of any magnification.
SCORE_FEATURES = (
    "log_centre_mean",  # log of the distance map's mean over the object: interior, not rim
    "log_centre_peak",  # log of its peak: a centre the model is sure of
    "probability_mean",  # mean P(foreground) over the object
    "solidity",  # area / convex hull area: merged and torn objects are concave
    "shared_outline",  # share of the outline bordering another object: pieces of one nucleus
    "outline_probability",  # mean P(foreground) on the outline: a crisp edge or a faint one
)


def object_features(
    instances: np.ndarray, probability: np.ndarray, centres: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """The SCORE_FEATURES of every object of a distance model's prediction.

    Returns:
        (N,) int64 object ids in ascending order and (N, len(SCORE_FEATURES)) float64 features.
    """
    from skimage.measure import regionprops  # only learned scores need it: keep startup light

    if centres is None:
        raise UserError(
            "a learned object score needs a distance model (inference.instances: distance); "
            "set inference.learned_score: false for this model"
        )
    labels = instances.astype(np.int64, copy=False)
    ids = np.flatnonzero(np.bincount(labels.ravel())[1:]) + 1
    if not len(ids):
        return ids, np.zeros((0, len(SCORE_FEATURES)))
    outline = outline_pixels(instances)
    padded = np.pad(labels, 1)
    touching = np.zeros(instances.shape, bool)  # outline pixels with a 4-neighbour of another object
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        near = padded[dy : dy + labels.shape[0], dx : dx + labels.shape[1]]
        touching |= (near != labels) & (near > 0) & (labels > 0)
    n_outline = np.maximum(ndi.sum_labels(outline, labels, ids), 1)
    solidity = {r.label: r.solidity for r in regionprops(labels)}
    columns = [
        np.log(ndi.mean(centres, labels, ids) + 1e-3),
        np.log(ndi.maximum(centres, labels, ids) + 1e-3),
        ndi.mean(probability, labels, ids),
        np.array([solidity[i] for i in ids.tolist()]),
        ndi.sum_labels(touching, labels, ids) / n_outline,
        ndi.sum_labels(np.where(outline, probability, 0.0), labels, ids) / n_outline,
    ]
    return ids, np.column_stack(columns).astype(np.float64)


def learned_scores(features: np.ndarray, scorer: dict) -> np.ndarray:
    """(N, F) object_features -> (N,) float64 in [0, 1]: the scorer's logistic regression."""
    check_scorer(scorer)
    z = (features - np.asarray(scorer["mean"])) / np.asarray(scorer["scale"])
    return 1.0 / (1.0 + np.exp(-(z @ np.asarray(scorer["weights"]) + scorer["bias"])))


def check_scorer(scorer: dict) -> None:
    """Raise UserError unless `scorer` is a logistic regression over SCORE_FEATURES: keys
    features (the names, in order), mean and scale (standardisation) and weights (one per
    feature), and bias."""
    missing = [k for k in ("features", "mean", "scale", "weights", "bias") if k not in scorer]
    if missing:
        raise UserError(
            f"object_score in preprocessing.json lacks {', '.join(missing)}; re-run `dvc repro evaluate`"
        )
    if list(scorer["features"]) != list(SCORE_FEATURES):
        raise UserError(
            f"object_score in preprocessing.json weighs {list(scorer['features'])}, but this segflow "
            f"computes {list(SCORE_FEATURES)}; re-run `dvc repro evaluate export` to fit it again"
        )
    n = len(SCORE_FEATURES)
    if not all(len(scorer[k]) == n for k in ("mean", "scale", "weights")):
        raise UserError(f"object_score in preprocessing.json needs {n} values in mean, scale and weights")


def _object_score(
    probability: np.ndarray, centres: np.ndarray | None, inside: np.ndarray, area: int
) -> float:
    """object_scores' value for one object, from crops of its box (`inside`: its pixels)."""
    values = (probability if centres is None else centres)[inside]
    mean = values.astype(np.float64).sum() / area
    return mean if centres is None else float(np.sqrt(mean * values.max()))


def describe_objects(
    instances: np.ndarray,
    mask: np.ndarray,
    probability: np.ndarray,
    centres: np.ndarray | None = None,
    scorer: dict | None = None,
) -> list[SegmentedObject]:
    """One SegmentedObject per instance id, in id order.

    Args:
        instances: (H, W) uint16 instance ids from label_instances.
        mask: (H, W) uint8 class ids.
        probability: (H, W) float32 probability of each pixel's predicted class.
        centres: (H, W) float32 distance map of distance models, or None (see object_scores).
        scorer: a learned object score (Preprocessing.object_score), or None for the rule.
    """
    if not instances.size or not instances.any():
        return []
    # A learned score weighs features of all objects at once; the rule reads each object's box.
    learned = object_scores(instances, probability, centres, scorer) if scorer is not None else None
    objects = []
    # One bounding box per id (None for an id not present) in one C pass; each object's
    # quantities then come from its own box, a few dozen pixels, not from the whole image.
    for index, box in enumerate(ndi.find_objects(instances)):
        if box is None:
            continue
        obj_id = index + 1
        inside = instances[box] == obj_id
        crop = inside.view(np.uint8)
        area = cv2.countNonZero(crop)
        first = np.unravel_index(int(np.argmax(crop)), crop.shape)  # first pixel, row-major
        if learned is not None:
            score = learned[obj_id]
        else:
            score = _object_score(probability[box], None if centres is None else centres[box], inside, area)
        y0, x0 = box[0].start, box[1].start
        objects.append(
            SegmentedObject(
                id=obj_id,
                class_id=int(mask[box][first]),  # every object is of one class
                area=area,
                bbox=(x0, y0, box[1].stop - x0, box[0].stop - y0),
                polygon=_polygon(crop, x0, y0),
                score=round(float(score), 4),
            )
        )
    return objects


def _polygon(crop: np.ndarray, x0: int, y0: int) -> list[int]:
    """Outer contour of a (h, w) uint8 object crop, shifted to image coordinates."""
    contours, _ = cv2.findContours(crop, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    contour = max(contours, key=len).reshape(-1, 2)
    if len(contour) < 3:
        # A one-pixel-wide line or a single pixel: its contour has 1-2 points, not a valid
        # COCO polygon; use the corners of the pixels' box instead.
        h, w = crop.shape
        contour = np.array([(0, 0), (w, 0), (w, h), (0, h)])
    return np.add(contour, (x0, y0)).ravel().tolist()  # Python ints, as JSON wants


def coco_rle(binary: np.ndarray) -> dict:
    """(H, W) bool -> COCO compressed RLE {"size": [H, W], "counts": str}.

    The counts are run lengths in column-major order starting with a background run,
    encoded the way pycocotools encodes them (so `pycocotools.mask.decode` reads it).
    """
    height, width = binary.shape
    flat = np.asarray(binary, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return {"size": [height, width], "counts": ""}
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate(([0], changes, [flat.size])))
    if flat[0]:
        runs = np.concatenate(([0], runs))
    return {"size": [int(height), int(width)], "counts": _encode_counts(runs.tolist())}


def _encode_counts(runs: list[int]) -> str:
    """pycocotools' compressed counts string, vectorised: coco_rle of a 2048x2048 mask of 1,500
    objects (34,216 runs) took 43.8 ms of CPU with a Python loop over the runs, 33.6 with this.

    Each count (after the second, as a difference from the count two before) is written in
    5-bit groups, low first, with a continuation bit (0x20); characters start at '0'. A
    group's sign bit (0x10) says whether a negative difference has more groups to come."""
    values = np.asarray(runs, dtype=np.int64)
    if len(values) > 3:
        values[3:] = values[3:] - np.asarray(runs[1:-2], dtype=np.int64)
    columns, emitted, rest = [], np.ones(len(values), bool), values
    while emitted.any():
        group = rest & 0x1F
        rest = rest >> 5  # arithmetic: negative values run down to -1
        goes_on = np.where(group & 0x10, rest != -1, rest != 0) & emitted
        columns.append(np.where(emitted, group + 0x20 * goes_on + 48, -1))  # -1: no such group
        emitted = goes_on
    codes = np.stack(columns, axis=1)  # (runs, groups); row-major: each count's groups in order
    return codes[codes >= 0].astype(np.uint8).tobytes().decode("ascii")


def decode_coco_rle(rle: dict) -> np.ndarray:
    """COCO compressed RLE -> (H, W) bool; the inverse of coco_rle."""
    height, width = rle["size"]
    counts, text, pos = [], rle["counts"], 0
    while pos < len(text):
        value, shift, more = 0, 0, True
        while more:
            group = ord(text[pos]) - 48
            value |= (group & 0x1F) << (5 * shift)
            more = bool(group & 0x20)
            pos, shift = pos + 1, shift + 1
            if not more and group & 0x10:
                value |= -1 << (5 * shift)
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    flat = np.repeat(np.arange(len(counts)) % 2 == 1, counts)
    return flat.reshape((width, height)).T.copy()


def outline_pixels(instances: np.ndarray) -> np.ndarray:
    """(H, W) bool: object pixels with a 4-neighbour of another id (or the image edge)."""
    padded = np.pad(instances, 1, mode="constant")
    centre = padded[1:-1, 1:-1]
    edge = (
        (centre != padded[:-2, 1:-1])
        | (centre != padded[2:, 1:-1])
        | (centre != padded[1:-1, :-2])
        | (centre != padded[1:-1, 2:])
    )
    return edge & (centre > 0)


def display_rgb(image: np.ndarray) -> np.ndarray:
    """Any accepted image -> (H, W, 3) uint8 for people to look at.

    8-bit images are shown as they are; 16-bit and float images are stretched between
    their 0.5th and 99.5th percentiles, as microscopy viewers do, so dim data is visible.
    """
    if image.ndim == 3 and image.shape[2] == 4:
        image = image[..., :3]
    if image.dtype != np.uint8:
        values = image.astype(np.float32)
        low, high = np.percentile(values, (0.5, 99.5))
        scale = 255.0 / (high - low) if high > low else 0.0
        image = np.clip((values - low) * scale, 0, 255).astype(np.uint8)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image)


def draw_outlines(image: np.ndarray, instances: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: the image with each object's outline in its palette colour."""
    rgb = display_rgb(image).copy()
    edge = outline_pixels(instances)
    rgb[edge] = PALETTE[(instances[edge].astype(np.int64) - 1) % len(PALETTE)]
    return rgb
