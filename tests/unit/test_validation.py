"""segflow.data.folder + segflow.data.validation: the ingest contract on real PNG folders.

Every case folder is written and validated once per module (great-expectations is slow to
import and to set up); the tests then read the reports.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from segflow.data.folder import MANIFEST_COLUMNS, inspect_pairs, scan_pairs
from segflow.data.validation import ValidationReport, validate_ingest

H, W = 24, 32
GOOD_IMAGES = 4
MIN_IMAGES = 3


def write_png(path: Path, array: np.ndarray, **save_kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **save_kwargs)


def image_array(i: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, (H, W), dtype=np.uint8)  # (H, W) uint8


def instance_mask() -> np.ndarray:
    mask = np.zeros((H, W), np.uint16)  # (H, W) uint16 instance ids
    mask[2:8, 3:10] = 1
    mask[12:20, 14:26] = 2
    return mask


def semantic_mask() -> np.ndarray:
    mask = np.zeros((H, W), np.uint8)  # (H, W) uint8 raw class values
    mask[4:12, 4:12] = 255
    return mask


def write_good_folder(root: Path, kind: str = "instance") -> Path:
    for i in range(GOOD_IMAGES):
        write_png(root / "images" / f"img{i}.png", image_array(i))
        write_png(root / "masks" / f"img{i}.png", instance_mask() if kind == "instance" else semantic_mask())
    return root


def make_corrupt_image(root: Path) -> None:
    path = root / "images" / "img0.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def make_wrong_size_mask(root: Path) -> None:
    write_png(root / "masks" / "img1.png", instance_mask()[:20])


def make_image_without_mask(root: Path) -> None:
    write_png(root / "images" / "lonely.png", image_array(99))


def make_mask_without_image(root: Path) -> None:
    write_png(root / "masks" / "orphan.png", instance_mask())


def make_duplicate_image(root: Path) -> None:
    # Same pixels as img3 under another name, encoded differently so only pixels match.
    write_png(root / "images" / "img3_copy.png", image_array(3), compress_level=0)
    write_png(root / "masks" / "img3_copy.png", instance_mask())


def make_bad_semantic_value(root: Path) -> None:
    mask = semantic_mask()
    mask[0, 0] = 7
    write_png(root / "masks" / "img2.png", mask)


# case -> (how to break a good folder, mask kind, the offending file, words its reason must hold)
DEFECTS = {
    "corrupt_image": (make_corrupt_image, "instance", "images/img0.png", ["unreadable"]),
    "wrong_size_mask": (make_wrong_size_mask, "instance", "images/img1.png", ["32x20", "32x24"]),
    "image_without_mask": (make_image_without_mask, "instance", "images/lonely.png", ["no mask"]),
    "mask_without_image": (make_mask_without_image, "instance", "masks/orphan.png", ["no image"]),
    "duplicate_image": (make_duplicate_image, "instance", "images/img3_copy.png", ["duplicate"]),
    "bad_semantic_value": (make_bad_semantic_value, "semantic", "images/img2.png", ["[7]", "mask_values"]),
}


def ingest(root: Path, kind: str, min_images: int = MIN_IMAGES) -> tuple[pd.DataFrame, ValidationReport]:
    mask_values = [0, 255] if kind == "semantic" else None
    rows = inspect_pairs(scan_pairs(root, "images", "masks"), root, kind, mask_values)
    manifest = pd.DataFrame(rows)
    return manifest, validate_ingest(manifest, min_images)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, tuple[pd.DataFrame, ValidationReport]]:
    base = tmp_path_factory.mktemp("validation")
    out = {
        "good": ingest(write_good_folder(base / "good"), "instance"),
        "good_semantic": ingest(write_good_folder(base / "good_semantic", "semantic"), "semantic"),
        "too_few": ingest(write_good_folder(base / "too_few"), "instance", min_images=10),
    }
    for case, (breaker, kind, *_) in DEFECTS.items():
        root = write_good_folder(base / case, kind)
        breaker(root)
        out[case] = ingest(root, kind)
    return out


def failing_checks(report: ValidationReport) -> dict[str, list[dict]]:
    return {check.rule: check.failing for check in report.checks if not check.success}


@pytest.mark.parametrize("case", ["good", "good_semantic"])
def test_a_good_folder_validates(results, case):
    manifest, report = results[case]

    assert report.success, report.render()
    assert report.rows == GOOD_IMAGES
    assert all(check.success for check in report.checks)
    assert "passed" in report.render()
    assert (manifest["problem"] == "").all()


def test_manifest_rows_describe_each_pair(results):
    manifest, _ = results["good"]

    assert list(manifest.columns) == MANIFEST_COLUMNS
    assert list(manifest["id"]) == [f"img{i}" for i in range(GOOD_IMAGES)]
    row = manifest.iloc[0]
    assert row["image"] == "images/img0.png"
    assert row["mask"] == "masks/img0.png"
    assert (row["height"], row["width"], row["channels"], row["dtype"]) == (H, W, 1, "uint8")
    assert (row["mask_height"], row["mask_width"]) == (H, W)
    assert row["objects"] == 2
    assert manifest["content_hash"].nunique() == GOOD_IMAGES


@pytest.mark.parametrize("case", list(DEFECTS))
def test_a_defect_fails_validation(results, case):
    _, report = results[case]

    assert not report.success


@pytest.mark.parametrize("case", list(DEFECTS))
def test_a_failing_check_names_the_file_and_the_reason(results, case):
    _, _, file, words = DEFECTS[case]
    _, report = results[case]

    reasons = [
        item["reason"] for items in failing_checks(report).values() for item in items if item["file"] == file
    ]
    assert reasons, report.render()
    assert any(all(word in reason for word in words) for reason in reasons), reasons


@pytest.mark.parametrize("case", list(DEFECTS))
def test_rendered_report_names_the_file(results, case):
    _, _, file, words = DEFECTS[case]
    _, report = results[case]

    text = report.render()
    assert "FAILED" in text
    assert "[FAIL]" in text
    lines = [line for line in text.splitlines() if f"{file}: " in line]
    assert any(all(word in line for word in words) for line in lines), text


def test_good_files_are_not_blamed(results):
    _, report = results["wrong_size_mask"]

    blamed = {item["file"] for items in failing_checks(report).values() for item in items}
    assert blamed == {"images/img1.png"}


def test_duplicate_lists_both_copies(results):
    manifest, report = results["duplicate_image"]

    blamed = [{item["file"] for item in items} for items in failing_checks(report).values()]
    assert blamed == [{"images/img3.png", "images/img3_copy.png"}]
    hashes = manifest.set_index("id")["content_hash"]
    assert hashes["img3"] == hashes["img3_copy"]


def test_too_few_images_fail_with_the_observed_count(results):
    _, report = results["too_few"]

    assert not report.success
    failing = [check for check in report.checks if not check.success]
    assert len(failing) == 1
    assert "10" in failing[0].rule
    assert failing[0].observed == GOOD_IMAGES
    assert f"observed: {GOOD_IMAGES}" in report.render()


def test_report_saves_as_json_naming_the_file(results, tmp_path):
    _, report = results["corrupt_image"]

    report.save(tmp_path / "sub" / "report.json")

    saved = json.loads((tmp_path / "sub" / "report.json").read_text())
    assert saved["success"] is False
    assert "images/img0.png" in json.dumps(saved["checks"])


def test_scan_pairs_without_image_folder_names_the_setting(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"ingest\.source"):
        scan_pairs(tmp_path, "images", "masks")


def test_scan_pairs_pairs_by_stem_across_suffixes(tmp_path):
    write_png(tmp_path / "images" / "a.jpg", image_array(0))
    write_png(tmp_path / "masks" / "a.png", instance_mask())
    (tmp_path / "images" / "notes.txt").write_text("ignored")

    pairs = scan_pairs(tmp_path, "images", "masks")

    assert pairs == [("a", tmp_path / "images" / "a.jpg", tmp_path / "masks" / "a.png")]


def test_an_empty_image_folder_fails_with_a_report(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()

    _, report = ingest(tmp_path, "instance")

    assert not report.success
    assert "observed: 0" in report.render()


def test_two_images_with_the_same_stem_are_not_silently_dropped(tmp_path):
    write_good_folder(tmp_path)
    write_png(tmp_path / "images" / "img0.tif", image_array(50))

    try:
        _, report = ingest(tmp_path, "instance")
    except ValueError as exc:  # refusing the folder with a message naming the files is fine too
        assert "img0.tif" in str(exc)
        return
    assert not report.success
    assert "img0.tif" in report.render()


def test_an_image_type_inference_cannot_scale_is_reported(tmp_path):
    import tifffile

    write_good_folder(tmp_path)
    tifffile.imwrite(tmp_path / "images" / "signed.tif", np.full((24, 32), -5, np.int16))
    write_png(tmp_path / "masks" / "signed.png", instance_mask())

    _, report = ingest(tmp_path, "instance")

    assert not report.success
    failing = failing_checks(report)["every image has a supported pixel type"]
    assert failing[0]["file"] == "images/signed.tif" and "int16" in failing[0]["reason"]


def test_data_hash_inputs_include_the_masks(tmp_path):
    write_good_folder(tmp_path)
    before, _ = ingest(tmp_path, "instance")
    mask = sorted((tmp_path / "masks").iterdir())[0]
    edited = np.asarray(Image.open(mask)).copy()
    edited[0, 0] = 9
    write_png(mask, edited)
    after, _ = ingest(tmp_path, "instance")
    assert list(before["content_hash"]) == list(after["content_hash"])
    assert list(before["mask_hash"]) != list(after["mask_hash"])
