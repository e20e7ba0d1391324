"""A finished fold's result kept beside its resume state: it comes back whole, and only for
the run it belongs to."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest

from segflow.codebase import closure_files, source_root
from segflow.config import parse_params
from segflow.core.objects import SCORE_FEATURES
from segflow.core.postprocessing import Prediction
from segflow.data.samples import Sample
from segflow.evaluate import foldstore
from segflow.evaluate.crossval import rescaled, summarize_folds
from segflow.evaluate.foldstore import FoldResult, fingerprint, load_result, result_path, save_result
from segflow.evaluate.scoring import score_predictions


def _images(n: int, offset: int = 0) -> list[Sample]:
    out = []
    for i in range(n):
        ids = np.zeros((32, 48), np.uint16)
        ids[4:14, 4 + i : 16 + i] = 1
        ids[18:28, 20:36] = 2
        image = (ids > 0).astype(np.uint8) * (120 + i + offset)
        out.append(Sample(f"img{offset + i}", image, (ids > 0).astype(np.uint8), ids))
    return out


# A learned object score as evaluate fits one (objects.check_scorer); NumPy values, as fitted.
_SCORER = {
    "features": list(SCORE_FEATURES),
    "mean": np.zeros(len(SCORE_FEATURES)),
    "scale": np.ones(len(SCORE_FEATURES)),
    "weights": np.linspace(-1, 1, len(SCORE_FEATURES)),
    "bias": np.float32(0.25),
}


def _prediction(sample: Sample, distance: bool) -> Prediction:
    """A distance model's prediction (centres, a learned score) or a watershed model's (interior)."""
    probability = np.where(sample.mask > 0, 0.9, 0.1).astype(np.float32)
    seeds = np.where(sample.instances > 0, 0.7, 0.0).astype(np.float32)
    logits = np.log(probability / (1 - probability)).astype(np.float32)
    instances = sample.instances.copy()
    instances[instances == 2] = 0  # one object missed: the scores are not all 1
    if distance:
        return Prediction(logits, probability, sample.mask.copy(), instances, None, seeds, _SCORER)
    return Prediction(logits, probability, sample.mask.copy(), instances, seeds)


def _fold(params, held_out: list[Sample]) -> FoldResult:
    held, scores, known = {}, {}, {}
    for scale in params.crossval.scales:
        images = rescaled(held_out, scale)
        predictions = [_prediction(s, distance=i == 0) for i, s in enumerate(images)]
        held[scale] = (images, predictions)
        scores[scale] = score_predictions(predictions, images, ["background", "cell"], "held_out").summary
        known[scale] = scores[scale] | {"ap50": np.float64(0.5)}  # as if at the true sizes
    rows = [
        {"seed": 42, "fold": 1, "scale": 1.0, "image": "img0", "ap50": np.float32(0.5), "diameter_true": None}
    ]
    chosen = {"threshold": 0.5, "tta": "flips", "diameter_choices": [1.0], "object_score": "learned"}
    return FoldResult(1, scores, rows, chosen, 7, 12.5, held, known, 42)


@pytest.fixture
def fold(tmp_path):
    params = parse_params({"crossval": {"folds": 3, "scales": [1.0, 0.5]}})
    images = {"train": _images(3), "val": _images(1, 10), "held_out": _images(2, 20)}
    result = _fold(params, images["held_out"])
    path = result_path(tmp_path / "seed42", 1)
    save_result(path, result, fingerprint(params, images))
    return params, images, result, path


def _held(params, images):
    return lambda scale: rescaled(images["held_out"], scale)


def test_a_kept_result_comes_back_whole(fold):
    params, images, result, path = fold
    assert path.name == "fold1.result.npz" and path.is_file()
    back = load_result(path, fingerprint(params, images), _held(params, images))
    assert (back.fold, back.seed, back.epochs, back.train_seconds) == (1, 42, 7, 12.5)
    assert back.chosen == result.chosen and back.rows == result.rows
    assert back.scores == result.scores and back.known == result.known
    assert isinstance(back.rows[0]["ap50"], float) and set(back.scores) == {1.0, 0.5}
    for scale in (1.0, 0.5):
        (samples, predictions), (kept_samples, kept_predictions) = (
            result.held_out[scale],
            back.held_out[scale],
        )
        assert [s.id for s in kept_samples] == [s.id for s in samples]
        assert [s.image.shape for s in kept_samples] == [s.image.shape for s in samples]
        for p, q in zip(predictions, kept_predictions, strict=True):
            for name in ("logits", "probability", "mask", "instances", "interior", "centres"):
                if getattr(p, name) is None:
                    assert getattr(q, name) is None
                else:
                    np.testing.assert_array_equal(getattr(q, name), getattr(p, name))
                    assert getattr(q, name).dtype == getattr(p, name).dtype
        distance, watershed = kept_predictions
        assert distance.interior is None and watershed.centres is None and watershed.object_score is None
        for key, value in _SCORER.items():
            assert distance.object_score[key] == (list(value) if key == "features" else pytest.approx(value))
    # Pooled and summarised scores from a kept result are those of the result it kept.
    summaries = [summarize_folds([r], [1.0, 0.5], ["background", "cell"]) for r in (result, back)]
    assert summaries[0] == summaries[1]


@pytest.mark.parametrize(
    "change, part",
    [
        ({"inference": {"tta_grid": ["none", "flips"]}}, "params"),  # tuning would choose anew
        ({"crossval": {"folds": 3, "scales": [1.0]}}, "params"),
        ({"train": {"epochs": 3}}, "params"),
        ({"base": {"seed": 7}}, "params"),
        # Training's resume state ignores these two; a fold's result cannot: they decide its model.
        ({"train": {"early_stopping": 3}}, "params"),
        ({"train": {"size_head": False}}, "params"),
    ],
)
def test_a_result_scored_otherwise_is_not_reused(fold, change, part, caplog):
    params, images, _, path = fold
    caplog.set_level(logging.INFO)
    other = parse_params({"crossval": {"folds": 3, "scales": [1.0, 0.5]}} | change)
    assert load_result(path, fingerprint(other, images), _held(params, images)) is None
    assert f"it was scored with different {part}" in caplog.text


def test_reporting_params_and_threads_do_not_discard_a_result(fold):
    params, images, _, path = fold
    same = parse_params(
        {"crossval": {"folds": 3, "scales": [1.0, 0.5], "subsets": {"a": ["img20"]}, "seeds": [42, 7]},
         "train": {"threads": 1}}
    )  # fmt: skip
    assert load_result(path, fingerprint(same, images), _held(params, images)) is not None


def test_other_images_or_code_discard_a_result(fold, caplog, monkeypatch, tmp_path):
    params, images, _, path = fold
    caplog.set_level(logging.INFO)
    moved = images | {"held_out": _images(2, 21)}
    assert load_result(path, fingerprint(params, moved), _held(params, moved)) is None
    assert "different data" in caplog.text
    # An edit to code the fold reaches only through scoring, in a copy of the tree.
    for name in closure_files(foldstore.FOLD_MODULE):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source_root() / name, tmp_path / name)
    monkeypatch.setattr(foldstore, "source_root", lambda: tmp_path)
    assert load_result(path, fingerprint(params, images), _held(params, images)) is not None
    target = tmp_path / "segflow/evaluate/instance_metrics.py"
    target.write_text(target.read_text() + "\n# an edit\n")
    assert load_result(path, fingerprint(params, images), _held(params, images)) is None
    assert "different code" in caplog.text


def test_a_damaged_result_is_ignored_with_a_warning(fold, caplog):
    params, images, _, path = fold
    path.write_bytes(path.read_bytes()[:100])  # a run killed mid-write on a full disk
    assert load_result(path, fingerprint(params, images), _held(params, images)) is None
    assert "cannot be read" in caplog.text
    caplog.clear()
    assert load_result(path.with_name("fold9.result.npz"), {}, _held(params, images)) is None
    assert caplog.text == ""  # none kept: nothing to say
