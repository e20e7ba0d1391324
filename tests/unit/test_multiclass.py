"""K classes and intensity scaling: config rules, masks, prediction, metrics, COCO categories."""

from __future__ import annotations

import json

import numpy as np
import pytest

from segflow.config import ParamsError, parse_params
from segflow.core.masks import semantic_from_values
from segflow.core.postprocessing import to_prediction
from segflow.core.preprocessing import Preprocessing, scale_intensity
from segflow.evaluate.metrics import Counts, class_confusions, confusion, summarize, summarize_classes

THREE = ["background", "nucleus", "cytoplasm"]


def semantic(**ingest) -> dict:
    return {"base": {"classes": THREE}, "ingest": {"mask_kind": "semantic", **ingest}}


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ({"base": {"classes": ["cell"]}}, "at least one foreground class"),
        ({"base": {"classes": THREE}}, "instance masks carry no class"),
        (semantic(mask_values=[0, 128, 255]), "[128, 255] are not class ids 0-2"),
        (
            {**semantic(mask_values=[0, 1, 2]), "convert": {"class_values": {"membrane": [2]}}},
            "['membrane'], which are not foreground classes",
        ),
        (
            {**semantic(mask_values=[0, 1, 2]), "convert": {"foreground_values": [1]}},
            "foreground_values is for two classes",
        ),
        ({"ingest": {"format": "tiff"}}, "unknown format 'tiff'; choose one of: folder, coco, cvat, numpy"),
        ({"ingest": {"format": "cvat", "palette": {"cell": [255, 0]}}}, "is not an RGB colour"),
        ({"ingest": {"format": "numpy"}}, "format 'numpy' needs arrays"),
        ({"base": {"intensity": {"low": 60}}}, "base.intensity.low"),
    ],
)
def test_class_and_format_rules_fail_with_the_reason(raw, words):
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    assert words in str(err.value)


def test_three_classes_are_accepted_with_class_ids_or_a_value_map():
    assert parse_params(semantic(mask_values=[0, 1, 2])).base.classes == THREE
    mapped = parse_params({**semantic(mask_values=[0, 100, 200]),
                           "convert": {"class_values": {"nucleus": [200], "cytoplasm": [100]}}})  # fmt: skip
    assert mapped.convert.class_values == {"nucleus": [200], "cytoplasm": [100]}


def test_semantic_values_map_to_class_ids():
    raw = np.array([[0, 100, 200], [200, 7, 100]], np.uint8)
    mapped = semantic_from_values(raw, None, {1: [200], 2: [100]}, n_classes=3)
    np.testing.assert_array_equal(mapped, [[0, 2, 1], [1, 0, 2]])  # 7 is unmapped: background
    ids = np.array([[0, 1], [2, 2]], np.uint16)
    np.testing.assert_array_equal(semantic_from_values(ids, None, None, n_classes=3), ids)
    np.testing.assert_array_equal(semantic_from_values(ids, None), [[0, 1], [1, 1]])  # two classes


def test_multiclass_prediction_thresholds_foreground_then_takes_the_best_class():
    logits = np.zeros((3, 1, 4), np.float32)
    logits[:, 0, 0] = [5, 0, 0]  # background
    logits[:, 0, 1] = [0, 5, 0]  # class 1
    logits[:, 0, 2] = [0, 1, 5]  # class 2
    logits[:, 0, 3] = [1, 0.9, 0.8]  # P(foreground) ~ 0.59: foreground at 0.5, not at 0.7
    prep = Preprocessing(1, 0.5, 0.25, 32, threshold=0.5, classes=["background", "a", "b"])
    got = to_prediction(logits, prep)
    np.testing.assert_array_equal(got.mask, [[0, 1, 2, 1]])
    assert got.logits.shape == (3, 1, 4)
    expected_fg = 1 - np.exp(logits[0]) / np.exp(logits).sum(axis=0)
    np.testing.assert_allclose(got.probability, expected_fg, atol=1e-6)
    stricter = Preprocessing(1, 0.5, 0.25, 32, threshold=0.7, classes=["background", "a", "b"])
    np.testing.assert_array_equal(to_prediction(logits, stricter).mask, [[0, 1, 2, 0]])
    assert got.instances.max() == 3  # the class-1 pixels at columns 1 and 3 are separate objects


def test_two_class_summary_is_the_binary_summary():
    pred = np.array([[1, 1, 0], [0, 0, 1]], np.uint8)
    truth = np.array([[1, 0, 0], [0, 1, 1]], np.uint8)
    per_image = [class_confusions(pred, truth, 2)]
    assert summarize_classes(per_image, ["background", "cell"]) == summarize([confusion(pred, truth)])


def test_multiclass_summary_reports_each_class_and_their_mean():
    truth = np.array([[1, 1, 2, 2]], np.uint8)
    pred = np.array([[1, 2, 2, 2]], np.uint8)
    counts = class_confusions(pred, truth, 3)
    assert counts == [Counts(tp=1, fp=0, fn=1), Counts(tp=2, fp=1, fn=0)]
    summary = summarize_classes([counts], THREE)
    assert summary["dice_nucleus"] == pytest.approx(2 / 3)
    assert summary["dice_cytoplasm"] == pytest.approx(4 / 5)
    assert summary["dice"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert summary["iou_nucleus"] == pytest.approx(1 / 2) and summary["iou_cytoplasm"] == pytest.approx(2 / 3)
    assert summary["images"] == 1


def test_percentile_scaling_maps_the_percentiles_to_zero_and_one():
    rng = np.random.default_rng(0)
    image = rng.integers(900, 1400, (200, 200)).astype(np.uint16)  # dim 16-bit microscopy
    prep = Preprocessing(1, 0.5, 0.25, 32, 0.5, scaling="percentile", low=1.0, high=99.0)
    scaled = scale_intensity(image, prep)
    assert scaled.dtype == np.float32
    assert np.mean(scaled <= 0) == pytest.approx(0.01, abs=0.005)
    assert np.mean(scaled >= 1) == pytest.approx(0.01, abs=0.005)
    # the range scaling this replaces squeezes the same image into 0.8% of [0, 1]
    ranged = scale_intensity(image, Preprocessing(1, 0.5, 0.25, 32, 0.5, scaling="range"))
    assert ranged.max() - ranged.min() < 0.008
    constant = scale_intensity(np.full((8, 8), 7, np.uint16), prep)
    assert np.isfinite(constant).all()


def test_auto_scaling_keeps_8_bit_on_its_range_and_scales_16_bit_by_percentiles():
    prep = Preprocessing(1, 0.5, 0.25, 32, 0.5, scaling="auto")
    image8 = np.array([[0, 51, 255]], np.uint8)
    np.testing.assert_allclose(scale_intensity(image8, prep), image8 / 255.0, atol=1e-7)
    image16 = np.arange(1000, 1101, dtype=np.uint16).reshape(1, -1)
    scaled = scale_intensity(image16, prep)
    assert scaled.min() < 0.01 and scaled.max() > 0.99


def test_preprocessing_keeps_scaling_and_older_files_mean_range(tmp_path):
    prep = Preprocessing(1, 0.5, 0.25, 32, 0.5, classes=THREE, scaling="percentile", low=2.0, high=99.5)
    prep.save(tmp_path / "preprocessing.json")
    assert Preprocessing.load(tmp_path / "preprocessing.json") == prep
    old = prep.to_dict()
    for key in ("scaling", "low", "high"):
        del old[key]
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert Preprocessing.load(tmp_path / "old.json").scaling == "range"


def test_coco_categories_become_classes_by_name(tmp_path):
    from PIL import Image

    from segflow.data.coco import rasterize, read_coco

    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(tmp_path / "images/a.png")
    square = lambda x, s: [x, 2, x + s, 2, x + s, 2 + s, x, 2 + s]  # noqa: E731
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "width": 30, "height": 20}],
        "categories": [
            {"id": 7, "name": "cytoplasm"},
            {"id": 8, "name": "nucleus"},
            {"id": 9, "name": "debris"},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 8, "segmentation": [square(2, 5)]},
            {"id": 2, "image_id": 1, "category_id": 7, "segmentation": [square(12, 5)]},
            {"id": 3, "image_id": 1, "category_id": 9, "segmentation": [square(22, 5)]},
        ],
    }
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    images, _, annotation_rows = read_coco(tmp_path / "ann.json", tmp_path / "images", THREE)
    assert images[0].classes == [1, 2]  # nucleus, cytoplasm; debris is not drawn
    problems = [p for p in annotation_rows["problem"] if p]
    assert problems == [
        "annotation 3 has category 'debris', which is not a class in base.classes "
        "['background', 'nucleus', 'cytoplasm']; add it there or remove its annotations"
    ]
    assert not annotation_rows["category_known"].iloc[2]
    instances = rasterize(images[0])
    classes = np.array([0, *images[0].classes], np.uint8)[instances]
    assert set(np.unique(classes[:, :10]).tolist()) == {0, 1} and set(
        np.unique(classes[:, 10:20]).tolist()
    ) == {0, 2}
    # with two classes every category is the foreground class
    binary, _, rows = read_coco(tmp_path / "ann.json", tmp_path / "images", ["background", "cell"])
    assert binary[0].classes == [1, 1, 1] and not any(rows["problem"])
