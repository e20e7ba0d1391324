"""segflow.datasets.sample: the deterministic synthetic phase-contrast dataset."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from segflow.baseline import otsu_segment
from segflow.datasets.sample import SampleSpec, generate_sample, render_image
from segflow.metrics import confusion

SMALL = SampleSpec(count=3, size=64)


@pytest.fixture(scope="module")
def default_images() -> list[tuple[np.ndarray, np.ndarray]]:
    """The first 10 images of the embedded dataset (default spec, 256x256)."""
    spec = SampleSpec()
    return [render_image(spec, i) for i in range(10)]


def file_bytes(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


def test_two_runs_write_byte_identical_files(tmp_path):
    generate_sample(tmp_path / "a", SMALL)
    generate_sample(tmp_path / "b", SMALL)

    a, b = file_bytes(tmp_path / "a"), file_bytes(tmp_path / "b")
    assert len(a) == 2 * SMALL.count
    assert a == b


def test_image_i_does_not_depend_on_how_many_are_generated(tmp_path):
    generate_sample(tmp_path / "three", SampleSpec(count=3, size=64))
    generate_sample(tmp_path / "five", SampleSpec(count=5, size=64))

    three, five = file_bytes(tmp_path / "three"), file_bytes(tmp_path / "five")
    assert len(five) == 10
    assert three == {name: data for name, data in five.items() if name in three}


def test_different_seeds_give_different_images():
    a, _ = render_image(SampleSpec(size=64, seed=1), 0)
    b, _ = render_image(SampleSpec(size=64, seed=2), 0)

    assert not np.array_equal(a, b)


def test_generate_sample_returns_image_paths_with_matching_masks(tmp_path):
    paths = generate_sample(tmp_path, SMALL)

    assert [p.name for p in paths] == ["cells_0000.png", "cells_0001.png", "cells_0002.png"]
    for path in paths:
        assert path.parent == tmp_path / "images"
        assert (tmp_path / "masks" / path.name).is_file()


def test_files_hold_exactly_the_rendered_arrays(tmp_path):
    generate_sample(tmp_path, SMALL)

    for i in range(SMALL.count):
        image, instances = render_image(SMALL, i)
        with Image.open(tmp_path / "images" / f"cells_{i:04d}.png") as img:
            assert img.mode == "L"
            np.testing.assert_array_equal(np.asarray(img), image)
        with Image.open(tmp_path / "masks" / f"cells_{i:04d}.png") as mask:
            assert mask.mode.startswith("I;16")  # 16-bit instance ids
            np.testing.assert_array_equal(np.asarray(mask).astype(np.uint16), instances)


def test_other_files_in_the_output_folder_are_left_alone(tmp_path):
    (tmp_path / "images").mkdir()
    keep = tmp_path / "images" / "mine.png"
    keep.write_bytes(b"not touched")

    generate_sample(tmp_path, SMALL)

    assert keep.read_bytes() == b"not touched"


@pytest.mark.parametrize("size", [64, 96])
def test_image_and_mask_have_the_requested_size_and_dtypes(size):
    image, instances = render_image(SampleSpec(size=size), 0)

    assert image.shape == (size, size)
    assert image.dtype == np.uint8
    assert instances.shape == (size, size)
    assert instances.dtype == np.uint16


def test_images_use_a_broad_intensity_range(default_images):
    for image, _ in default_images:
        assert int(image.max()) - int(image.min()) > 60


def test_every_image_has_several_cells_with_contiguous_ids(default_images):
    for _, instances in default_images:
        ids = np.unique(instances)
        cells = ids[ids > 0]
        assert len(cells) >= 3
        assert ids[0] == 0  # there is background
        np.testing.assert_array_equal(cells, np.arange(1, len(cells) + 1))


def test_some_cells_touch_their_neighbours(default_images):
    def touching(instances: np.ndarray) -> bool:
        for a, b in (
            (instances[:, :-1], instances[:, 1:]),
            (instances[:-1, :], instances[1:, :]),
        ):
            if ((a != b) & (a > 0) & (b > 0)).any():
                return True
        return False

    assert any(touching(instances) for _, instances in default_images)


def test_a_global_otsu_threshold_segments_poorly(default_images):
    # The dataset must be hard for a threshold, or a trained model proves nothing:
    # even the better polarity per image stays far from the truth.
    dice = []
    for image, instances in default_images:
        best = max(
            confusion(otsu_segment(image, polarity), instances).scores()["dice"]
            for polarity in ("dark", "bright")
        )
        dice.append(best)

    assert np.mean(dice) < 0.7
