"""COCO / LIVECell reading and rasterisation on hand-built annotation files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

from segflow.data.coco import CocoFileError, rasterize, read_coco


def square(x: int, y: int, size: int) -> list[float]:
    return [x, y, x + size, y, x + size, y + size, x, y + size]


def write_dataset(root: Path, annotations, images=None, categories=None) -> Path:
    (root / "images").mkdir(exist_ok=True)
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((20, 30), np.uint8)).save(root / "images" / name)
    data = {
        "images": images or [{"id": 1, "file_name": "a.png", "width": 30, "height": 20},
                             {"id": 2, "file_name": "b.png", "width": 30, "height": 20}],
        "categories": categories or [{"id": 1, "name": "cell"}],
        "annotations": annotations,
    }  # fmt: skip
    path = root / "ann.json"
    path.write_text(json.dumps(data))
    return path


def test_list_and_livecell_dict_layouts_read_the_same(tmp_path):
    anns = [
        {"id": 10, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": [square(2, 2, 5)]},
        {"id": 11, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": [square(12, 4, 6)]},
    ]
    as_list = read_coco(write_dataset(tmp_path, anns), tmp_path / "images")[0]
    as_dict = read_coco(write_dataset(tmp_path, {str(a["id"]): a for a in anns}), tmp_path / "images")[0]
    for first, second in zip(as_list, as_dict, strict=True):
        assert np.array_equal(rasterize(first), rasterize(second))
    instances = rasterize(as_list[0])
    assert instances.dtype == np.uint16 and instances.shape == (20, 30)
    assert set(np.unique(instances)) == {0, 1, 2}
    assert rasterize(as_list[1]).max() == 0  # b.png has no annotations: empty mask


def test_rle_forms_and_crowd_regions(tmp_path):
    truth = np.zeros((20, 30), np.uint8)
    truth[5:10, 3:9] = 1
    compressed = coco_mask.encode(np.asfortranarray(truth))
    uncompressed_counts = []  # column-major run lengths, starting with background
    flat, value, run = truth.ravel(order="F"), 0, 0
    for pixel in flat:
        if pixel != value:
            uncompressed_counts.append(run)
            value, run = pixel, 0
        run += 1
    uncompressed_counts.append(run)
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 1,
         "segmentation": {"size": [20, 30], "counts": compressed["counts"].decode()}},
        {"id": 2, "image_id": 2, "category_id": 1, "iscrowd": 1,
         "segmentation": {"size": [20, 30], "counts": uncompressed_counts}},
    ]  # fmt: skip
    images, _, annotation_rows = read_coco(write_dataset(tmp_path, anns), tmp_path / "images")
    assert (annotation_rows["problem"] == "").all()
    for image in images:
        assert np.array_equal(rasterize(image) > 0, truth.astype(bool))


def test_every_defect_is_named(tmp_path):
    (tmp_path / "images").mkdir()
    anns = {
        "1": {"image_id": 99, "category_id": 1, "segmentation": [square(1, 1, 3)]},
        "2": {"image_id": 1, "category_id": 1, "segmentation": [[1, 1, 5, 5]]},
        "3": {"image_id": 1, "category_id": 7, "segmentation": [square(1, 1, 3)]},
        "4": {"image_id": 1, "category_id": 1, "segmentation": {"size": [5, 5], "counts": "0"}},
        "5": {"image_id": 1, "category_id": 1, "segmentation": [square(1, 1, 3)]},
    }
    images = [{"id": 1, "file_name": "a.png", "width": 30, "height": 20},
              {"id": 3, "file_name": "missing.png", "width": 30, "height": 20}]  # fmt: skip
    path = write_dataset(tmp_path, anns, images=images)
    read, image_rows, annotation_rows = read_coco(path, tmp_path / "images")
    problems = " | ".join(annotation_rows["problem"])
    assert "annotation 1 refers to unknown image id 99" in problems
    assert "annotation 2 has a polygon with 2 point(s); at least 3 are needed" in problems
    assert "annotation 3 has unknown category 7" in problems
    assert "annotation 4 RLE size [5, 5] differs" in problems
    assert annotation_rows["problem"].iloc[4] == ""
    assert "missing.png is missing" in " ".join(image_rows["problem"])
    assert [len(i.annotations) for i in read] == [1, 0]  # only the good annotation is drawn


def test_unusable_files_fail_clearly(tmp_path):
    with pytest.raises(CocoFileError, match="not found"):
        read_coco(tmp_path / "nope.json", tmp_path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CocoFileError, match="not valid JSON"):
        read_coco(tmp_path / "bad.json", tmp_path)
    (tmp_path / "other.json").write_text('{"foo": 1}')
    with pytest.raises(CocoFileError, match="no 'images' list"):
        read_coco(tmp_path / "other.json", tmp_path)
