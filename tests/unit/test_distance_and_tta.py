"""Distance-to-edge targets, the watershed they seed, and test-time augmentation."""

from __future__ import annotations

import numpy as np
import pytest

from segflow.core.inference import Preprocessing, Segmenter, to_prediction
from segflow.core.instances import distance_target
from segflow.core.tta import VIEWS, averaged_logits
from segflow.errors import UserError


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
