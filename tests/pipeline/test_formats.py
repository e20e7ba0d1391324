"""`dvc repro convert` (ingest + convert) on a CVAT export and on a NumPy .npz.

Both fixtures are made from the tiny copy's sample data: the CVAT export paints each
cell in the colour of a class (odd ids `cell`, even ids `debris`), the .npz stacks the
images and instance masks. The canonical masks must hold exactly what was painted.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.conftest import make_tiny_repo, run

pytestmark = pytest.mark.slow

CLASSES = ["background", "cell", "debris"]
COLOURS = {"background": (0, 0, 0), "cell": (255, 0, 0), "debris": (0, 255, 0)}
UNKNOWN = (0, 0, 255)


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory) -> Path:
    """A tiny copy with sample data; nothing has run in it yet."""
    return make_tiny_repo(tmp_path_factory.mktemp("formats"))


@pytest.fixture
def repo(tiny_repo: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "repo"
    shutil.copytree(tiny_repo, dest, symlinks=True)
    return dest


def _params(repo: Path, **sections) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in sections.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))


def _samples(repo: Path):
    """(stem, (H, W) uint8 image, (H, W) uint16 instance ids) of the sample data."""
    from segflow.core.images import read_image

    for path in sorted((repo / "data/images").glob("*.png")):
        yield path.stem, read_image(path), read_image(repo / "data/masks" / path.name)


def _write_cvat_export(repo: Path) -> dict[str, np.ndarray]:
    """data_cvat/{labelmap.txt, JPEGImages, SegmentationClass}; returns the painted class ids."""
    from segflow.core.images import write_png

    root = repo / "data_cvat"
    lines = ["# label:color_rgb:parts:actions"] + [
        f"{n}:{','.join(map(str, c))}::" for n, c in COLOURS.items()
    ]
    (root / "labelmap.txt").parent.mkdir()
    (root / "labelmap.txt").write_text("\n".join(lines) + "\n")
    painted = {}
    colours = np.array([COLOURS[name] for name in CLASSES], np.uint8)
    for stem, image, instances in _samples(repo):
        ids = np.where(instances == 0, 0, np.where(instances % 2 == 1, 1, 2)).astype(np.uint8)
        write_png(root / "JPEGImages" / f"{stem}.png", image)
        write_png(root / "SegmentationClass" / f"{stem}.png", colours[ids])  # (H, W, 3) colours
        painted[stem] = ids  # (H, W) uint8 class ids
    return painted


def _use_cvat(repo: Path, **ingest) -> None:
    _params(
        repo,
        base={"classes": CLASSES},
        ingest={"format": "cvat", "source": "data_cvat", "image_dir": "JPEGImages",
                "mask_dir": "SegmentationClass", **ingest},
    )  # fmt: skip


def test_cvat_export_converts_to_the_painted_class_ids(repo: Path):
    from segflow.core.images import read_image

    painted = _write_cvat_export(repo)
    _use_cvat(repo)
    run(["dvc", "repro", "convert"], repo)

    summary = json.loads((repo / "artifacts/ingested/summary.json").read_text())
    assert summary["mask_kind"] == "class_ids" and summary["mask_root"] == "artifacts/ingested"
    converted = pd.read_csv(repo / "artifacts/converted/manifest.csv", dtype={"id": str})
    assert sorted(converted["id"]) == sorted(painted)
    for row in converted.itertuples():
        assert np.array_equal(read_image(repo / "artifacts/converted" / row.mask), painted[row.id]), row.id
        source = read_image(repo / "data_cvat/JPEGImages" / f"{row.id}.png")
        assert np.array_equal(read_image(repo / "artifacts/converted" / row.image), source)


def test_cvat_unknown_colour_fails_or_is_skipped_and_listed(repo: Path):
    from segflow.core.images import write_png

    painted = _write_cvat_export(repo)
    victim = sorted(painted)[4]
    colours = np.array([COLOURS[name] for name in CLASSES], np.uint8)[painted[victim]]
    colours[:3, :4] = UNKNOWN  # 12 pixels of a colour the labelmap lacks
    write_png(repo / "data_cvat/SegmentationClass" / f"{victim}.png", colours)
    _use_cvat(repo)

    failed = run(["dvc", "repro", "convert"], repo, check=False)
    output = failed.stdout + failed.stderr
    assert failed.returncode != 0
    assert "mask colours are all in the palette" in output
    assert f"SegmentationClass/{victim}.png: colour(s) rgb{UNKNOWN} in 12 pixel(s)" in output

    _use_cvat(repo, on_error="skip")
    result = run(["dvc", "repro", "convert"], repo)
    assert "skipped 1 item(s)" in result.stdout
    skipped = json.loads((repo / "reports/validation.json").read_text())["skipped"]
    assert [item["item"] for item in skipped] == [f"JPEGImages/{victim}.png"]
    assert f"rgb{UNKNOWN}" in skipped[0]["problem"]
    converted = pd.read_csv(repo / "artifacts/converted/manifest.csv", dtype={"id": str})
    assert len(converted) == len(painted) - 1 and victim not in set(converted["id"])


def test_npz_stack_converts_with_its_names_and_ids(repo: Path):
    from segflow.core.images import read_image

    stems, images, masks = zip(*_samples(repo), strict=True)
    masks = np.stack(masks).astype(np.int32)  # (N, H, W) int32 instance ids
    masks[0][masks[0] > 0] += 70_000  # beyond 16 bits: ingested as a 32-bit TIFF
    (repo / "data_npz").mkdir()
    np.savez_compressed(
        repo / "data_npz/cells.npz", images=np.stack(images), masks=masks, names=np.array(stems)
    )
    _params(repo, ingest={"format": "numpy", "source": "data_npz", "arrays": "cells.npz"})

    run(["dvc", "repro", "convert"], repo)

    summary = json.loads((repo / "artifacts/ingested/summary.json").read_text())
    assert summary["image_root"] == summary["mask_root"] == "artifacts/ingested"
    assert (repo / f"artifacts/ingested/masks/{stems[0]}.tif").is_file()
    converted = pd.read_csv(repo / "artifacts/converted/manifest.csv", dtype={"id": str}).set_index("id")
    assert sorted(converted.index) == sorted(stems)
    for i, stem in enumerate(stems):
        row = converted.loc[stem]
        assert np.array_equal(read_image(repo / "artifacts/converted" / row["image"]), images[i])
        semantic = read_image(repo / "artifacts/converted" / row["mask"])
        assert np.array_equal(semantic, (masks[i] > 0).astype(np.uint8)), stem
        relabelled = read_image(repo / "artifacts/converted" / row["instances"])
        # the same objects, renumbered: each original id maps to exactly one new id
        assert len(set(zip(masks[i].ravel(), relabelled.ravel(), strict=True))) == len(np.unique(masks[i]))
