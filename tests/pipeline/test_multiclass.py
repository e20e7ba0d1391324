"""Three classes end to end: class-id masks in, per-class metrics and class names out.

The sample's cells are split into two classes by brightness (a property the network can
see), written as semantic masks holding class ids 0, 1, 2.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import yaml

from tests.conftest import run

CLASSES = ["background", "dim", "bright"]


def _paint_classes_by_brightness(repo: Path) -> None:
    from segflow.core.images import read_image, write_png

    for mask_path in sorted((repo / "data/masks").glob("*.png")):
        instances = read_image(mask_path)
        image = read_image(repo / "data/images" / mask_path.name).astype(np.float64)
        if image.ndim == 3:
            image = image.mean(axis=2)
        ids = np.unique(instances)[1:]
        means = np.array([image[instances == i].mean() for i in ids])
        classes = np.zeros(instances.shape, np.uint8)
        for obj, mean in zip(ids, means, strict=True):
            classes[instances == obj] = 2 if mean >= np.median(means) else 1
        write_png(mask_path, classes)


def test_three_classes_train_evaluate_and_export(repo_copy: Path):
    _paint_classes_by_brightness(repo_copy)
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    params["base"]["classes"] = CLASSES
    params["ingest"].update(mask_kind="semantic", mask_values=[0, 1, 2])
    params["evaluate"]["extra_sets"] = []  # the shifted set's instance masks carry no class
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params))
    run(["dvc", "repro", "export"], repo_copy)

    metrics = json.loads((repo_copy / "reports/metrics.json").read_text())
    for split in ("val", "test"):
        scores = metrics[split]
        assert {"dice_dim", "dice_bright", "iou_dim", "iou_bright", "dice_foreground"} <= set(scores)
        # the plain scores are the means over the foreground classes
        assert abs(scores["dice"] - (scores["dice_dim"] + scores["dice_bright"]) / 2) < 1e-9
        assert abs(scores["iou"] - (scores["iou_dim"] + scores["iou_bright"]) / 2) < 1e-9

    prep = json.loads((repo_copy / "artifacts/export/preprocessing.json").read_text())
    assert prep["classes"] == CLASSES
    converted = set()
    for path in (repo_copy / "artifacts/converted/masks").glob("*.png"):
        from segflow.core.images import read_image

        converted |= set(np.unique(read_image(path)).tolist())
    assert converted == {0, 1, 2}

    # The exported model answers with class names through the shared inference path.
    image = sorted((repo_copy / "artifacts/converted/images").iterdir())[0]
    out = repo_copy / "predictions"
    run(["segflow", "predict", "--model", "artifacts/export", "--out", str(out), str(image)], repo_copy)
    answer = json.loads((out / f"{image.stem}.json").read_text())
    assert set(answer["class_fractions"]) == set(CLASSES)
    assert set(answer["masks"]) == {"dim", "bright"}
    assert {obj["class"] for obj in answer["objects"]} <= {"dim", "bright"}
    shutil.rmtree(out)


def test_a_class_no_mask_contains_fails_convert_naming_it(repo_copy: Path):
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    params["base"]["classes"] = CLASSES
    params["ingest"].update(mask_kind="semantic", mask_values=[0, 1, 2])
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params))
    for mask_path in (repo_copy / "data/masks").glob("*.png"):  # instance ids -> one class only
        from segflow.core.images import read_image, write_png

        write_png(mask_path, (read_image(mask_path) > 0).astype(np.uint8))
    failed = run(["dvc", "repro", "convert"], repo_copy, check=False)
    assert failed.returncode != 0
    assert "no mask contains class(es) ['bright']" in failed.stdout + failed.stderr


def test_coco_categories_become_class_ids_by_name(repo_copy: Path):
    """Two COCO categories (by brightness) convert to the same class ids as painted masks."""
    from pycocotools import mask as coco_mask

    from segflow.core.images import read_image

    instance_masks = {p.name: read_image(p) for p in sorted((repo_copy / "data/masks").glob("*.png"))}
    _paint_classes_by_brightness(repo_copy)  # the expected class ids, from the same rule
    expected = {name: read_image(repo_copy / "data/masks" / name) for name in instance_masks}
    shutil.rmtree(repo_copy / "data/masks")
    images, annotations = [], []
    for number, (name, instances) in enumerate(instance_masks.items(), start=1):
        images.append({"id": number, "file_name": name, "width": 64, "height": 64})
        for obj in np.unique(instances)[1:]:
            pixels = instances == obj
            rle = coco_mask.encode(np.asfortranarray(pixels.astype(np.uint8)))
            category = 20 + int(expected[name][pixels][0])  # 21 = dim, 22 = bright
            segmentation = {"size": rle["size"], "counts": rle["counts"].decode()}
            annotations.append({"image_id": number, "category_id": category, "segmentation": segmentation})
    categories = [{"id": 21, "name": "dim"}, {"id": 22, "name": "bright"}]
    coco = {"images": images, "categories": categories, "annotations": annotations}
    (repo_copy / "data/annotations.json").write_text(json.dumps(coco))
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    params["base"]["classes"] = CLASSES
    params["ingest"].update(format="coco", annotations="annotations.json")
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params))
    run(["dvc", "repro", "convert"], repo_copy)
    for name, classes in expected.items():
        assert np.array_equal(read_image(repo_copy / "artifacts/converted/masks" / name), classes), name
    assert len(list((repo_copy / "artifacts/converted/instances").glob("*.png"))) == len(expected)
