"""Objects, polygons, COCO RLE and outlines on hand-built masks."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as coco

from segflow.core.objects import (
    coco_rle,
    decode_coco_rle,
    describe_objects,
    draw_outlines,
    label_instances,
    object_scores,
)


@pytest.mark.parametrize("seed", range(20))
def test_rle_matches_pycocotools(seed):
    rng = np.random.default_rng(seed)
    h, w = rng.integers(1, 50, 2)
    binary = rng.random((h, w)) < rng.random()
    ours = coco_rle(binary)
    reference = coco.encode(np.asfortranarray(binary.astype(np.uint8)))
    assert ours["counts"] == reference["counts"].decode() and ours["size"] == [h, w]
    assert np.array_equal(decode_coco_rle(ours), binary)


def test_rle_matches_pycocotools_for_long_runs_and_large_differences():
    """Runs of hundreds of thousands of pixels beside single pixels: counts of four and more
    5-bit groups, and differences far below zero (the sign-extension path)."""
    binary = np.zeros((900, 1100), bool)
    binary[3, 7] = True
    binary[400:405, 500:900] = True
    binary[-1, -1] = True
    reference = coco.encode(np.asfortranarray(binary.astype(np.uint8)))["counts"].decode()
    assert coco_rle(binary)["counts"] == reference
    assert np.array_equal(decode_coco_rle(coco_rle(binary)), binary)


def test_rle_edge_cases():
    for binary in (np.zeros((3, 4), bool), np.ones((3, 4), bool)):
        rle = coco_rle(binary)
        assert np.array_equal(coco.decode({"size": rle["size"], "counts": rle["counts"].encode()}), binary)


def test_objects_are_components_with_box_polygon_and_score():
    mask = np.zeros((20, 30), np.uint8)
    mask[2:6, 3:9] = 1  # a 4x6 rectangle
    mask[10, 20] = 1  # a single pixel
    mask[15:18, 0:2] = 1  # touching the left edge
    probability = np.where(mask > 0, 0.8, 0.1).astype(np.float32)
    instances = label_instances(mask)
    assert instances.dtype == np.uint16 and instances.max() == 3
    objects = describe_objects(instances, mask, probability)
    assert [o.area for o in objects] == [24, 1, 6]
    assert [o.bbox for o in objects] == [(3, 2, 6, 4), (20, 10, 1, 1), (0, 15, 2, 3)]
    assert all(o.class_id == 1 and o.score == pytest.approx(0.8) for o in objects)
    for obj in objects:
        assert len(obj.polygon) >= 6
        # Rasterising the polygon (pycocotools) covers the object's box.
        x, y, w, h = obj.bbox
        drawn = coco.decode(coco.frPyObjects([[float(v) for v in obj.polygon]], 20, 30))[..., 0]
        assert drawn[y : y + h, x : x + w].any()


def test_object_descriptions_score_objects_as_evaluation_ranks_them():
    rng = np.random.default_rng(0)
    instances = np.zeros((40, 50), np.uint16)
    instances[2:12, 3:15], instances[20:35, 10:18], instances[5:9, 30:49] = 1, 2, 3
    mask = (instances > 0).astype(np.uint8)
    probability = rng.uniform(0.5, 1.0, mask.shape).astype(np.float32)
    seeds = rng.uniform(0.0, 1.0, mask.shape).astype(np.float32)
    for seed_map in (None, seeds):
        expected = object_scores(instances, probability, seed_map)
        described = {o.id: o.score for o in describe_objects(instances, mask, probability, seed_map)}
        assert described == pytest.approx(expected, abs=1e-4)  # the answer rounds to 4 places
    assert described != pytest.approx(object_scores(instances, probability), abs=1e-3)


def test_touching_classes_are_separate_objects():
    mask = np.zeros((10, 10), np.uint8)
    mask[:, :5], mask[:, 5:] = 1, 2
    objects = describe_objects(label_instances(mask), mask, np.ones((10, 10), np.float32))
    assert [(o.class_id, o.area) for o in objects] == [(1, 50), (2, 50)]


def test_empty_mask_has_no_objects():
    mask = np.zeros((8, 8), np.uint8)
    assert describe_objects(label_instances(mask), mask, np.zeros((8, 8), np.float32)) == []


def test_outlines_colour_only_object_borders():
    mask = np.zeros((12, 12), np.uint8)
    mask[2:10, 2:10] = 1
    image = np.full((12, 12), 30000, np.uint16)
    picture = draw_outlines(image, label_instances(mask))
    assert picture.shape == (12, 12, 3) and picture.dtype == np.uint8
    interior, border, outside = picture[5, 5], picture[2, 5], picture[0, 0]
    assert (interior == outside).all() and not (border == interior).all()
