"""Group k-fold cross-validation: how well the recipe does on images its model never saw.

One small test split cannot say how good a model is (two images of 1024x1024 are two
numbers). Cross-validation holds every image out once: the images are dealt into k folds by
group (the groups the split stage defines, so one patient's or one well's images stay
together); fold i is scored by a model trained, exactly as the train stage trains, on every
other fold except fold i + 1, which plays the validation split (best epoch, post-processing
and TTA chosen on it). The report gives every fold's scores and their mean and spread; for
models that estimate object sizes, also the same folds segmented at each image's true size.

Folds of a few images each differ more between partitions than most changes move the mean,
so `crossval.seeds` repeats the whole cross-validation with other partitions (each seed
deals the folds and seeds training, as base.seed does) and spreads over all their folds.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from segflow.config import Params
from segflow.core.inference import Segmenter
from segflow.core.postprocessing import to_prediction
from segflow.core.sizes import median_diameter, resize_image, resize_labels, scaled_shape
from segflow.data.samples import Sample, load_samples
from segflow.errors import UserError
from segflow.evaluate import foldstore
from segflow.evaluate.foldstore import FoldResult
from segflow.evaluate.instance_metrics import ERROR_KINDS, error_totals
from segflow.evaluate.scoring import SplitScores, choose_postprocessing, score_predictions, sizes_estimated
from segflow.train.checkpoints import checkpoint_segmenter
from segflow.train.loop import train_model

log = logging.getLogger(__name__)

# The scores summarised per fold (those a set lacks, e.g. AP without instance ids, are left out).
FOLD_METRICS = ("ap50", "ap", "ap75", "dice", "iou", "count_error")
WORKDIR_PREFIX = "segflow-crossval-"  # the fold models' temporary directory (_fold_models_dir)


def assign_folds(groups: pd.Series, folds: int, seed: int) -> pd.Series:
    """The fold (0..folds-1) of every row; rows of one group share a fold.

    Groups are shuffled with `seed` (after sorting, so row order does not matter) and each
    goes to the fold with the fewest images so far, which balances folds of unequal groups.

    Raises:
        UserError: fewer groups than folds.
    """
    names = np.array(sorted(groups.astype(str).unique()))
    if len(names) < folds:
        raise UserError(
            f"crossval.folds {folds} needs at least {folds} groups of images, found {len(names)}; "
            "lower crossval.folds or group less coarsely (split.group_regex, split.group_column)"
        )
    sizes = groups.astype(str).value_counts()
    filled, fold_of = [0] * folds, {}
    for name in names[np.random.default_rng(seed).permutation(len(names))]:
        fold = int(np.argmin(filled))
        fold_of[name] = fold
        filled[fold] += int(sizes[name])
    return groups.astype(str).map(fold_of).rename("fold")


def dataset_groups(manifest: pd.DataFrame, root: Path) -> tuple[list[Sample], pd.Series]:
    """Every image of the split manifests (sorted by id) as samples, with its group."""
    manifest = manifest.sort_values("id").reset_index(drop=True)
    return load_samples(manifest, root), manifest["group"]


def partition_seeds(params: Params) -> list[int]:
    """The seeds of the repeated cross-validation: crossval.seeds, or base.seed alone."""
    return list(params.crossval.seeds) or [params.base.seed]


def with_seed(params: Params, seed: int) -> Params:
    """The params with base.seed replaced: what deals one partition and seeds its training."""
    return params.model_copy(update={"base": params.base.model_copy(update={"seed": seed})})


def fold_roles(fold: int, folds: int) -> dict[str, list[int]]:
    """Which folds train, validate and are held out when scoring fold `fold`."""
    val = (fold + 1) % folds
    return {"held_out": [fold], "val": [val], "train": [f for f in range(folds) if f not in (fold, val)]}


def rescaled(samples: list[Sample], scale: float) -> list[Sample]:
    """The samples resized by `scale` (images by area or bilinear, masks and ids by nearest)."""
    if scale == 1.0:
        return samples
    out = []
    for s in samples:
        shape = scaled_shape(s.image.shape, scale)
        instances = None if s.instances is None else resize_labels(s.instances, shape)
        out.append(Sample(s.id, resize_image(s.image, shape), resize_labels(s.mask, shape), instances))
    return out


def run_fold(
    params: Params, samples: dict[int, list[Sample]], fold: int, workdir: Path, resume_dir: Path | None = None
) -> FoldResult:
    """Train on the fold's training folds, tune on its validation fold, score the held-out fold.

    With `resume_dir`, training keeps a resume state there (resume_dir/fold<i>.pt, see
    segflow.train.resume): an interrupted run continues the fold where it stopped, and a
    finished state whose fingerprint still matches (same base and train params, images,
    fold and training code) gives its model back without training again. The fold's result
    is kept there too (resume_dir/fold<i>.result.npz, see segflow.evaluate.foldstore): a
    rerun whose base, train and inference params, scales, images and code still match takes
    it without training, tuning or scoring again. params.base.seed is the partition's seed
    (with_seed): it seeds training and names the fold in the log.
    """
    roles = fold_roles(fold, len(samples))
    train = [s for f in roles["train"] for s in samples[f]]
    val, held_out = samples[roles["val"][0]], samples[fold]
    seed = params.base.seed
    if resume_dir is not None:
        prints = foldstore.fingerprint(params, {"train": train, "val": val, "held_out": held_out})
        earlier = _kept_result(fold, held_out, resume_dir, prints)
        if earlier is not None:
            return earlier
    log.info(
        "fold %d (seed %d): %d training, %d validation, %d held-out images",
        fold, seed, len(train), len(val), len(held_out),
    )  # fmt: skip
    started = time.perf_counter()
    resume = resume_dir / f"fold{fold}.pt" if resume_dir is not None else None
    history = train_model(params, train, val, workdir / f"fold{fold}.pt", resume_path=resume)
    # What training took, whenever it ran: a model restored from its resume state took it earlier.
    seconds = sum(record["seconds"] for record in history)
    segmenter = checkpoint_segmenter(workdir / f"fold{fold}.pt")
    tuning = choose_postprocessing(segmenter, val, params.inference)
    classes = list(segmenter.prep.classes)
    scores, rows, kept, known = {}, [], {}, {}
    for scale in params.crossval.scales:
        images = rescaled(held_out, scale)
        result, applied = _segment_and_score(segmenter, images, classes)
        scores[scale], kept[scale] = result.summary, (images, result.predictions)
        fold_rows = [
            {"seed": seed, "fold": fold, "scale": scale}
            | {k: v for k, v in r.items() if k != "split"}
            | _diameters(s, a, segmenter.prep.train_diameter)
            for r, s, a in zip(result.rows, images, applied, strict=True)
        ]
        at_true_size = known_diameter_scores(segmenter, images, classes)
        if at_true_size is not None:
            known[scale] = at_true_size.summary
            for row, r in zip(fold_rows, at_true_size.rows, strict=True):
                row["known_diameter_ap50"] = r.get("ap50")
        rows += fold_rows
    prep = tuning.prep
    chosen = {
        k: getattr(prep, k)
        for k in ("threshold", "seed_threshold", "seed_prominence", "min_area", "tta", "diameter_choices")
    } | {"object_score": "learned" if prep.object_score else "rule"}
    result = FoldResult(fold, scores, rows, chosen, len(history), seconds, kept, known, seed)
    minutes = (time.perf_counter() - started) / 60
    _log_fold(result, f"{minutes:.1f} min now; its model's training took {seconds / 60:.1f} min")
    if resume_dir is not None:
        foldstore.save_result(foldstore.result_path(resume_dir, fold), result, prints)
    return result


def _kept_result(
    fold: int, held_out: list[Sample], resume_dir: Path, prints: dict[str, str]
) -> FoldResult | None:
    """The fold's result as an earlier run kept it in resume_dir, if it still holds; else None."""
    path = foldstore.result_path(resume_dir, fold)
    result = foldstore.load_result(path, prints, lambda scale: rescaled(held_out, scale))
    if result is not None:
        _log_fold(result, f"kept from an earlier run in {path}")
    return result


def _log_fold(result: FoldResult, note: str) -> None:
    """Each fold's result as it lands, per scale: a run of an hour shows early where it is heading."""
    for scale, scores in result.scores.items():
        at_true_size = f"; at true diameters {_brief(result.known[scale])}" if scale in result.known else ""
        log.info(
            "fold %d held-out, scale %g: %s%s (seed %d; %s)",
            result.fold, scale, _brief(scores), at_true_size, result.seed, note,
        )  # fmt: skip


def _brief(scores: dict) -> str:
    """'ap50 0.858, ap 0.571, dice 0.931': the headline metrics a fold has."""
    return ", ".join(f"{m} {scores[m]:.3f}" for m in ("ap50", "ap", "dice") if scores.get(m) is not None)


def known_diameter_scores(
    segmenter: Segmenter, images: list[Sample], classes: list[str]
) -> SplitScores | None:
    """The images scored when segmented at their true median object diameter, as if a user had
    given it (`segflow predict --diameter`), instead of at the estimated one; None for models
    that estimate no sizes (no train.diameter, or a fixed inference.diameter) or images
    without instance ids. Images without objects have no true size and are estimated as usual.

    Set beside the estimated run's scores, it says how much the size estimate costs: what
    knowing each image's typical object size (a user who knows the magnification) would
    gain, and what it would not, as merges the model makes at the right size. The median is
    not the best size for every image, so an estimate can also beat it.
    """
    prep = segmenter.prep
    if not sizes_estimated(prep) or any(s.instances is None for s in images):
        return None
    # An image without objects has no true size: None lets inference estimate it.
    true = [median_diameter(s.instances) for s in images]
    return _segment_and_score(segmenter, images, classes, true)[0]


def _segment_and_score(
    segmenter: Segmenter, images: list[Sample], classes: list[str], diameters: list | None = None
) -> tuple[SplitScores, list[float]]:
    """Segmenter.predict on the images at `diameters` (None: as prep.diameter says), scored,
    and the factor each image was rescaled by for the model (its size estimate)."""
    logits, applied = segmenter.scaled_logits([s.image for s in images], diameters)
    predictions = [to_prediction(y, segmenter.prep, a) for y, a in zip(logits, applied, strict=True)]
    return score_predictions(predictions, images, classes, "held_out"), applied


def _diameters(sample: Sample, applied: float, train_diameter: float) -> dict:
    """A size-normalised model's view of one image: its objects' true median diameter and the
    one inference assumed (the trained diameter over the factor the image was rescaled by).
    Where AP is poor, a size estimate far off the truth says why (merged or split objects)."""
    if not train_diameter:
        return {}
    true = median_diameter(sample.instances) if sample.instances is not None else None
    return {
        "diameter_true": None if true is None else round(true, 2),
        "diameter_used": round(train_diameter / applied, 2),
    }


def check_subsets(subsets: dict[str, list[str]], ids: list[str]) -> None:
    """Raise UserError naming the subset ids that are not images of the dataset."""
    known = set(ids)
    for name, members in subsets.items():
        unknown = sorted(set(members) - known)
        if unknown:
            raise UserError(
                f"crossval.subsets.{name} names {unknown[:5]}, which are not image ids of the dataset "
                f"(ids are file stems, e.g. {sorted(known)[:3]})"
            )


def cross_validate(
    params: Params, samples: list[Sample], groups: pd.Series, resume_dir: Path | None = None
) -> list[FoldResult]:
    """Run every fold of every partition seed (partition_seeds; `groups` aligned with
    `samples`), training one model per fold (or taking it from its resume state in
    resume_dir/seed<seed>/, see run_fold)."""
    check_subsets(params.crossval.subsets, [s.id for s in samples])
    k, results = params.crossval.folds, []
    with _fold_models_dir(resume_dir) as tmp:
        for seed in partition_seeds(params):
            folds = assign_folds(groups, k, seed)
            by_fold = {f: [s for s, g in zip(samples, folds, strict=True) if g == f] for f in range(k)}
            states = resume_dir / f"seed{seed}" if resume_dir is not None else None
            workdir = Path(tmp) / f"seed{seed}"
            workdir.mkdir()
            results += [
                run_fold(with_seed(params, seed), by_fold, fold, workdir, states) for fold in range(k)
            ]
    return results


def _fold_models_dir(resume_dir: Path | None) -> tempfile.TemporaryDirectory:
    """A temporary directory for the fold models' checkpoints (hundreds of MB each).

    With resume_dir it lies inside it: a run killed before it could clean up (SIGKILL, a
    machine restart) leaves its checkpoints where the closing line's `rm -r` frees them, not
    in /tmp, and the next run removes what such a run left.
    """
    if resume_dir is None:
        return tempfile.TemporaryDirectory(prefix=WORKDIR_PREFIX)
    resume_dir.mkdir(parents=True, exist_ok=True)
    for stale in sorted(resume_dir.glob(f"{WORKDIR_PREFIX}*")):
        log.info("removing %s, fold models a killed cross-validation left", stale)
        shutil.rmtree(stale, ignore_errors=True)
    return tempfile.TemporaryDirectory(prefix=WORKDIR_PREFIX, dir=resume_dir)


def summarize_folds(
    results: list[FoldResult], scales: list[float], classes: list[str] | None = None,
    subsets: dict[str, list[str]] | None = None,
) -> dict:  # fmt: skip
    """reports/crossval/summary.json: per fold, and mean, standard deviation, min and max over folds.
    Per fold, per seed and pooled, the unmatched objects are also counted by kind (merged,
    missed, ...: instance_metrics.object_errors), summed over the images.

    Keys are per scale: "scale_1", "scale_0.6", so `dvc metrics show` can compare them. With
    `classes`, each scale also gets "pooled" (every held-out image scored together, as one
    set of unseen images) and one entry per named subset of images (`subsets`, e.g. the
    thin-cell images), scored the same way. Where every fold has scores at the images' true
    object sizes (FoldResult.known), each scale gets "known_diameter", spread like its own.

    Results of several partition seeds (crossval.seeds) are spread over all their folds
    together; "per_seed" then gives each seed's means, and "pooled" scores each image once
    per seed. "folds" and "images" count one partition.
    """
    seeds = list(dict.fromkeys(r.seed for r in results))
    first = [r for r in results if r.seed == seeds[0]]
    out: dict = {
        "folds": len(first),
        "seeds": seeds,
        "images": sum(int(r.scores[scales[0]]["images"]) for r in first),
    }
    for scale in scales:
        per_fold = [r.scores[scale] for r in results]
        metrics = [m for m in FOLD_METRICS if all(m in s for s in per_fold)]
        block = _spread(per_fold, metrics)
        block["per_fold"] = [_fold_row(r, scale, metrics) for r in results]
        if len(seeds) > 1:  # each partition's means: how far one cross-validation can be off
            block["per_seed"] = [
                {"seed": seed} | {m: v["mean"] for m, v in _spread(
                    [r.scores[scale] for r in results if r.seed == seed], metrics).items()}
                | error_totals([r.scores[scale] for r in results if r.seed == seed])
                for seed in seeds
            ]  # fmt: skip
        if all(scale in r.known for r in results):
            # The same folds segmented at each image's true object size (known_diameter_scores).
            block["known_diameter"] = _spread([r.known[scale] for r in results], metrics)
        elif any(scale in r.known for r in results):
            log.warning(
                "scale %g: no known_diameter summary, as some folds' held-out images lack instance ids "
                "(images.csv still has known_diameter_ap50 for the others)", scale,
            )  # fmt: skip
        if classes is not None:
            block["pooled"] = _pooled(results, scale, classes, metrics)
            for name, ids in (subsets or {}).items():
                block[f"subset_{name}"] = _pooled(results, scale, classes, metrics, set(ids))
        out[f"scale_{scale:g}"] = block
    out["chosen"] = [{"seed": r.seed, "fold": r.fold, "epochs": r.epochs} | r.chosen for r in results]
    return out


def _spread(per_fold: list[dict], metrics: list[str]) -> dict:
    """Mean, standard deviation (over folds), minimum and maximum of each metric."""
    block = {}
    for m in metrics:
        values = np.array([s[m] for s in per_fold], float)
        block[m] = {
            "mean": round(float(values.mean()), 6),
            "std": round(float(values.std(ddof=1)) if len(values) > 1 else 0.0, 6),
            "min": round(float(values.min()), 6),
            "max": round(float(values.max()), 6),
        }
    return block


def _pooled(
    results: list[FoldResult], scale: float, classes: list[str], metrics: list[str], ids=None
) -> dict:
    """Held-out images of every fold (those in `ids`, when given) scored together."""
    pairs = [
        (s, p) for r in results for s, p in zip(*r.held_out[scale], strict=True) if ids is None or s.id in ids
    ]
    if not pairs:
        raise UserError(f"crossval.subsets names images that are not in the dataset: {sorted(ids or [])}")
    samples, predictions = zip(*pairs, strict=True)
    summary = score_predictions(list(predictions), list(samples), classes, "pooled").summary
    return (
        {"images": int(summary["images"])}
        | {m: round(float(summary[m]), 6) for m in metrics if m in summary}
        | error_totals([summary])
    )


def _fold_row(result: FoldResult, scale: float, metrics: list[str]) -> dict:
    scores = result.scores[scale]
    return (
        {"seed": result.seed, "fold": result.fold, "images": int(scores["images"])}
        | {m: round(float(scores[m]), 6) for m in metrics}
        | error_totals([scores])
    )


def _errors_text(row: dict) -> str:
    """'; unmatched objects: merged 3, missed 1, ...' where `row` has the counts, else ''."""
    if ERROR_KINDS[0] not in row:
        return ""
    return "; unmatched objects: " + ", ".join(f"{kind} {row[kind]}" for kind in ERROR_KINDS)


def fold_table(summary: dict) -> list[dict]:
    """reports/crossval/folds.csv: one row per fold and scale."""
    return [
        row | {"scale": float(key.removeprefix("scale_"))}
        for key, block in summary.items()
        if key.startswith("scale_")
        for row in block["per_fold"]
    ]


def _mean_sd(block: dict) -> str:
    """'ap50 0.900 ± 0.100, dice ...': each metric's mean ± standard deviation over folds."""
    cells = [f"{m} {block[m]['mean']:.3f} ± {block[m]['std']:.3f}" for m in FOLD_METRICS if m in block]
    return ", ".join(cells)


def describe(summary: dict, scales: list[float]) -> str:
    """The cross-validated scores, mean ± standard deviation over folds: a line per scale, then
    each partition seed's means (several seeds), the same at known object sizes, pooled and
    per subset."""
    seeds = summary.get("seeds", [])
    if len(seeds) > 1:
        repeated = f"{len(seeds)} partitions (seeds {', '.join(map(str, seeds))}) of {summary['folds']} folds"
        lines = [f"crossval: {repeated}, {summary['images']} images, each scored once unseen per partition"]
    else:
        lines = [f"crossval: {summary['folds']} folds, {summary['images']} images, each scored once unseen"]
    for scale in scales:
        block = summary[f"scale_{scale:g}"]
        lines.append(f"  scale {scale:g}, mean ± sd over folds: " + _mean_sd(block))
        for row in block.get("per_seed", []):
            cells = [f"{m} {row[m]:.3f}" for m in FOLD_METRICS if m in row]
            lines.append(f"    seed {row['seed']}'s folds: " + ", ".join(cells) + _errors_text(row))
        if "known_diameter" in block:
            lines.append("    at each image's true object diameter: " + _mean_sd(block["known_diameter"]))
        for key in (k for k in block if k == "pooled" or k.startswith("subset_")):
            pooled = block[key]
            cells = [f"{m} {pooled[m]:.3f}" for m in FOLD_METRICS if m in pooled]
            scored = f"{pooled['images']} images" + (", each once per partition" if len(seeds) > 1 else "")
            lines.append(f"    {key} ({scored}): " + ", ".join(cells) + _errors_text(pooled))
    return "\n".join(lines)
