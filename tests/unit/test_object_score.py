"""The learned object score: features, the fit on validation objects, and where it is used."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from segflow.config import InferenceParams, ParamsError, parse_params
from segflow.core.inference import Segmenter
from segflow.core.objects import (
    SCORE_FEATURES,
    check_scorer,
    describe_objects,
    object_features,
    object_scores,
)
from segflow.core.postprocessing import Prediction, to_prediction
from segflow.core.preprocessing import Preprocessing
from segflow.data.samples import Sample
from segflow.errors import UserError
from segflow.evaluate.instance_metrics import best_overlaps, instance_summary
from segflow.evaluate.objectscore import PENALTY, _logistic, fit_object_score
from segflow.evaluate.scoring import choose_postprocessing, score_predictions

H = W = 96
YY, XX = np.mgrid[:H, :W]


def _disc(cy: float, cx: float, r: float) -> np.ndarray:
    return (YY - cy) ** 2 + (XX - cx) ** 2 <= r * r


def _peak(cy: float, cx: float, r: float) -> np.ndarray:
    """A distance-map-like cone: 1 at (cy, cx), 0 at r + 1."""
    return np.clip(1 - np.hypot(YY - cy, XX - cx) / (r + 1), 0, 1)


def _scene(seed: int) -> tuple[Sample, Prediction]:
    """Three nuclei found (ids 1-3), a fourth cut into two touching pieces (4, 5), and a faint
    blob nobody annotated (6). The halves and the blob have crisper distance peaks than the
    real nuclei, so the distance rule ranks all three false objects first."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((H, W), np.uint16)
    pred = np.zeros((H, W), np.uint16)
    prob = np.zeros((H, W), np.float32)
    centres = np.zeros((H, W), np.float32)
    for i, (cy, cx) in enumerate([(15, 15), (15, 50), (50, 15)], start=1):
        m = _disc(cy + rng.integers(-2, 3), cx + rng.integers(-2, 3), 7)
        truth[m] = pred[m] = i
        prob[m] = 0.9 + 0.08 * rng.random()
        centres[m] = (0.75 + 0.1 * rng.random()) * _peak(cy, cx, 7)[m]
    truth[_disc(50, 50, 11)] = 4
    m = _disc(50, 50, 9)  # each half a third of the nucleus: IoU 0.33
    left, right = m & (XX < 50), m & (XX >= 50)
    pred[left], pred[right] = 4, 5
    prob[m] = 0.85 + 0.1 * rng.random()
    centres[left], centres[right] = _peak(50, 45, 5)[left], _peak(50, 55, 5)[right]
    m = _disc(80, 80, 6)
    pred[m] = 6
    prob[m] = 0.5 + 0.1 * rng.random()
    centres[m] = _peak(80, 80, 6)[m]
    prediction = Prediction(
        np.zeros((H, W), np.float32), prob, (pred > 0).astype(np.uint8), pred, centres, centres
    )
    return Sample(f"s{seed}", np.zeros((H, W), np.uint8), (truth > 0).astype(np.uint8), truth), prediction


def test_the_learned_score_ranks_real_objects_above_fragments_and_faint_blobs():
    fitted_on = [_scene(seed) for seed in range(4)]
    scorer = fit_object_score([p for _, p in fitted_on], [s for s, _ in fitted_on])
    assert scorer is not None and scorer["features"] == list(SCORE_FEATURES)
    assert scorer["objects"] == 24 and scorer["matched"] == 12
    sample, prediction = _scene(7)  # an image the fit never saw
    learned = object_scores(prediction.instances, prediction.probability, prediction.centres, scorer)
    rule = object_scores(prediction.instances, prediction.probability, prediction.centres)
    assert min(learned[i] for i in (1, 2, 3)) > max(learned[i] for i in (4, 5, 6))
    assert min(rule[i] for i in (1, 2, 3)) < max(rule[i] for i in (4, 5, 6))  # what the fit mends
    ap50 = {
        name: instance_summary([sample.instances], [prediction.instances], scores=[scores])["ap50"]
        for name, scores in (("rule", rule), ("learned", learned))
    }
    # Recall stops at 3 of 4 (the cut nucleus); ranked first, the three found ones give AP50 0.75.
    assert ap50["learned"] == pytest.approx(0.75, abs=0.01) and ap50["rule"] < 0.5


def test_objects_of_one_kind_allow_no_fit():
    sample, prediction = _scene(0)
    only_real = np.where(prediction.instances <= 3, prediction.instances, 0).astype(np.uint16)
    assert fit_object_score([replace(prediction, instances=only_real)], [sample]) is None


def test_the_fit_is_the_penalised_optimum():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4))
    y = (x @ np.array([1.5, -2.0, 0.0, 0.5]) + rng.normal(size=200) > 0).astype(float)
    weights, bias = _logistic(x, y, PENALTY)
    p = 1 / (1 + np.exp(-(x @ weights + bias)))
    # Gradient of the summed log loss + PENALTY |w|^2 vanishes at the optimum (bias unpenalised).
    assert np.abs(x.T @ (p - y) + 2 * PENALTY * weights).max() < 1e-6
    assert abs((p - y).sum()) < 1e-6
    assert weights[0] > 0.5 and weights[1] < -0.5 and abs(weights[2]) < 0.3


def test_features_see_shared_outlines_and_concavity():
    _, prediction = _scene(0)
    ids, x = object_features(prediction.instances, prediction.probability, prediction.centres)
    assert ids.tolist() == [1, 2, 3, 4, 5, 6] and x.shape == (6, len(SCORE_FEATURES))
    shared = x[:, SCORE_FEATURES.index("shared_outline")]
    assert shared[[0, 1, 2, 5]].max() == 0 and shared[[3, 4]].min() > 0.2  # the two halves touch
    assert x[:, SCORE_FEATURES.index("solidity")].min() > 0.8
    assert x[5, SCORE_FEATURES.index("probability_mean")] < 0.6
    with pytest.raises(UserError, match="instances: distance"):
        object_features(prediction.instances, prediction.probability, None)


def test_a_score_over_other_features_is_refused_with_what_to_do():
    scorer = {"features": ["area"], "mean": [0.0], "scale": [1.0], "weights": [1.0], "bias": 0.0}
    with pytest.raises(UserError, match="re-run `dvc repro evaluate export`"):
        check_scorer(scorer)
    with pytest.raises(UserError, match="lacks bias"):
        check_scorer({k: v for k, v in scorer.items() if k != "bias"})


def test_answers_carry_the_learned_score_and_the_contract_keeps_it(tmp_path):
    fitted_on = [_scene(seed) for seed in range(4)]
    scorer = fit_object_score([p for _, p in fitted_on], [s for s, _ in fitted_on])
    _, p = _scene(5)
    described = describe_objects(p.instances, p.mask, p.probability, p.centres, scorer)
    learned = object_scores(p.instances, p.probability, p.centres, scorer)
    assert [o.score for o in described] == [round(learned[o.id], 4) for o in described]
    prep = Preprocessing(
        in_channels=1, mean=0.5, std=0.25, pad_multiple=32, threshold=0.5, object_score=scorer
    )
    prep.save(tmp_path / "preprocessing.json")
    assert Preprocessing.load(tmp_path / "preprocessing.json") == prep


def test_best_overlaps_per_predicted_object():
    truth = np.zeros((10, 10), np.uint32)
    truth[0:4, 0:4] = 7
    prediction = np.zeros((10, 10), np.uint32)
    prediction[0:4, 0:2] = 70_000  # half of object 7: IoU 0.5
    prediction[8:10, 8:10] = 3  # over background
    assert best_overlaps(truth, prediction) == {3: 0.0, 70_000: 0.5}


def test_config_says_what_a_learned_score_needs():
    with pytest.raises(ParamsError, match="needs instances: distance"):
        parse_params({"inference": {"learned_score": True, "instances": "watershed"}})
    with pytest.raises(ParamsError, match="needs tune: true"):
        parse_params({"inference": {"learned_score": True, "instances": "distance", "tune": False}})


class SceneModel:
    """A model that answers each image with the maps of one _scene: the image's constant grey
    value 10 (k + 1) picks scene k. Foreground and distance logits, as a distance model gives."""

    def __init__(self, scenes: list[tuple[Sample, Prediction]]):
        def logit(p: np.ndarray) -> np.ndarray:
            p = np.clip(p, 1e-4, 1 - 1e-4)
            return np.log(p / (1 - p)).astype(np.float32)

        self.maps = [np.stack([logit(p.probability), logit(p.centres)]) for _, p in scenes]

    def __call__(self, batch: np.ndarray) -> np.ndarray:  # (N, 1, H, W) grey / 255
        return np.stack([self.maps[round(float(x[0, 0, 0]) * 255 / 10) - 1] for x in batch])


def test_tuning_fits_the_score_on_val_and_ships_it_with_the_post_processing():
    scenes = [_scene(seed) for seed in range(4)]
    val = [replace(s, image=np.full((H, W), 10 * (k + 1), np.uint8)) for k, (s, _) in enumerate(scenes)]
    prep = Preprocessing(
        in_channels=1, mean=0.0, std=1.0, pad_multiple=1, threshold=0.5, scaling="range", instances="distance"
    )
    grids = {"threshold_grid": [0.4], "seed_threshold_grid": [0.3], "seed_prominence_grid": [0.1]}
    cfg = InferenceParams(instances="distance", min_area_grid=[0], learned_score=True, **grids)
    segmenter = Segmenter(SceneModel(scenes), prep)
    tuning = choose_postprocessing(segmenter, val, cfg)
    scorer = tuning.prep.object_score
    assert scorer["objects"] == 24 and scorer["matched"] == 12  # the watershed found the scenes' objects
    assert segmenter.prep == tuning.prep  # what predict, and so the CLI and service, then use
    served = score_predictions(segmenter.predict([s.image for s in val]), val, ["background", "cell"], "val")
    rule = replace(tuning.prep, object_score=None)
    ruled = score_predictions(
        [to_prediction(y, rule) for y in tuning.logits], val, ["background", "cell"], "val"
    )
    assert served.summary["ap50"] == pytest.approx(0.75, abs=0.01) and ruled.summary["ap50"] < 0.5
    # evaluate writes it into postprocess.json, from which export builds preprocessing.json.
    shipped = prep.with_postprocess(json.loads(json.dumps({"object_score": scorer, "threshold": 0.4})))
    assert shipped.object_score == scorer
    # Without learned_score, tuning keeps the rule, also for a model that came with a score.
    segmenter.prep = tuning.prep
    plain = choose_postprocessing(segmenter, val, cfg.model_copy(update={"learned_score": False}))
    assert plain.prep.object_score is None
