"""A cross-validation fold's result, and how a finished one is kept beside its resume state.

A fold of the dsb recipe takes 20 minutes or more: training, then tuning on its validation
images and scoring its held-out ones with test-time augmentation. The training resume state
(segflow.train.resume) spares a rerun the training, not the tuning and scoring; the kept
result spares both, so a cross-validation killed in its fourth fold starts the fourth fold
again, not the first fold's tuning. A kept result carries a fingerprint of everything that
decides it (params but the reporting ones, the fold's images, the code and library
versions); one whose fingerprint differs is ignored with a message, never silently reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from importlib import metadata
from pathlib import Path

import numpy as np

from segflow.codebase import closure_files, source_root
from segflow.config import Params
from segflow.core.postprocessing import Prediction
from segflow.data.samples import Sample
from segflow.train import resume

log = logging.getLogger(__name__)

RESULT_FORMAT = 1
# The code that decides a fold's result: the cross-validation module and all it imports
# (training, inference, tuning, scoring), computed from the source by segflow.codebase.
FOLD_MODULE = "segflow.evaluate.crossval"
# Beside training's libraries, those that post-process (scipy, scikit-image, OpenCV) and score
# (pycocotools computes every AP).
LIBRARIES = (*resume.LIBRARIES, "scipy", "scikit-image", "opencv-python-headless", "pycocotools")
_ARRAYS = ("logits", "probability", "mask", "instances", "interior", "centres")


@dataclass
class FoldResult:
    fold: int
    scores: dict[float, dict]  # scale -> summary of the held-out images at that scale
    rows: list[dict]  # per held-out image and scale
    chosen: dict  # the post-processing and TTA chosen on the fold's validation images
    epochs: int
    train_seconds: float
    # scale -> (held-out samples at that scale, their predictions), for pooled scores
    held_out: dict[float, tuple[list[Sample], list[Prediction]]] = field(default_factory=dict)
    # scale -> summary of the held-out images segmented at their true object diameter, for
    # models that estimate sizes (known_diameter_scores); empty for the others
    known: dict[float, dict] = field(default_factory=dict)
    seed: int = 0  # the partition's seed (crossval.seeds, or base.seed)


def fingerprint(params: Params, images: dict[str, list[Sample]]) -> dict[str, str]:
    """Hashes of what a kept fold result must match, by part (so a mismatch can be named).

    Left out: crossval.subsets and crossval.seeds, which only decide what is summarised and
    which partitions run (a partition's seed is base.seed here), train.threads, which only
    reorders float sums, and train.distributed, which only the train stage reads (a fold
    trains in this process). Unlike training's resume state, train.early_stopping and
    train.size_head count: they decide the fold's model and its size estimates.

    Args:
        params: the partition's params (base.seed is its seed).
        images: {"train": ..., "val": ..., "held_out": ...}: the fold's samples by role.
    """
    settings = {
        "base": params.base.model_dump(mode="json"),
        "train": params.train.model_dump(mode="json", exclude={"threads", "distributed"}),
        "inference": params.inference.model_dump(mode="json"),
        "folds": params.crossval.folds,
        "scales": params.crossval.scales,
    }
    return {
        "params": hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest(),
        # Every field of the fold's samples, pixels included, hashed as training's resume state
        # hashes them (through its public fingerprint: resume.py belongs to the train stage's
        # deps, which an edit there would send back to training).
        "data": resume.fingerprint(params, {}, images)["data"],
        "code": code_hash(),
    }


def code_hash() -> str:
    """sha256 of the source of FOLD_MODULE's import closure and the libraries' versions."""
    digest = hashlib.sha256()
    root = source_root()
    for name in closure_files(FOLD_MODULE):
        digest.update(name.encode())
        digest.update((root / name).read_bytes())
    for library in LIBRARIES:
        try:
            version = metadata.version(library)
        except metadata.PackageNotFoundError:
            version = "absent"
        digest.update(f"{library}=={version}".encode())
    return digest.hexdigest()


def result_path(resume_dir: Path, fold: int) -> Path:
    return resume_dir / f"fold{fold}.result.npz"


def save_result(path: Path, result: FoldResult, prints: dict[str, str]) -> None:
    """Write the result atomically (temporary file, fsync, rename) as one .npz: the held-out
    predictions as arrays, the rest as JSON (nothing pickled)."""
    arrays, predictions = {}, []
    for scale, (_, preds) in result.held_out.items():
        predictions.append([scale, [p.object_score for p in preds]])
        for i, p in enumerate(preds):
            for name in _ARRAYS:
                if getattr(p, name) is not None:
                    arrays[f"{scale}/{i}/{name}"] = getattr(p, name)
    meta = {
        "format": RESULT_FORMAT,
        "fingerprint": prints,
        "result": {f.name: getattr(result, f.name) for f in fields(result) if f.name != "held_out"}
        | {"scores": _by_scale(result.scores), "known": _by_scale(result.known)},
        "object_scores": predictions,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as handle:
        np.savez_compressed(handle, meta=np.array(json.dumps(meta, default=_plain)), **arrays)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


def load_result(
    path: Path, prints: dict[str, str], samples_at: Callable[[float], list[Sample]]
) -> FoldResult | None:
    """The kept result if it belongs to this run, else None (saying why).

    Args:
        prints: this run's fingerprint of the fold.
        samples_at: scale -> the fold's held-out samples at that scale, as the fold scored
            them; called only for a result that holds, to put them back beside its predictions.
    """
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            meta = json.loads(str(stored["meta"]))
            if not _belongs(path, meta, prints):
                return None
            # Read only now: a result of other params is hundreds of MB never used.
            arrays = {name: stored[name] for name in stored.files if name != "meta"}
    except Exception as exc:  # truncated by a full disk, not an .npz, ...
        log.warning("crossval: ignoring %s: it cannot be read (%s: %s)", path, type(exc).__name__, exc)
        return None
    kept = meta["result"]
    kept["scores"], kept["known"] = _from_scale(kept["scores"]), _from_scale(kept["known"])
    result = FoldResult(**kept)
    for scale, scores in meta["object_scores"]:
        predictions = [
            Prediction(**{name: arrays.get(f"{scale}/{i}/{name}") for name in _ARRAYS}, object_score=score)
            for i, score in enumerate(scores)
        ]
        result.held_out[float(scale)] = (samples_at(float(scale)), predictions)
    return result


def _belongs(path: Path, meta: dict, prints: dict[str, str]) -> bool:
    """Whether a kept result's format and fingerprint are this run's (saying why not)."""
    if meta.get("format") != RESULT_FORMAT:
        log.warning("crossval: ignoring %s: format %s is not %s", path, meta.get("format"), RESULT_FORMAT)
        return False
    changed = [part for part, digest in prints.items() if meta.get("fingerprint", {}).get(part) != digest]
    if changed:
        log.info("crossval: not reusing %s: it was scored with different %s", path, ", ".join(changed))
        return False
    return True


def _by_scale(scores: dict[float, dict]) -> list:
    return [[scale, summary] for scale, summary in scores.items()]  # JSON keys would be strings


def _from_scale(pairs: list) -> dict[float, dict]:
    return {float(scale): summary for scale, summary in pairs}


def _plain(value):
    """NumPy scalars and arrays as JSON values."""
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
