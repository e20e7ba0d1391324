"""Scoring segmentations the way the field does, tuning post-processing on val, baselines, overlays.

Everything here scores `Prediction`s from segflow.core.inference, so the numbers in
reports/metrics.json describe exactly what the CLI and the service return.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from itertools import product
from pathlib import Path

import numpy as np

from segflow.config import InferenceParams
from segflow.core.images import write_png
from segflow.core.inference import Segmenter
from segflow.core.objects import object_scores, outline_pixels
from segflow.core.postprocessing import SEEDED, Prediction, to_prediction, without_small_objects
from segflow.core.preprocessing import Preprocessing, scale_intensity, to_channels
from segflow.data.samples import Sample
from segflow.evaluate.baseline import otsu_segment, otsu_watershed
from segflow.evaluate.instance_metrics import error_totals, image_instance_scores, instance_summary
from segflow.evaluate.metrics import class_confusions, confusion, image_scores, summarize, summarize_classes

log = logging.getLogger(__name__)

TRUE_COLOUR = (0, 220, 0)  # green: ground-truth outlines
PRED_COLOUR = (255, 0, 200)  # magenta: predicted outlines
TUNING_SCORES = ("dice", "ap", "ap50", "count_error")  # recorded for every grid point


@dataclass
class SplitScores:
    """One set of images scored: summary, per-image rows, and the predictions behind them."""

    # Dice, IoU, ... and, with instance truth, AP, AP50, AP75, count error and the lost objects
    # by kind (ERROR_KINDS, totals over the images)
    summary: dict[str, float]
    rows: list[dict]  # one per image
    predictions: list[Prediction]
    ap_by_iou: list[float] | None  # AP at IoU 0.50, 0.55, ... 0.95; None without instance truth


def score_split(segmenter: Segmenter, samples: list[Sample], split: str) -> SplitScores:
    """Predict every sample with the segmenter's own post-processing and score it."""
    predictions = segmenter.predict([s.image for s in samples])
    return score_predictions(predictions, samples, list(segmenter.prep.classes), split)


def score_predictions(
    predictions: list[Prediction], samples: list[Sample], classes: list[str], split: str
) -> SplitScores:
    """Pixel scores (per class when K > 2) and, when every sample has instance ids, object scores
    with the unmatched objects counted by kind (instance_metrics.object_errors) over the images:
    `dvc metrics diff` then shows whether a change merged fewer neighbours or cut more apart."""
    summary = _pixel_summary(predictions, samples, classes)
    rows = []
    for p, s in zip(predictions, samples, strict=True):
        row = {"split": split, "image": s.id, **image_scores(class_confusions(p.mask, s.mask, len(classes)))}
        if s.instances is not None:
            confidences = object_scores(p.instances, p.probability, p.centres, p.object_score)
            row |= image_instance_scores(s.instances, p.instances, confidences)
        rows.append({k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()})
    ap_by_iou = None
    if samples and all(s.instances is not None for s in samples):
        objects = _object_summary(predictions, samples, classes)
        ap_by_iou = objects.pop("ap_by_iou")
        summary |= {k: v for k, v in objects.items() if k != "images"}
        summary |= error_totals(rows)
    return SplitScores(summary, rows, predictions, ap_by_iou)


def _pixel_summary(predictions: list[Prediction], samples: list[Sample], classes: list[str]) -> dict:
    pairs = list(zip(predictions, samples, strict=True))
    counts = [class_confusions(p.mask, s.mask, len(classes)) for p, s in pairs]
    summary = summarize_classes(counts, classes)
    if len(classes) > 2:  # comparable with the (foreground-only) threshold baseline
        summary["dice_foreground"] = summarize([confusion(p.mask, s.mask) for p, s in pairs])["dice"]
    return summary


def _object_summary(predictions: list[Prediction], samples: list[Sample], classes: list[str]) -> dict:
    multi = len(classes) > 2
    return instance_summary(
        [s.instances for s in samples],
        [p.instances for p in predictions],
        scores=[object_scores(p.instances, p.probability, p.centres, p.object_score) for p in predictions],
        truth_classes=[s.mask for s in samples] if multi else None,
        pred_classes=[p.mask for p in predictions] if multi else None,
        classes=classes,
    )


def tune_postprocessing(
    logits: list[np.ndarray],
    samples: list[Sample],
    prep: Preprocessing,
    cfg: InferenceParams,
    scales: list[float] | None = None,
) -> tuple[Preprocessing, list[dict]]:
    """Pick the post-processing that scores best on `samples` from the grids in `cfg`.

    Call it with the validation split only: the test split must stay unseen until scoring.

    Args:
        logits: the model's logits for each sample (Segmenter.logits), computed once.
        samples: the validation samples.
        prep: the model's preprocessing; its other fields are kept.
        cfg: params.inference: threshold_grid, seed_threshold_grid and seed_prominence_grid
            (watershed and distance models only), min_area_grid and tune_metric ("ap",
            "ap50": need instance ids, else Dice is used).
        scales: the factor each sample was resized by for the model (Segmenter.scaled_logits;
            default 1.0), which min_area is measured against.

    Returns:
        (prep with the best values, one row per grid point with its scores). Ties go to the
        lower object-count error, then to the first grid point, so the choice is repeatable.
    """
    seeded = prep.instances in SEEDED
    seeds = cfg.seed_threshold_grid if seeded else [prep.seed_threshold]
    prominences = cfg.seed_prominence_grid if seeded else [prep.seed_prominence]
    scales = scales or [1.0] * len(logits)
    classes, table = list(prep.classes), []
    for threshold, seed, prominence in product(cfg.threshold_grid, seeds, prominences):
        candidate = replace(
            prep, threshold=threshold, seed_threshold=seed, seed_prominence=prominence, min_area=0
        )
        unfiltered = [to_prediction(logit, candidate) for logit in logits]
        for min_area in cfg.min_area_grid:  # dropping small objects needs no new watershed
            pairs = zip(unfiltered, scales, strict=True)
            predictions = [without_small_objects(p, min_area, scale) for p, scale in pairs]
            scores = score_predictions(predictions, samples, classes, "val").summary
            row = {"threshold": threshold, "seed_threshold": seed, "seed_prominence": prominence}
            table.append(
                row
                | {"min_area": min_area}
                | {k: scores[k] for k in ("dice", "ap", "ap50", "count_error") if k in scores}
            )
    key = cfg.tune_metric if cfg.tune_metric in table[0] else "dice"
    best = max(table, key=lambda row: (row[key], -row.get("count_error", 0.0)))
    chosen = {k: best[k] for k in ("threshold", "seed_threshold", "seed_prominence", "min_area")}
    return prep.with_postprocess(chosen), table


@dataclass
class Tuning:
    """What choose_postprocessing chose on val, and what it cost."""

    prep: Preprocessing  # the model's preprocessing with the chosen post-processing and TTA
    grid: list[dict]  # every grid point tried, with its tta, diameter choices and val scores
    # the val logits under the chosen TTA (sized, where sizes are estimated, with
    # params.inference's post-processing: val_as_served)
    logits: list[np.ndarray]
    scales: list[float]  # the factor each val image was resized by for the model
    # model time per val image (sizes and tiles included), by TTA mode ("flips"; with several
    # diameter choices "flips_4sizes")
    seconds_per_image: dict[str, float]
    computed_with: Preprocessing  # the preprocessing `logits` and `scales` were computed under


def choose_postprocessing(segmenter: Segmenter, val: list[Sample], cfg: InferenceParams) -> Tuning:
    """Pick test-time augmentation and post-processing on the validation split.

    With cfg.tune, every TTA mode in cfg.tta_grid, with every entry of
    cfg.diameter_choices_grid, computes the val logits once and tune_postprocessing searches
    the thresholds for it; the best row overall wins, ties going to the cheaper one (config
    sorts both grids by cost). Without it, params.inference (tta included) is used as is.
    The segmenter's prep is left as chosen.
    """
    # params.inference as it is now; thresholds are tuned under the distance rule's ranking
    base = replace(segmenter.prep.with_postprocess(cfg.model_dump()), object_score=None)
    if not cfg.tune:
        (logits, scales), seconds = _timed_logits(segmenter, base, val)
        return Tuning(base, [], logits, scales, {base.tta: seconds}, base)
    best, best_score, grid, timings = None, None, [], {}
    for mode, choices in _views_and_sizes(base, cfg):
        name = mode if choices == [1.0] else f"{mode}_" + _sizes_name(choices)
        views = replace(base, tta=mode, diameter_choices=choices)
        (logits, scales), timings[name] = _timed_logits(segmenter, views, val)
        prep, table = tune_postprocessing(logits, val, views, cfg, scales)
        grid += [{"tta": mode, "diameter_choices": choices} | row for row in table]
        metric = cfg.tune_metric if cfg.tune_metric in table[0] else "dice"
        top = max(table, key=lambda row: (row[metric], -row.get("count_error", 0.0)))
        score = (top[metric], -top.get("count_error", 0.0))
        log.info("%s: best val %s %.4f, %.0f ms per image", name, metric, top[metric], 1000 * timings[name])
        if best_score is None or score > best_score:
            best_score, best = score, (prep, logits, scales, views)
    prep = best[0]
    if cfg.learned_score:
        prep = _with_learned_score(prep, best[1], best[2], val)
    segmenter.prep = prep
    return Tuning(prep, grid, best[1], best[2], timings, best[3])


def _with_learned_score(
    prep: Preprocessing, logits: list[np.ndarray], scales: list[float], val: list[Sample]
) -> Preprocessing:
    """`prep` with an object score fitted on the validation objects it gives (evaluate.objectscore);
    unchanged where the objects allow no fit. Logs val AP50 and AP under both rankings."""
    from segflow.evaluate.objectscore import fit_object_score

    predictions = [to_prediction(y, prep, a) for y, a in zip(logits, scales, strict=True)]
    fitted = fit_object_score(predictions, val)
    if fitted is None:
        return prep
    learned = replace(prep, object_score=fitted)
    before = _object_summary(predictions, val, list(prep.classes))
    after = _object_summary([replace(p, object_score=fitted) for p in predictions], val, list(prep.classes))
    log.info(
        "val AP50 %.4f -> %.4f, AP %.4f -> %.4f with the learned object score (fitted on these objects)",
        before["ap50"], after["ap50"], before["ap"], after["ap"],
    )  # fmt: skip
    return learned


def val_as_served(
    tuning: Tuning, segmenter: Segmenter, val: list[Sample]
) -> tuple[list[np.ndarray], list[float]]:
    """The val logits and scales as the chosen preprocessing produces them, for scoring val.

    Where inference estimates object sizes, the estimate reads the model's own objects, so it
    depends on the post-processing too: tuning sized the val images once per TTA mode with
    params.inference's values (not again per grid point), while served images are sized with
    the chosen ones. Where those differ, val is run once more, so its scores describe what is
    served (the segmenter's prep is left as chosen); elsewhere the tuning's logits are exactly that.
    """
    # The object score ranks objects; it changes none, nor any size estimate.
    if not sizes_estimated(tuning.prep) or tuning.computed_with == replace(tuning.prep, object_score=None):
        return tuning.logits, tuning.scales
    segmenter.prep = tuning.prep
    return segmenter.scaled_logits([s.image for s in val])


def sizes_estimated(prep: Preprocessing) -> bool:
    """Whether inference estimates each image's object size (a size-normalised model with
    inference.diameter auto)."""
    return bool(prep.train_diameter) and prep.diameter == "auto"


def _views_and_sizes(prep: Preprocessing, cfg: InferenceParams) -> list[tuple[str, list[float]]]:
    """The (tta, diameter_choices) pairs tuning tries, cheapest first within each mode. Size
    choices act only where sizes are estimated (a size-normalised model, diameter auto)."""
    sizes = cfg.diameter_choices_grid if sizes_estimated(prep) else [[1.0]]
    return [(mode, choices) for mode in cfg.tta_grid for choices in sizes]


def _sizes_name(choices: list[float]) -> str:
    """How timings name a diameter_choices entry: x0.85 for one multiple, 3sizes for three."""
    return f"x{choices[0]:g}" if len(choices) == 1 else f"{len(choices)}sizes"


def _timed_logits(
    segmenter: Segmenter, prep: Preprocessing, samples: list[Sample]
) -> tuple[tuple[list[np.ndarray], list[float]], float]:
    """The samples' logits and scales under `prep` (left on the segmenter), and the seconds per image."""
    segmenter.prep = prep
    started = time.perf_counter()
    logits_and_scales = segmenter.scaled_logits([s.image for s in samples])
    return logits_and_scales, (time.perf_counter() - started) / max(1, len(samples))


def classical_baseline(val: list[Sample], test: list[Sample], classes: list[str]) -> dict:
    """Otsu threshold + distance-transform watershed, scored by the same code as the model.

    Its free choices are made on val, like the model's post-processing, so the comparison is
    fair: the polarity (dark or bright cells) by pixel Dice, which is meaningful even where
    the threshold finds no whole object; then the seeds' minimum distance by AP (Dice when
    there are no instance ids).
    """
    key = "ap" if all(s.instances is not None for s in val) else "dice"

    def scored(samples: list[Sample], side: str, distance: int, split: str) -> SplitScores:
        predictions = [_as_prediction(otsu_watershed(s.image, side, distance)) for s in samples]
        return score_predictions(predictions, samples, classes, split)

    def pixel_dice(side: str) -> float:
        return summarize([confusion(otsu_segment(s.image, side), s.mask) for s in val])["dice"]

    side = max(("dark", "bright"), key=pixel_dice)
    distance = max((3, 6, 10, 15, 25), key=lambda d: scored(val, side, d, "val").summary[key])
    test_scores = scored(test, side, distance, "test")
    return {
        "method": "otsu+watershed",
        "foreground": side,
        "min_distance": distance,
        "test": test_scores.summary,
        "ap_by_iou": test_scores.ap_by_iou,
    }


def _as_prediction(instances: np.ndarray) -> Prediction:
    """A classical segmentation in the model's result type (every object fully confident)."""
    mask = (instances > 0).astype(np.uint8)
    return Prediction(mask.astype(np.float32), mask.astype(np.float32), mask, instances)


def overlay(image: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: the image in gray with each true (green) and predicted (magenta) object outlined.

    Args:
        truth, pred: (H, W) instance ids (or class ids, when there are no instances).
    """
    display = Preprocessing(1, 0.0, 1.0, 1, 0.5, scaling="percentile")  # dim 16-bit images visible too
    gray = (np.clip(to_channels(scale_intensity(image, display), 1)[0], 0, 1) * 255).astype(np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    rgb[outline_pixels(truth)] = TRUE_COLOUR
    rgb[outline_pixels(pred)] = PRED_COLOUR
    return rgb


def write_overlays(folder: Path, samples: list[Sample], predictions: list[Prediction], count: int) -> None:
    """Replace `folder` with overlays of the first `count` samples (named by sample id)."""
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    for sample, prediction in list(zip(samples, predictions, strict=True))[:count]:
        truth = sample.instances if sample.instances is not None else sample.mask
        write_png(folder / f"{sample.id}.png", overlay(sample.image, truth, prediction.instances))
