"""Instance separation: interior targets, watershed post-processing, and its use in to_prediction."""

from __future__ import annotations

import json

import numpy as np
import pytest

from segflow.core.instances import drop_small, interior_target, split_by_class, watershed_instances
from segflow.core.objects import label_instances, object_scores
from segflow.core.postprocessing import to_prediction
from segflow.core.preprocessing import POSTPROCESS_FIELDS, Preprocessing
from segflow.evaluate.baseline import otsu_watershed

WATERSHED = Preprocessing(1, 0.5, 0.25, 32, threshold=0.5, instances="watershed", seed_threshold=0.5)


def touching_squares() -> np.ndarray:
    """(20, 30) uint16: two 10x10 objects sharing an edge, and a third apart."""
    instances = np.zeros((20, 30), np.uint16)
    instances[5:15, 2:12] = 1
    instances[5:15, 12:22] = 2  # touches object 1 along column 11/12
    instances[8:12, 25:29] = 3
    return instances


def logits_from(probability: np.ndarray) -> np.ndarray:
    p = np.clip(probability, 1e-4, 1 - 1e-4)
    return np.log(p / (1 - p)).astype(np.float32)


def test_interior_excludes_edges_shared_with_neighbours():
    instances = touching_squares()
    interior = interior_target(instances, margin=2)
    assert interior[10, 11] == 0 and interior[10, 12] == 0  # the shared edge is no interior
    assert interior[10, 7] == 1 and interior[10, 17] == 1  # centres are
    assert not interior[instances == 0].any()
    # The two interiors are apart: connected components give three seeds, not two.
    assert label_instances(interior).max() == 3
    # Every object keeps an interior, however thin.
    thin = np.zeros((5, 9), np.uint16)
    thin[2, 1:8] = 1
    assert interior_target(thin, margin=3)[2].sum() > 0


def test_watershed_splits_touching_objects_that_components_merge():
    instances = touching_squares()
    foreground = instances > 0
    assert label_instances(foreground.astype(np.uint8)).max() == 2  # the touching pair is one blob
    interior = interior_target(instances, 2).astype(np.float32)
    labels = watershed_instances(foreground, interior, seed_threshold=0.5)
    assert labels.dtype == np.uint16 and labels.max() == 3
    for true_id in (1, 2, 3):  # each true object is exactly one predicted object
        assert len(np.unique(labels[instances == true_id])) == 1
    assert not labels[~foreground].any()


def test_foreground_without_seed_is_kept_as_its_own_object():
    foreground = np.zeros((10, 10), bool)
    foreground[1:4, 1:4] = True
    labels = watershed_instances(foreground, np.zeros((10, 10), np.float32), seed_threshold=0.5)
    assert labels.max() == 1 and (labels > 0).sum() == 9


def test_to_prediction_uses_the_interior_channel_for_watershed_models():
    instances = touching_squares()
    channels = np.stack(
        [logits_from((instances > 0) * 0.98), logits_from(interior_target(instances, 2) * 0.98)]
    )
    watershed = to_prediction(channels, WATERSHED)
    assert watershed.instances.max() == 3
    assert watershed.logits.shape == instances.shape  # the foreground logit, not the interior one
    np.testing.assert_array_equal(watershed.mask, instances > 0)
    components = to_prediction(channels[:1], Preprocessing(1, 0.5, 0.25, 32, threshold=0.5))
    assert components.instances.max() == 2 and components.interior is None


def test_min_area_drops_small_objects_from_instances_and_mask():
    instances = touching_squares()
    channels = np.stack(
        [logits_from((instances > 0) * 0.98), logits_from(interior_target(instances, 2) * 0.98)]
    )
    pred = to_prediction(channels, Preprocessing(1, 0.5, 0.25, 32, 0.5, instances="watershed", min_area=20))
    assert pred.instances.max() == 2  # the 16-pixel object is gone
    assert not pred.mask[instances == 3].any()
    np.testing.assert_array_equal(
        drop_small(np.array([[1, 1, 2, 0, 3, 3, 3]], np.uint16), 2), [[1, 1, 0, 0, 2, 2, 2]]
    )


def test_watershed_drops_specks_in_its_numbering_as_drop_small_would():
    instances = touching_squares()
    instances[18, 28] = 9  # a one-pixel speck apart from the rest
    foreground = instances > 0
    interior = interior_target(instances, 2).astype(np.float32)
    for min_area in (1, 2, 17, 101):
        fused = watershed_instances(foreground, interior, 0.5, min_area)
        after = drop_small(watershed_instances(foreground, interior, 0.5), min_area)
        np.testing.assert_array_equal(fused, after)
    assert watershed_instances(foreground, interior, 0.5, 17).max() == 2  # speck and 16-px object gone
    # Nothing small enough to drop: the ids are already 1..n and stay as they are.
    kept = watershed_instances(foreground, interior, 0.5, 2)
    assert drop_small(kept, 2) is kept
    assert drop_small(kept.astype(np.int64), 2).dtype == np.uint16  # the id dtype either way


def test_split_by_class_gives_each_class_its_own_object():
    labels = np.array([[1, 1, 1, 0, 2]], np.uint16)
    mask = np.array([[1, 1, 2, 0, 1]], np.uint8)
    out = split_by_class(labels, mask)
    assert len(np.unique(out[0, :3])) == 2 and out[0, 3] == 0 and out.max() == 3


def test_older_preprocessing_files_load_as_components_without_tiles():
    old = {
        "in_channels": 1, "mean": 0.5, "std": 0.25, "pad_multiple": 32, "threshold": 0.5,
        "classes": ["background", "cell"], "input_name": "image", "output_name": "logits", "version": 1,
    }  # fmt: skip
    prep = Preprocessing.from_dict(json.loads(json.dumps(old)))
    assert prep.instances == "components" and prep.tile_size == 0 and prep.min_area == 0


def test_with_postprocess_changes_only_postprocessing():
    prep = WATERSHED.with_postprocess({"threshold": 0.3, "seed_threshold": 0.7, "tile_size": 256, "mean": 9})
    assert (prep.threshold, prep.seed_threshold, prep.tile_size, prep.mean) == (0.3, 0.7, 256, 0.5)
    assert "instances" not in POSTPROCESS_FIELDS  # the network's output layout is fixed by training


def test_object_scores_are_mean_probabilities():
    instances = np.array([[1, 1, 0, 2]], np.uint16)
    probability = np.array([[0.8, 0.6, 0.1, 0.9]], np.float32)
    assert object_scores(instances, probability) == pytest.approx({1: 0.7, 2: 0.9})


def test_distance_object_scores_rank_objects_without_a_confident_centre_last():
    # Two objects with the same crisp rim; only the first has a confident centre.
    instances = np.array([[1, 1, 1, 0, 2, 2, 2]], np.uint16)
    probability = np.array([[0.9, 0.9, 0.9, 0.0, 0.9, 0.9, 0.9]], np.float32)
    seeds = np.array([[0.2, 0.95, 0.2, 0.0, 0.3, 0.4, 0.3]], np.float32)
    assert object_scores(instances, probability) == pytest.approx({1: 0.9, 2: 0.9})
    assert object_scores(instances, probability, seeds) == pytest.approx(
        {1: np.sqrt(0.95 * 0.45), 2: np.sqrt(0.4 * (1.0 / 3))}
    )


def test_classical_baseline_separates_two_touching_dark_discs():
    yy, xx = np.mgrid[0:64, 0:96]
    discs = ((yy - 32) ** 2 + (xx - 30) ** 2 < 15**2) | ((yy - 32) ** 2 + (xx - 58) ** 2 < 15**2)
    image = np.where(discs, 60, 200).astype(np.uint8)
    labels = otsu_watershed(image, "dark", min_distance=8)
    assert labels.max() == 2
    assert labels[32, 30] != labels[32, 58] and labels[32, 30] > 0 and labels[32, 58] > 0
