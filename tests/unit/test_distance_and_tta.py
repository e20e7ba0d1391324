"""Distance-to-edge targets, the watershed they seed, and test-time augmentation."""

from __future__ import annotations

import numpy as np
import pytest

from segflow.config import InferenceParams
from segflow.core.inference import Segmenter
from segflow.core.instances import distance_target, watershed_instances
from segflow.core.objects import describe_objects, object_scores
from segflow.core.postprocessing import to_prediction
from segflow.core.preprocessing import Preprocessing
from segflow.core.tta import VIEWS, averaged_logits
from segflow.data.samples import Sample
from segflow.errors import UserError
from segflow.evaluate.scoring import tune_postprocessing


def touching_pair() -> np.ndarray:
    """(40, 60) uint16: two 20x20 squares sharing an edge, and a separate 8x8 one."""
    ids = np.zeros((40, 60), np.uint16)
    ids[10:30, 5:25] = 1
    ids[10:30, 25:45] = 2
    ids[16:24, 50:58] = 3
    return ids


def test_distance_target_peaks_once_per_object_and_falls_to_the_shared_edge():
    ids = touching_pair()
    target = distance_target(ids)
    assert target.dtype == np.float32 and target[ids == 0].max() == 0
    for i in (1, 2, 3):  # scale-free: every object, large or small, peaks at 1
        assert target[ids == i].max() == pytest.approx(1.0)
    assert target[20, 24] < 0.2 and target[20, 25] < 0.2  # the edge the squares share
    assert target[20, 15] > 0.8


def test_distance_seeds_split_touching_objects():
    ids = touching_pair()
    logit = lambda p: np.log(np.clip(p, 1e-3, 1 - 1e-3) / (1 - np.clip(p, 1e-3, 1 - 1e-3)))  # noqa: E731
    channels = np.stack([logit((ids > 0) * 0.98), logit(distance_target(ids))]).astype(np.float32)
    prep = Preprocessing(1, 0.5, 0.25, 32, threshold=0.5, instances="distance", seed_threshold=0.5)
    prediction = to_prediction(channels, prep)
    assert prediction.instances.max() == 3
    # Each true object is (almost) exactly one predicted object.
    for i in (1, 2, 3):
        found = np.bincount(prediction.instances[ids == i]).argmax()
        assert found > 0 and (prediction.instances[ids == i] == found).mean() > 0.9


def test_distance_models_score_objects_by_their_predicted_centres_watershed_models_by_probability():
    ids = touching_pair()
    logit = lambda p: np.log(np.clip(p, 1e-3, 1 - 1e-3) / (1 - np.clip(p, 1e-3, 1 - 1e-3)))  # noqa: E731
    channels = np.stack([logit((ids > 0) * 0.98), logit(distance_target(ids))]).astype(np.float32)
    by_method = {}
    for method in ("distance", "watershed"):
        prep = Preprocessing(1, 0.5, 0.25, 32, threshold=0.5, instances=method, seed_threshold=0.5)
        prediction = to_prediction(channels, prep)
        by_method[method] = object_scores(prediction.instances, prediction.probability, prediction.centres)
        described = describe_objects(
            prediction.instances, prediction.mask, prediction.probability, prediction.centres
        )
        assert {o.id: o.score for o in described} == pytest.approx(by_method[method], abs=1e-4)
    assert by_method["watershed"] == pytest.approx(dict.fromkeys(by_method["watershed"], 0.98), abs=1e-3)
    # A cone-shaped distance map peaks at ~1 and averages ~1/3 over its object.
    assert all(0.45 < v < 0.75 for v in by_method["distance"].values()), by_method


def blurred_pair() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two touching discs (ids 1, 2) and a seed map as a network predicts it: smooth, peaking
    at 1.0 and 0.9 in their centres, with the pass between them at about 0.6, above the seed
    threshold 0.5. Returns (ids, foreground, seed map), (32, 56)."""
    yy, xx = np.mgrid[:32, :56]
    near = [np.hypot(yy - 16, xx - x0) for x0 in (18, 38)]
    ids = np.where(near[0] <= near[1], 1, 2).astype(np.uint16) * (np.minimum(*near) < 12)
    bumps = [peak * np.exp(-(d**2) / (2 * 10.0**2)) for peak, d in zip((1.0, 0.9), near, strict=True)]
    return ids, ids > 0, np.maximum(*bumps).astype(np.float32)


def test_peak_seeds_split_objects_whose_seed_regions_join():
    ids, foreground, seed_map = blurred_pair()
    assert seed_map[16, 28] > 0.5  # the pass: thresholded, both centres are one region
    assert watershed_instances(foreground, seed_map, seed_threshold=0.5).max() == 1
    split = watershed_instances(foreground, seed_map, seed_threshold=0.5, seed_prominence=0.2)
    assert split.max() == 2
    for i in (1, 2):  # the watershed cuts along the pass: each disc is (almost) one object
        found = np.bincount(split[ids == i]).argmax()
        assert found > 0 and (split[ids == i] == found).mean() > 0.95
    # The second peak rises only about 0.3 above the pass: a larger prominence is one seed.
    assert watershed_instances(foreground, seed_map, 0.5, seed_prominence=0.4).max() == 1
    # seed_threshold still applies: peaks below it seed nothing, and the blob stays whole.
    assert watershed_instances(foreground, seed_map, 0.95, seed_prominence=0.2).max() == 1


def test_tuning_compares_peak_seeds_with_threshold_seeds():
    ids, _, seed_map = blurred_pair()
    logit = lambda p: np.log(np.clip(p, 1e-3, 1 - 1e-3) / (1 - np.clip(p, 1e-3, 1 - 1e-3)))  # noqa: E731
    logits = [np.stack([logit((ids > 0) * 0.98), logit(seed_map)]).astype(np.float32)]
    image = np.where(ids > 0, 200, 20).astype(np.uint8)
    samples = [Sample("pair", image, (ids > 0).astype(np.uint8), ids)]
    prep = Preprocessing(1, 0.5, 0.25, 32, threshold=0.5, instances="distance", seed_threshold=0.5)
    grids = InferenceParams(
        threshold_grid=[0.5], seed_threshold_grid=[0.5], seed_prominence_grid=[0.0, 0.2], min_area_grid=[0]
    )
    tuned, grid = tune_postprocessing(logits, samples, prep, grids)
    assert [row["seed_prominence"] for row in grid] == [0.0, 0.2]
    # threshold seeds: one merged object, matching one of the two at best; peaks: both found
    assert grid[0]["ap50"] < 0.6 and grid[1]["ap50"] == pytest.approx(1.0)
    assert tuned.seed_prominence == 0.2
    assert to_prediction(logits[0], tuned).instances.max() == 2


def test_seed_prominence_must_be_below_one():
    with pytest.raises(ValueError, match="seed_prominence_grid"):
        InferenceParams(seed_prominence_grid=[0.1, 1.5])
    with pytest.raises(ValueError, match="seed_prominence"):
        InferenceParams(seed_prominence=-0.1)


@pytest.mark.parametrize("mode", sorted(VIEWS))
def test_tta_undoes_each_view(mode):
    rng = np.random.default_rng(1)
    inputs = [rng.random((1, 12, 20), dtype=np.float32), rng.random((1, 16, 16), dtype=np.float32)]
    seen = []

    def identity(batch):
        seen.extend(x.shape for x in batch)
        return [x * 2 for x in batch]  # a pixelwise model: every view maps back to the same answer

    out = averaged_logits(identity, inputs, mode)
    assert len(seen) == 2 * len(VIEWS[mode])
    for x, y in zip(inputs, out, strict=True):
        np.testing.assert_allclose(y, 2 * x, rtol=1e-6)


def test_tta_averages_an_orientation_dependent_model():
    x = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    # A model that answers its input's left column in every column: the left-right view,
    # mapped back, answers the right column; the up-down view the left one again.
    left = lambda batch: [np.repeat(b[:, :, :1], b.shape[2], axis=2) for b in batch]  # noqa: E731
    [plain] = averaged_logits(left, [x], "none")
    [flipped] = averaged_logits(left, [x], "flips")
    first, last = np.repeat(x[:, :, :1], 4, axis=2), np.repeat(x[:, :, -1:], 4, axis=2)
    np.testing.assert_array_equal(plain, first)
    np.testing.assert_allclose(flipped, (2 * first + last) / 3, rtol=1e-6)


def test_segmenter_applies_tta_and_unknown_modes_are_refused():
    calls = []

    def model(batch):
        calls.append(len(batch))
        return np.zeros((len(batch), 1, *batch.shape[2:]), np.float32)

    prep = Preprocessing(1, 0.5, 0.25, 1, threshold=0.5, scaling="range", tta="d4")
    Segmenter(model, prep).predict([np.zeros((8, 8), np.uint8)])
    assert sum(calls) == 8
    with pytest.raises(UserError, match="flips"):
        averaged_logits(lambda b: b, [np.zeros((1, 2, 2), np.float32)], "sideways")
