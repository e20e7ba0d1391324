"""ImageJ ROI sets and GeoJSON, read back with the libraries Fiji's and QuPath's users script with."""

from __future__ import annotations

import json

import cv2
import geojson
import numpy as np
import pytest
import roifile
from matplotlib.path import Path as Outline
from scipy import ndimage as ndi

from segflow.core.measurements import measure_objects
from segflow.core.postprocessing import Prediction
from segflow.serve.answers import answer
from segflow.serve.outlines import geojson_collection, imagej_rois, pixel_outline

CLASSES = ["background", "nucleus", "cell"]


def _scene() -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """A disc, an L shape (class 2), a one-pixel line, a single pixel, a diagonal staircase and
    a random blob; the label image, class mask and the JSON answer's objects."""
    instances = np.zeros((60, 60), np.uint16)
    cv2.circle(instances, (12, 12), 8, 1, -1)
    instances[25:35, 5:9] = 2
    instances[31:35, 9:20] = 2
    instances[5, 30:45] = 3
    instances[40, 40] = 4
    for k in range(6):
        instances[45 + k, 2 + k : 4 + k] = 5
    blob = cv2.GaussianBlur(np.random.default_rng(1).random((20, 20)), (5, 5), 0) > 0.5
    instances[38:58, 20:40][blob] = 6
    mask = np.where(instances == 2, 2, (instances > 0).astype(np.uint8)).astype(np.uint8)
    probability = (instances > 0).astype(np.float32)
    body = answer(probability, Prediction(probability, probability, mask, instances), CLASSES, {})
    return instances, mask, body["objects"]


def _inside(vertices: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool: pixels whose centre lies inside the polygon, the rule Fiji and QuPath use
    to turn an outline whose vertices are pixel corners back into pixels."""
    ys, xs = np.mgrid[: shape[0], : shape[1]]
    centres = np.c_[xs.ravel() + 0.5, ys.ravel() + 0.5]
    return Outline(vertices).contains_points(centres).reshape(shape)


def _outer(instances: np.ndarray, obj_id: int) -> np.ndarray:
    """(H, W) bool: the object's largest 8-connected part with its holes filled (what an
    outer outline encloses)."""
    _, parts = cv2.connectedComponents((instances == obj_id).astype(np.uint8), connectivity=8)
    largest = 1 + int(np.argmax(np.bincount(parts.ravel())[1:]))
    return ndi.binary_fill_holes(parts == largest)


@pytest.mark.parametrize("obj_id", [1, 2, 3, 4, 5, 6])
def test_the_outline_gives_back_exactly_the_objects_pixels(obj_id):
    instances, _, objects = _scene()
    [obj] = [o for o in objects if o["id"] == obj_id]
    drawn = _inside(pixel_outline(instances, obj_id, obj["bbox"]), instances.shape)
    assert np.array_equal(drawn, _outer(instances, obj_id)), (drawn ^ _outer(instances, obj_id)).sum()


def test_the_roi_set_opens_with_roifile_one_traced_polygon_per_object(tmp_path):
    instances, _, objects = _scene()
    path = tmp_path / "rois.zip"
    path.write_bytes(imagej_rois(instances, objects))
    rois = roifile.roiread(path)
    assert [r.name for r in rois][:3] == ["00001-nucleus", "00002-cell", "00003-nucleus"]
    assert len(rois) == len(objects)
    for roi, obj in zip(rois, objects, strict=True):
        assert roi.roitype == roifile.ROI_TYPE.TRACED
        assert np.array_equal(_inside(roi.coordinates(), instances.shape), _outer(instances, obj["id"]))


def test_geojson_is_valid_and_carries_class_and_measurements():
    instances, mask, objects = _scene()
    rows = {r["id"]: r for r in measure_objects(instances, mask, instances.astype(np.uint8), CLASSES)}
    parsed = geojson.loads(json.dumps(geojson_collection(instances, objects, rows)))
    assert parsed.is_valid and parsed["type"] == "FeatureCollection"
    assert len(parsed["features"]) == len(objects)
    for feature, obj in zip(parsed["features"], objects, strict=True):
        props = feature["properties"]
        assert props["objectType"] == "detection" and props["classification"]["name"] == obj["class"]
        assert props["measurements"]["area"] == obj["area"]
        ring = np.array(feature["geometry"]["coordinates"][0])
        assert (ring[0] == ring[-1]).all()
        assert np.array_equal(ring[:-1], pixel_outline(instances, obj["id"], obj["bbox"]))
    assert "measurements" not in geojson_collection(instances, objects)["features"][0]["properties"]
