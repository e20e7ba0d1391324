"""Model logits -> objects: the class mask and the instance ids.

`to_prediction` turns one image's logits (Segmenter.scaled_logits) into a `Prediction` as
the model's `Preprocessing` says: threshold, seeded watershed or connected components,
and small objects dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import cv2
import numpy as np

from segflow.core.instances import drop_small, split_by_class, watershed_instances
from segflow.core.objects import label_instances
from segflow.core.preprocessing import Preprocessing

# Instance methods whose last model channel seeds a watershed: P(interior) or normalised distance.
SEEDED = ("watershed", "distance")


@dataclass
class Prediction:
    """One image's result at its original size."""

    logits: np.ndarray  # two classes: (H, W) float32 foreground logit; K > 2: (K, H, W)
    probability: np.ndarray  # (H, W) float32 in [0, 1]: P(foreground) = 1 - P(background)
    mask: np.ndarray  # (H, W) uint8 class ids
    instances: np.ndarray  # (H, W) object ids, 0 = background: uint16, uint32 beyond 65,535 objects
    interior: np.ndarray | None = None  # watershed models: (H, W) float32 P(object interior)
    # Distance models: the same seed channel, each pixel's predicted distance to its object's
    # edge relative to the object's deepest point; how high it rises inside an object says how
    # sure the model is of its centre, so objects are scored by it (objects.object_scores).
    # None for watershed models: their interior probability is near 1 inside every object.
    centres: np.ndarray | None = None
    # A learned object score (Preprocessing.object_score) that ranks its objects, or None: the rule.
    object_score: dict | None = None


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function 1 / (1 + exp(-x)), float32, in place on one new array: it runs twice
    per image on every request. OpenCV's vectorised exp took a 256x256 plane in 0.04 ms
    against NumPy's tanh's 0.19, within 1e-7 of float64 (it saturates instead of overflowing,
    so large |x| give exactly 0 or 1)."""
    y = np.negative(x, dtype=np.float32)
    flat = y.reshape(-1)  # a view: OpenCV would read a 3-D array's last axis as channels
    cv2.exp(flat, flat)
    y += 1.0
    np.divide(1.0, y, out=y)
    return y


def to_prediction(logit: np.ndarray, prep: Preprocessing, scale: float = 1.0) -> Prediction:
    """(channels, H, W) logits -> Prediction, post-processed as `prep` says.

    The channels are one foreground logit (two classes) or K class logits, followed by
    one seed logit (interior or distance) when prep.instances is "watershed" or "distance".
    `scale` is the factor the image was resized by for the model (Segmenter.scaled_logits):
    prep.min_area counts pixels at the model's scale (see area_at).
    """
    watershed = prep.instances in SEEDED
    semantic = logit[:-1] if watershed else logit
    probability, mask = semantic_mask(semantic, prep.threshold)
    if watershed:
        interior = sigmoid(logit[-1])
        # Specks go in the same numbering pass; without_small_objects then finds none left,
        # unless split_by_class cuts an object into small pieces.
        min_area = area_at(prep.min_area, scale)
        instances = watershed_instances(
            mask > 0, interior, prep.seed_threshold, max(1, min_area), prep.seed_prominence
        )
        if len(prep.classes) > 2:
            instances = split_by_class(instances, mask)
    else:
        interior, instances = None, label_instances(mask)
    logits = semantic[0] if semantic.shape[0] == 1 else semantic
    centres = interior if prep.instances == "distance" else None
    prediction = Prediction(logits, probability, mask, instances, interior, centres, prep.object_score)
    return without_small_objects(prediction, prep.min_area, scale)


def area_at(min_area: int, scale: float) -> int:
    """min_area, counted in pixels at the model's scale, in pixels of an image it saw resized
    by `scale`. A size-normalised model sees every image with its objects train.diameter
    across, so one min_area drops the same specks, relative to the objects, at any
    magnification: cells imaged at 0.6x lose no more to it than cells at full size."""
    return max(1, round(min_area / scale**2)) if min_area > 0 else 0


def without_small_objects(prediction: Prediction, min_area: int, scale: float = 1.0) -> Prediction:
    """The prediction with objects under `min_area` pixels (at the model's scale, see area_at)
    removed from its instances and mask."""
    min_area = area_at(min_area, scale)
    if min_area <= 0:
        return prediction
    instances = drop_small(prediction.instances, min_area)
    mask = prediction.mask * (instances > 0)  # uint8: class ids where an object is left
    return replace(prediction, instances=instances, mask=mask)


def semantic_mask(logit: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(K, H, W) class logits (K = 1 for two classes) -> P(foreground) and the class-id mask.

    A pixel is foreground when P(foreground) = 1 - P(background) exceeds the threshold; with
    more than two classes it then takes the most probable foreground class.

    Returns:
        (H, W) float32 probability and (H, W) uint8 class ids.
    """
    if logit.shape[0] == 1:
        probability = sigmoid(logit[0])
        return probability, (probability > threshold).astype(np.uint8)
    probabilities = softmax(logit)  # (K, H, W)
    foreground = (1.0 - probabilities[0]).astype(np.float32)
    classes = (np.argmax(probabilities[1:], axis=0) + 1).astype(np.uint8)
    return foreground, np.where(foreground > threshold, classes, 0).astype(np.uint8)


def softmax(logit: np.ndarray) -> np.ndarray:
    """Softmax over axis 0 of (K, H, W) logits, float32."""
    shifted = np.exp(logit - logit.max(axis=0, keepdims=True))
    return (shifted / shifted.sum(axis=0, keepdims=True)).astype(np.float32)
