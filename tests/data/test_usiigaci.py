"""The real usiigaci-dev data: its COCO file (LIVECell layout) draws the same cells as its
instance-id PNGs (per-object IoU >= 0.95, polygon rasterisation aside)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from segflow.core.images import read_image
from segflow.data.coco import rasterize, read_coco

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "usiigaci-dev"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} is absent (see ../shared/data/README.md)")


def test_coco_annotations_match_the_instance_pngs():
    images, image_rows, annotation_rows = read_coco(DATA / "annotations.livecell.json", DATA / "images")
    assert (image_rows["problem"] == "").all() and (annotation_rows["problem"] == "").all()
    assert len(images) == 10
    ious = []
    for image in images:
        drawn = rasterize(image)
        truth = read_image(DATA / "instances" / f"{image.stem}.png")
        assert drawn.shape == truth.shape
        assert len(np.unique(drawn)) - 1 == len(np.unique(truth)) - 1
        for obj in np.unique(truth)[1:]:
            region = truth == obj
            best = np.bincount(drawn[region]).argmax()  # the drawn object covering it most
            other = drawn == best
            ious.append((region & other).sum() / (region | other).sum())
    assert np.median(ious) >= 0.95 and np.mean(np.asarray(ious) >= 0.95) >= 0.9, np.percentile(
        ious, [1, 5, 50]
    )
