"""Per-object measurements and the instance label image, as the CLI and service give them."""

from __future__ import annotations

import csv
import io

import cv2
import numpy as np
import pytest
import tifffile
from skimage.measure import regionprops

from segflow.core.measurements import measure_objects, measurement_columns
from segflow.core.postprocessing import Prediction
from segflow.serve.answers import answer, labels_image, measurements_csv


def _scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 6x6 square (id 1, class 1) and a 5x9 rectangle (id 3, class 2) on a uint16 image."""
    instances = np.zeros((20, 24), np.uint16)
    instances[2:8, 3:9] = 1
    instances[10:15, 10:19] = 3
    mask = np.where(instances == 1, 1, np.where(instances == 3, 2, 0)).astype(np.uint8)
    image = np.full(instances.shape, 100, np.uint16)
    image[instances == 1] = 4000
    image[4, 5] = 5000
    return instances, mask, image


def test_rows_hold_position_shape_and_raw_intensity_per_object():
    instances, mask, image = _scene()
    rows = measure_objects(instances, mask, image, ["background", "nucleus", "cell"])
    assert [r["id"] for r in rows] == [1, 3] and [r["class"] for r in rows] == ["nucleus", "cell"]
    square, rect = rows
    assert list(square) == measurement_columns(1)
    assert square["area"] == 36 and rect["area"] == 45
    assert (square["bbox_x"], square["bbox_y"], square["bbox_width"], square["bbox_height"]) == (3, 2, 6, 6)
    assert (rect["centroid_x"], rect["centroid_y"]) == (14.0, 12.0)
    assert rect["major_axis_length"] > rect["minor_axis_length"] and square["eccentricity"] == 0
    assert square["solidity"] == 1 and abs(square["equivalent_diameter"] - (4 * 36 / np.pi) ** 0.5) < 1e-3
    # Intensities in the file's own units (16-bit here), not the model's [0, 1] scale.
    assert (square["min_intensity"], square["max_intensity"]) == (4000, 5000)
    assert square["mean_intensity"] == round((35 * 4000 + 5000) / 36, 4)
    assert rect["mean_intensity"] == 100


def test_colour_images_get_one_intensity_column_per_channel():
    instances, mask, _ = _scene()
    rgb = np.zeros((*instances.shape, 3), np.uint8)
    rgb[..., 2] = 200
    rows = measure_objects(instances, mask, rgb, ["background", "a", "b"])
    assert list(rows[0]) == measurement_columns(3)
    assert (rows[0]["mean_intensity_0"], rows[0]["mean_intensity_2"]) == (0, 200)


def test_no_objects_give_no_rows_but_a_csv_header():
    empty = np.zeros((8, 8), np.uint16)
    assert measure_objects(empty, empty.astype(np.uint8), empty, ["background", "cell"]) == []
    assert measurements_csv([], 1).strip() == ",".join(measurement_columns(1))


def _prediction(instances: np.ndarray, mask: np.ndarray) -> Prediction:
    probability = (mask > 0).astype(np.float32)
    return Prediction(probability, probability, mask, instances)


def test_answer_measurements_and_csv_agree_with_regionprops():
    instances, mask, image = _scene()
    classes = ["background", "nucleus", "cell"]
    body = answer(image, _prediction(instances, mask), classes, {}, measurements=True)
    rows = measure_objects(instances, mask, image, classes)
    table = list(csv.DictReader(io.StringIO(measurements_csv(rows, 1))))
    regions = {r.label: r for r in regionprops(instances)}
    for obj, row in zip(body["objects"], table, strict=True):
        assert obj["measurements"]["area"] == obj["area"] == regions[obj["id"]].area == float(row["area"])
        assert int(row["id"]) == obj["id"] and row["class"] == obj["class"]
    assert "measurements" not in answer(image, _prediction(instances, mask), classes, {})["objects"][0]


def test_label_images_decode_to_the_instance_ids():
    instances, mask, _ = _scene()
    instances[0, 0] = 60_000  # ids above 255 survive: 16 bits, not 8
    prediction = _prediction(instances, mask)
    png = cv2.imdecode(np.frombuffer(labels_image(prediction, "png"), np.uint8), cv2.IMREAD_UNCHANGED)
    tif = tifffile.imread(io.BytesIO(labels_image(prediction, "tiff")))
    for decoded in (png, tif):
        assert decoded.dtype == np.uint16 and np.array_equal(decoded, instances)


def test_beyond_65535_objects_ids_widen_to_32_bits_and_the_labels_to_tiff():
    from segflow.core.instances import compact_ids, split_by_class
    from segflow.core.masks import relabel_sequential
    from segflow.core.objects import label_instances
    from segflow.errors import UserError
    from segflow.serve.answers import label_format

    mask = np.zeros((530, 530), np.uint8)
    mask[::2, ::2] = 1  # 265 x 265 = 70,225 separate one-pixel objects
    instances = label_instances(mask)
    assert instances.dtype == np.uint32 and instances.max() == 70_225
    assert np.array_equal(compact_ids(instances.astype(np.int64)), instances)
    assert split_by_class(instances, mask).max() == 70_225
    with pytest.raises(UserError, match="at most 65535"):
        relabel_sequential(instances)  # stored masks stay 16-bit PNGs
    prediction = _prediction(instances, mask)
    assert label_format(prediction) == "tiff"
    with pytest.raises(ValueError, match="format=tiff"):
        label_format(prediction, "png")
    decoded = tifffile.imread(io.BytesIO(labels_image(prediction, "tiff")))
    assert decoded.dtype == np.uint32 and np.array_equal(decoded, instances)
    # Up to 65,535 objects the ids stay 16-bit and the label image a PNG.
    assert label_instances(mask[:100, :100]).dtype == np.uint16
    assert label_format(_prediction(label_instances(mask[:100, :100]), mask[:100, :100])) == "png"
