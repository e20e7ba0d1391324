"""A learned object score: which predicted objects are real, fitted on validation.

COCO AP ranks every predicted object of a set of images by its score, pooled over the
images, so a confident false object in one image lowers precision everywhere. The distance
rule (segflow.core.objects.object_scores) reads only the distance map; a fragment cut off a
nucleus or a nucleus outlined with a wide halo can score as high as a clean one. Mask Scoring
R-CNN answers with a learned estimate of each mask's quality. Here it is a logistic
regression over a few features each object already has (core.objects.SCORE_FEATURES),
fitted on the validation split's objects, each labelled by whether an annotated object
matches it at IoU 0.5, after the thresholds are tuned there. Its coefficients travel in
preprocessing.json, so evaluation, the CLI and the service rank objects alike.
"""

from __future__ import annotations

import logging

import numpy as np

from segflow.core.objects import SCORE_FEATURES, object_features
from segflow.core.postprocessing import Prediction
from segflow.data.samples import Sample
from segflow.evaluate.instance_metrics import best_overlaps

log = logging.getLogger(__name__)

# L2 penalty on the standardised weights (not the bias): 5 is scikit-learn's C = 0.1. A few
# hundred validation objects and six features: a mild penalty keeps one odd image from
# setting a weight.
PENALTY = 5.0
MATCH_IOU = 0.5
# Fewer real or false validation objects than this and a fit would rank by noise: the rule stays.
MIN_PER_KIND = 10


def fit_object_score(predictions: list[Prediction], samples: list[Sample]) -> dict | None:
    """A logistic regression from each predicted object's features to whether it matches an
    annotated object (IoU >= 0.5), as Preprocessing.object_score holds it.

    Args:
        predictions: a distance model's predictions for `samples` (validation), post-processed
            as they will be served.
        samples: the images, with instance ids.

    Returns:
        {features, mean, scale, weights, bias, objects, matched}, or None when fewer than
        MIN_PER_KIND objects match or fewer fail to: the rule then stays.
    """
    features, matched = [], []
    for p, s in zip(predictions, samples, strict=True):
        ids, x = object_features(p.instances, p.probability, p.centres)
        ious = best_overlaps(s.instances, p.instances)
        features.append(x)
        matched += [ious[i] >= MATCH_IOU for i in ids.tolist()]
    x, y = np.vstack(features), np.asarray(matched, np.float64)
    real = int(y.sum())
    if min(real, len(y) - real) < MIN_PER_KIND:
        log.info(
            "learned object score: %d of %d validation objects match an annotated one at IoU %.1f; "
            "a fit needs %d of each kind, so the distance rule stays (more validation images help)",
            real, len(y), MATCH_IOU, MIN_PER_KIND,
        )  # fmt: skip
        return None
    mean, scale = x.mean(axis=0), np.maximum(x.std(axis=0), 1e-6)
    weights, bias = _logistic((x - mean) / scale, y, PENALTY)
    named = dict(zip(SCORE_FEATURES, np.round(weights, 3).tolist(), strict=True))
    log.info(
        "learned object score: fitted on %d validation objects (%d matched at IoU %.1f); weights %s",
        len(y), real, MATCH_IOU, named,
    )  # fmt: skip
    return {
        "features": list(SCORE_FEATURES),
        "mean": mean.tolist(),
        "scale": scale.tolist(),
        "weights": weights.tolist(),
        "bias": float(bias),
        "objects": len(y),
        "matched": real,
    }


def _logistic(x: np.ndarray, y: np.ndarray, penalty: float, steps: int = 50) -> tuple[np.ndarray, float]:
    """L2-penalised logistic regression by Newton's method: minimises the summed log loss plus
    penalty * |weights|^2 (the bias unpenalised). The loss is convex and the penalty makes it
    strictly so: Newton converges in a few steps from zero, deterministically.

    Returns:
        (F,) weights and the bias.
    """
    n, f = x.shape
    design = np.hstack([x, np.ones((n, 1))])  # (N, F + 1): the last column fits the bias
    ridge = np.full(f + 1, 2.0 * penalty)
    ridge[-1] = 0.0
    beta = np.zeros(f + 1)
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(design @ beta)))
        gradient = design.T @ (p - y) + ridge * beta
        hessian = (design * (p * (1 - p))[:, None]).T @ design + np.diag(ridge) + 1e-9 * np.eye(f + 1)
        step = np.linalg.solve(hessian, gradient)
        beta -= step
        if np.abs(step).max() < 1e-8:
            break
    return beta[:-1], float(beta[-1])
