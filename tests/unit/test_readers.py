"""Readers beyond plain folders: .npy files, pairing rules, CVAT colour masks, .npz stacks,
and instance-id masks of 8, 16 and 32 bits. Every fixture is drawn here in tmp_path.

Malformed inputs must be reported with the file and the item they concern.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from segflow.config import ConvertParams, IngestParams
from segflow.core.images import ImageReadError, pil_to_array, read_image, write_png
from segflow.data.arrays import ArraysFileError, read_arrays
from segflow.data.canonical import convert_all, convert_one
from segflow.data.cvat import CvatFileError, colour_table, parse_labelmap, read_cvat
from segflow.data.folder import Pairing, inspect_pairs, manifest_frame, scan_pairs
from segflow.data.sources import read_source
from segflow.errors import UserError

H, W = 16, 20
CLASSES = ["background", "cell", "debris"]
COLOURS = {"background": (0, 0, 0), "cell": (255, 0, 0), "debris": (0, 255, 0)}
LABELMAP = "# label:color_rgb:parts:actions\n" + "".join(
    f"{name}:{','.join(map(str, rgb))}::\n" for name, rgb in COLOURS.items()
)


def picture(seed: int, shape=(H, W)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)  # (H, W) uint8


def instances(shape=(H, W)) -> np.ndarray:
    mask = np.zeros(shape, np.uint16)  # (H, W) uint16 instance ids
    mask[2:6, 3:8] = 1
    mask[9:14, 10:18] = 2
    return mask


def class_ids(seed: int) -> np.ndarray:
    """(H, W) uint8 class ids: a 'cell' rectangle and a 'debris' square, placed by seed."""
    ids = np.zeros((H, W), np.uint8)
    ids[1 + seed % 3 : 7, 2:9] = 1
    ids[10:14, 12 + seed % 4 : 18] = 2
    return ids


def paint(ids: np.ndarray) -> np.ndarray:
    lookup = np.array([COLOURS[name] for name in CLASSES], np.uint8)
    return lookup[ids]  # (H, W, 3) uint8 colours


def cvat_export(root: Path, count: int = 3, labelmap: str = LABELMAP) -> Path:
    """A CVAT 'Segmentation mask 1.1' export: labelmap.txt, JPEGImages, SegmentationClass."""
    for i in range(count):
        write_png(root / "JPEGImages" / f"frame_{i}.png", picture(i))
        write_png(root / "SegmentationClass" / f"frame_{i}.png", paint(class_ids(i)))
    (root / "labelmap.txt").write_text(labelmap)
    return root


def cvat_params(root: Path, **overrides) -> IngestParams:
    values = {"format": "cvat", "source": str(root), "image_dir": "JPEGImages",
              "mask_dir": "SegmentationClass", "min_images": 1, **overrides}  # fmt: skip
    return IngestParams(**values)


def problems(rows) -> str:
    return " | ".join(row["problem"] for row in rows)


# --- NumPy .npy files --------------------------------------------------------------------


@pytest.mark.parametrize(
    "array",
    [picture(1).astype(np.uint16) * 200, np.stack([picture(i) for i in range(3)], axis=-1),
     np.linspace(0, 1, H * W, dtype=np.float32).reshape(H, W)],
    ids=["uint16", "rgb", "float"],
)  # fmt: skip
def test_npy_images_read_as_saved(tmp_path, array):
    np.save(tmp_path / "a.npy", array)
    assert np.array_equal(read_image(tmp_path / "a.npy"), array)


def test_pickled_npy_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "masks" / "b.npy"
    path.parent.mkdir()
    np.save(path, np.array([{"id": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ImageReadError, match="pickled") as info:
        read_image(path)
    assert str(path) in str(info.value) and "will not be loaded" in str(info.value)

    path.write_bytes(pickle.dumps(np.zeros((4, 4))))  # a plain pickle named .npy
    with pytest.raises(ImageReadError, match=r"pickled data, not a \.npy array"):
        read_image(path)


def test_folder_of_npy_pairs_reports_the_pickled_mask(tmp_path):
    for name in ("a", "b"):
        for folder in ("images", "masks"):
            (tmp_path / folder).mkdir(exist_ok=True)
        np.save(tmp_path / "images" / f"{name}.npy", picture(ord(name)))
        np.save(tmp_path / "masks" / f"{name}.npy", instances().astype(np.int32))
    np.save(tmp_path / "masks" / "b.npy", np.array([None, 1], dtype=object), allow_pickle=True)

    rows = inspect_pairs(scan_pairs(tmp_path, "images", "masks"), tmp_path, "instance", None)

    good, bad = rows
    assert good["problem"] == "" and good["objects"] == 2
    assert bad["image"] == "images/b.npy" and not bad["mask_readable"]
    assert "mask masks/b.npy unreadable" in bad["problem"] and "pickled" in bad["problem"]


# --- Pairing rules -------------------------------------------------------------------------


def test_stem_suffixes_and_globs_pair_names(tmp_path):
    write_png(tmp_path / "images" / "cell1_img.png", picture(1))
    write_png(tmp_path / "images" / "cell2_img.png", picture(2))
    write_png(tmp_path / "images" / "cell1_preview.jpg", picture(3))  # not matched by the glob
    write_png(tmp_path / "masks" / "cell1_masks.png", instances())
    write_png(tmp_path / "masks" / "cell2.png", instances())  # lacks the suffix
    pairing = Pairing(image_glob="*_img.png", image_stem_suffix="_img", mask_stem_suffix="_masks")

    pairs = scan_pairs(tmp_path, "images", "masks", pairing)

    assert pairs == [
        ("cell1", tmp_path / "images/cell1_img.png", tmp_path / "masks/cell1_masks.png"),
        ("cell2", tmp_path / "images/cell2_img.png", None),
        ("cell2", None, tmp_path / "masks/cell2.png"),
    ]
    rows = inspect_pairs(pairs, tmp_path, "instance", None, pairing.hint())
    assert rows[0]["problem"] == ""
    assert rows[1]["image"] == "images/cell2_img.png" and "image has no mask" in rows[1]["problem"]
    assert rows[2]["mask"] == "masks/cell2.png" and rows[2]["problem"].startswith("mask has no image")
    assert "<name>_masks.*" in rows[2]["problem"]  # the rule is spelt out


def test_images_and_masks_in_one_folder_split_by_globs(tmp_path):
    write_png(tmp_path / "train" / "000_img.png", picture(0))
    write_png(tmp_path / "train" / "000_masks.png", instances())
    write_png(tmp_path / "train" / "001_img.png", picture(1))
    pairing = Pairing("*_img.png", "*_masks.png", "_img", "_masks")  # Cellpose's layout

    pairs = scan_pairs(tmp_path, "train", "train", pairing)

    assert [(key, i and i.name, m and m.name) for key, i, m in pairs] == [
        ("000", "000_img.png", "000_masks.png"),
        ("001", "001_img.png", None),
    ]


def test_default_pairing_is_unchanged(tmp_path):
    write_png(tmp_path / "images" / "a.jpg", picture(0))
    write_png(tmp_path / "masks" / "a.png", instances())
    assert scan_pairs(tmp_path, "images", "masks") == [
        ("a", tmp_path / "images/a.jpg", tmp_path / "masks/a.png")
    ]
    assert Pairing().hint() == ""


def test_a_glob_matching_nothing_names_the_pattern_and_folder(tmp_path):
    write_png(tmp_path / "images" / "a.png", picture(0))
    with pytest.raises(FileNotFoundError, match=r"ingest.image_glob '\*.tif' matches none") as info:
        scan_pairs(tmp_path, "images", "masks", Pairing(image_glob="*.tif"))
    assert "a.png" in str(info.value) and str(tmp_path / "images") in str(info.value)
    with pytest.raises(FileNotFoundError, match="path separator"):
        scan_pairs(tmp_path, "images", "masks", Pairing(mask_glob="sub/*.png"))


def test_suffix_collision_is_ambiguous(tmp_path):
    write_png(tmp_path / "images" / "a.png", picture(0))
    write_png(tmp_path / "masks" / "a_m.png", instances())
    write_png(tmp_path / "masks" / "a_m.tif", instances())
    with pytest.raises(ValueError, match=r"a_m\.tif"):
        scan_pairs(tmp_path, "images", "masks", Pairing(mask_stem_suffix="_m"))


# --- CVAT colour masks ---------------------------------------------------------------------


def test_cvat_masks_become_class_ids(tmp_path):
    root = cvat_export(tmp_path / "export")
    out = tmp_path / "out"

    manifest = read_cvat(cvat_params(root), root, out, CLASSES)

    assert list(manifest["id"]) == ["frame_0", "frame_1", "frame_2"]
    assert (manifest["problem"] == "").all() and manifest["palette_ok"].all()
    for i, row in enumerate(manifest.itertuples()):
        assert row.mask == f"masks/frame_{i}.png" and row.image == f"JPEGImages/frame_{i}.png"
        written = read_image(out / row.mask)
        assert written.dtype == np.uint8 and np.array_equal(written, class_ids(i))


def test_cvat_palette_from_params_and_indexed_png(tmp_path):
    root = cvat_export(tmp_path / "export", count=1)
    (root / "labelmap.txt").unlink()
    indexed = Image.fromarray(class_ids(0), mode="L").convert("P")
    indexed.putpalette([c for name in CLASSES for c in COLOURS[name]])
    indexed.save(root / "SegmentationClass" / "frame_0.png")
    palette = {name: list(rgb) for name, rgb in COLOURS.items()}

    manifest = read_cvat(cvat_params(root, palette=palette), root, tmp_path / "out", CLASSES)

    assert manifest["problem"].iloc[0] == ""
    assert np.array_equal(read_image(tmp_path / "out/masks/frame_0.png"), class_ids(0))


def test_unknown_colour_names_file_colour_and_pixels(tmp_path):
    root = cvat_export(tmp_path / "export")
    bad = paint(class_ids(1))
    bad[0, :5] = (0, 0, 255)
    write_png(root / "SegmentationClass" / "frame_1.png", bad)

    manifest = read_cvat(cvat_params(root), root, tmp_path / "out", CLASSES)

    row = manifest.set_index("id").loc["frame_1"]
    assert not row["palette_ok"]
    assert "mask SegmentationClass/frame_1.png: colour(s) rgb(0, 0, 255) in 5 pixel(s)" in row["problem"]
    assert "labelmap.txt" in row["problem"]
    assert row["mask"] == "SegmentationClass/frame_1.png"  # the user's file, for the report
    assert not (tmp_path / "out/masks/frame_1.png").exists()


def test_unknown_colour_is_reported_by_the_suite_and_skipped(tmp_path):
    root = cvat_export(tmp_path / "export")
    bad = paint(class_ids(2))
    bad[5, 5] = (9, 9, 9)
    write_png(root / "SegmentationClass" / "frame_2.png", bad)
    (tmp_path / "out").mkdir()

    result = read_source(cvat_params(root, on_error="skip"), tmp_path / "out", CLASSES)

    suite = result.suites["cvat masks"]
    assert not suite.success
    assert suite.checks[0].failing == [
        {"file": "JPEGImages/frame_2.png", "reason": result.skipped[0]["problem"]}
    ]
    assert "rgb(9, 9, 9) in 1 pixel(s)" in result.skipped[0]["problem"]
    assert result.suites["ingest"].success and list(result.manifest["id"]) == ["frame_0", "frame_1"]
    assert result.mask_kind == "class_ids" and result.masks_in_output and not result.failed("skip")
    assert result.failed("fail") == ["cvat masks"]


def test_cvat_size_mismatch_and_missing_mask_are_item_problems(tmp_path):
    root = cvat_export(tmp_path / "export")
    write_png(root / "SegmentationClass" / "frame_0.png", paint(class_ids(0))[:8])
    (root / "SegmentationClass" / "frame_2.png").unlink()

    manifest = read_cvat(cvat_params(root), root, tmp_path / "out", CLASSES).set_index("id")

    assert (
        "mask SegmentationClass/frame_0.png is 20x8 but the image is 20x16"
        in manifest.loc["frame_0", "problem"]
    )
    assert manifest.loc["frame_2", "problem"] == "image has no mask"
    assert manifest.loc["frame_1", "problem"] == ""


def test_unknown_labelmap_label_is_named(tmp_path):
    root = cvat_export(tmp_path / "export", labelmap=LABELMAP + "nucleus:0,0,128::\n")
    with pytest.raises(CvatFileError, match=r"label\(s\) \['nucleus'\] are not in base.classes") as info:
        read_cvat(cvat_params(root), root, tmp_path / "out", CLASSES)
    assert str(root / "labelmap.txt") in str(info.value)


def test_a_class_without_colour_is_named():
    palette = {"background": (0, 0, 0), "cell": (255, 0, 0)}
    with pytest.raises(CvatFileError, match=r"base.classes \['debris'\] have no colour in ingest.palette"):
        colour_table(palette, CLASSES, "ingest.palette")
    # CVAT's `background` label is class 0 whatever base.classes calls it
    assert colour_table(palette, ["bg", "cell"], "x") == {0: 0, 255 << 16: 1}


def test_malformed_labelmap_names_file_and_line(tmp_path):
    path = tmp_path / "labelmap.txt"
    path.write_text(LABELMAP + "cell 2:255,0\n")
    with pytest.raises(CvatFileError, match=r"labelmap.txt, line 5: 'cell 2:255,0' is not"):
        parse_labelmap(path)
    path.write_text(LABELMAP + "twin:255,0,0::\n")
    with pytest.raises(CvatFileError, match=r"line 5: 'twin' has the colour \(255, 0, 0\) of 'cell'"):
        parse_labelmap(path)


def test_cvat_without_palette_or_labelmap_says_what_to_set(tmp_path):
    root = cvat_export(tmp_path / "export")
    (root / "labelmap.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no labelmap\.txt.*ingest\.palette"):
        read_cvat(cvat_params(root), root, tmp_path / "out", CLASSES)
    (root / "labelmap.txt").write_text(LABELMAP)
    with pytest.raises(FileNotFoundError, match=r"set ingest\.image_dir: JPEGImages"):
        read_cvat(cvat_params(root, image_dir="images"), root, tmp_path / "out", CLASSES)


# --- NumPy .npz stacks ---------------------------------------------------------------------


def npz_params(root: Path, **overrides) -> IngestParams:
    return IngestParams(**{"format": "numpy", "source": str(root), "arrays": "cells.npz",
                           "min_images": 1, **overrides})  # fmt: skip


def test_npz_items_are_written_exactly(tmp_path):
    images = np.stack([picture(i) for i in range(3)])  # (N, H, W) uint8
    masks = np.stack([instances().astype(np.int32)] * 3)  # (N, H, W) int32
    masks[2][masks[2] > 0] += 70_000  # ids beyond 16 bits: kept, as a 32-bit TIFF
    np.savez_compressed(tmp_path / "cells.npz", images=images, masks=masks, names=np.array(["a", "b", "c"]))
    out = tmp_path / "out"

    manifest = read_arrays(npz_params(tmp_path), tmp_path, out)

    assert list(manifest["id"]) == ["a", "b", "c"] and (manifest["problem"] == "").all()
    assert list(manifest["mask"]) == ["masks/a.png", "masks/b.png", "masks/c.tif"]
    for i, row in enumerate(manifest.itertuples()):
        assert row.image == f"images/{row.id}.png"
        assert np.array_equal(read_image(out / row.image), images[i])
        assert np.array_equal(read_image(out / row.mask), masks[i])
    assert read_image(out / "masks/c.tif").dtype == np.uint32


def test_npz_float_rgb_images_without_names(tmp_path):
    images = np.random.default_rng(0).random((2, H, W, 3)).astype(np.float32)
    np.savez(tmp_path / "cells.npz", images=images, masks=np.stack([instances()] * 2))

    manifest = read_arrays(npz_params(tmp_path), tmp_path, tmp_path / "out")

    assert list(manifest["id"]) == ["cells_0000", "cells_0001"]
    assert list(manifest["image"]) == ["images/cells_0000.tif", "images/cells_0001.tif"]
    assert np.array_equal(read_image(tmp_path / "out/images/cells_0001.tif"), images[1])


def test_pickled_npz_member_is_refused_by_name(tmp_path):
    names = np.array(["a", 1], dtype=object)
    blank = np.zeros((2, H, W), np.uint8)
    np.savez(tmp_path / "cells.npz", images=blank, masks=blank, names=names)
    with pytest.raises(ArraysFileError, match=r"cells.npz: array 'names': .*pickled.*will not be loaded"):
        read_arrays(npz_params(tmp_path), tmp_path, tmp_path / "out")


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"images": np.zeros((2, H, W), np.uint8), "labels": np.zeros((2, H, W), np.uint8)},
         r"cells.npz has no \['masks'\] array\(s\); it holds \['images', 'labels'\]"),
        ({"images": np.zeros((3, H, W), np.uint8), "masks": np.zeros((2, H, W), np.uint8)},
         "images holds 3 items but masks holds 2"),
        ({"images": np.zeros((2, H, W), np.uint8), "masks": np.zeros((2, 8, W), np.uint8)},
         "images are 20x16 but masks are 20x8"),
        ({"images": np.zeros((2, 3, H, W), np.uint8), "masks": np.zeros((2, H, W), np.uint8)},
         "looks channel-first"),
        ({"images": np.zeros((2, H, W), np.int64), "masks": np.zeros((2, H, W), np.uint8)},
         "images are int64"),
        ({"images": np.zeros((2, H, W), np.uint8), "masks": np.zeros((2, H, W), bool)},
         "masks are bool; masks must be integers"),
        ({"images": np.zeros((2, H, W), np.uint8), "masks": np.zeros((2, H, W), np.uint8),
          "names": np.array(["a", "a"])}, r"names\[1\] 'a' appears twice"),
    ],
    ids=["missing-key", "count", "size", "channel-first", "image-dtype", "mask-dtype", "names"],
)  # fmt: skip
def test_malformed_npz_names_file_and_array(tmp_path, arrays, message):
    np.savez(tmp_path / "cells.npz", **arrays)
    with pytest.raises(ArraysFileError, match=message) as info:
        read_arrays(npz_params(tmp_path), tmp_path, tmp_path / "out")
    assert str(tmp_path / "cells.npz") in str(info.value)


def test_npz_item_problems_go_through_the_manifest(tmp_path):
    images = np.random.default_rng(1).random((3, H, W))  # (N, H, W) float64 in [0, 1)
    images[1, 0, 0] = 2.0
    masks = np.stack([instances().astype(np.int16)] * 3)
    masks[2, 0, 0] = -1
    np.savez(tmp_path / "cells.npz", images=images, masks=masks)
    (tmp_path / "out").mkdir()

    result = read_source(npz_params(tmp_path, on_error="skip"), tmp_path / "out", ["background", "cell"])

    skipped = {item["item"]: item["problem"] for item in result.skipped}
    assert set(skipped) == {"cells.npz:images[1]", "cells.npz:images[2]"}
    assert "float image values span [0.0" in skipped["cells.npz:images[1]"]
    assert "mask cells.npz:masks[2]: instance mask has negative ids" in skipped["cells.npz:images[2]"]
    assert list(result.manifest["id"]) == ["cells_0000"] and result.images_in_output
    assert not (tmp_path / "out/images/cells_0001.tif").exists()


def test_missing_or_unusable_npz(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"ingest\.arrays"):
        read_arrays(npz_params(tmp_path), tmp_path, tmp_path / "out")
    np.save(tmp_path / "one.npy", np.zeros((2, H, W), np.uint8))
    (tmp_path / "cells.npz").write_bytes((tmp_path / "one.npy").read_bytes())
    with pytest.raises(ArraysFileError, match=r"single array, not an \.npz"):
        read_arrays(npz_params(tmp_path), tmp_path, tmp_path / "out")


# --- Instance-id masks of 8, 16 and 32 bits ------------------------------------------------


def _write_uint8_png(path, ids):
    write_png(path.with_suffix(".png"), ids.astype(np.uint8))
    return path.with_suffix(".png")


def _write_uint16_png(path, ids):
    write_png(path.with_suffix(".png"), ids.astype(np.uint16))
    return path.with_suffix(".png")


def _write_mode_i_tiff(path, ids):
    Image.fromarray(ids.astype(np.int32)).save(path.with_suffix(".tif"))  # Pillow mode I, 32-bit
    return path.with_suffix(".tif")


def _write_uint32_tiff(path, ids):
    tifffile.imwrite(path.with_suffix(".tif"), ids.astype(np.uint32))
    return path.with_suffix(".tif")


@pytest.mark.parametrize(
    ("writer", "offset"),
    [(_write_uint8_png, 0), (_write_uint16_png, 60_000), (_write_mode_i_tiff, 100_000),
     (_write_uint32_tiff, 5_000_000)],
    ids=["uint8-png", "uint16-png", "int32-tiff", "uint32-tiff"],
)  # fmt: skip
def test_instance_masks_of_every_depth_pass_through(tmp_path, writer, offset):
    ids = instances().astype(np.int64)
    ids[ids > 0] += offset  # ids as large as the depth allows
    ids[0, 0] = offset + 7  # a third object
    write_png(tmp_path / "images" / "a.png", picture(0))
    (tmp_path / "masks").mkdir()
    mask_path = writer(tmp_path / "masks" / "a", ids)

    assert np.array_equal(read_image(mask_path), ids)
    rows = inspect_pairs(scan_pairs(tmp_path, "images", "masks"), tmp_path, "instance", None)
    assert rows[0]["problem"] == "" and rows[0]["objects"] == 3
    row = next(manifest_frame(rows).itertuples())
    out = tmp_path / "converted"
    (out / "masks").mkdir(parents=True)

    converted = convert_one(row, tmp_path, tmp_path, out, mask_kind="instance", foreground_values=None)

    relabelled = read_image(out / converted["instances"])
    assert converted["objects"] == 3 and relabelled.dtype == np.uint16
    assert sorted(np.unique(relabelled)) == [0, 1, 2, 3]
    assert np.array_equal(relabelled > 0, ids > 0)
    assert np.array_equal(read_image(out / converted["mask"]), (ids > 0).astype(np.uint8))


def test_uint32_ids_beyond_int32_are_read_and_counted(tmp_path):
    # Not converted here: relabelling allocates a lookup as long as the largest id.
    ids = instances().astype(np.uint32) * 2_000_000_000  # (H, W) uint32, ids 0, 2e9, 4e9
    write_png(tmp_path / "images" / "a.png", picture(0))
    (tmp_path / "masks").mkdir()
    tifffile.imwrite(tmp_path / "masks" / "a.tif", ids)
    rows = inspect_pairs(scan_pairs(tmp_path, "images", "masks"), tmp_path, "instance", None)
    assert rows[0]["problem"] == "" and rows[0]["objects"] == 2
    assert np.array_equal(read_image(tmp_path / "masks" / "a.tif"), ids)


def test_pillow_mode_i_images_keep_32_bit_ids():
    # Some Pillow versions open 16-bit PNGs, and 32-bit TIFFs, as mode "I" (int32).
    ids = (instances().astype(np.int32) * 70_000).astype(np.int32)
    image = Image.fromarray(ids)
    assert image.mode == "I"
    array = pil_to_array(image)
    assert array.dtype == np.int32 and np.array_equal(array, ids)


def _ingested_pair(tmp_path, mask: np.ndarray):
    """One image/mask pair as ingest lists it, and an empty output folder for convert."""
    write_png(tmp_path / "images" / "a.png", picture(0))
    write_png(tmp_path / "masks" / "a.png", mask)
    rows = inspect_pairs(scan_pairs(tmp_path, "images", "masks"), tmp_path, "instance", None)
    out = tmp_path / "converted"
    (out / "masks").mkdir(parents=True)
    return manifest_frame(rows), out


def test_convert_all_writes_every_item_and_refuses_data_a_model_cannot_learn(tmp_path):
    manifest, out = _ingested_pair(tmp_path, instances())
    converted = convert_all(
        manifest, tmp_path, tmp_path, out, "instance", ConvertParams(), ["background", "cell"]
    )
    assert list(converted["id"]) == list(manifest["id"]) and converted["objects"].tolist() == [2]
    # A class of base.classes that no mask holds cannot be learned: the message names it.
    with pytest.raises(UserError, match=r"no mask contains class\(es\) \['bright'\]"):
        convert_all(
            manifest, tmp_path, tmp_path, out, "instance", ConvertParams(), ["background", "cell", "bright"]
        )
    # Every mask empty after conversion (here: no raw value counts as foreground).
    with pytest.raises(UserError, match="every mask is empty after conversion"):
        convert_all(
            manifest,
            tmp_path,
            tmp_path,
            out,
            "semantic",
            ConvertParams(foreground_values=[7]),
            ["background", "cell"],
        )
