"""segflow.data.sample: the deterministic synthetic phase-contrast dataset."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi

from segflow.data.sample import DOMAINS, SampleSpec, generate_sample, render_image
from segflow.evaluate.baseline import otsu_segment
from segflow.evaluate.metrics import confusion

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


@pytest.mark.parametrize(
    "spec", [SMALL, SampleSpec(count=2, size=64, domain="shifted")], ids=["default", "shifted"]
)
def test_files_hold_exactly_the_rendered_arrays(tmp_path, spec):
    generate_sample(tmp_path, spec)

    for i in range(spec.count):
        image, instances = render_image(spec, i)
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


# --- imaging domains -------------------------------------------------------------------


@pytest.fixture(scope="module")
def shifted_images() -> list[tuple[np.ndarray, np.ndarray]]:
    """The first 10 images of the shifted domain at the embedded dataset's size."""
    spec = SampleSpec(domain="shifted")
    return [render_image(spec, i) for i in range(10)]


def intensity_stats(image: np.ndarray, instances: np.ndarray) -> dict[str, float]:
    """Mean intensity, cell-minus-background and halo-minus-background, in grey levels."""
    image = image.astype(np.float64)
    outside = ndi.distance_transform_edt(instances == 0)
    background = image[outside > 8].mean()  # far enough from cells to miss the halo
    return {
        "mean": image.mean(),
        "cell_contrast": abs(image[instances > 0].mean() - background),
        "halo_contrast": image[(outside > 0) & (outside <= 3)].mean() - background,
    }


@pytest.mark.parametrize(("size", "seed", "index"), [(64, 2024, 0), (64, 2024, 1), (96, 7, 2)])
def test_default_domain_is_the_unnamed_one_and_drawing_is_deterministic(size, seed, index):
    # Properties, not golden hashes: exact bytes depend on numpy/scipy/OpenCV versions. What
    # must hold everywhere: naming the default domain changes nothing, the same spec draws
    # the same arrays every time, and another seed draws other cells.
    plain = render_image(SampleSpec(size=size, seed=seed), index)
    named = render_image(SampleSpec(size=size, seed=seed, domain="default"), index)
    again = render_image(SampleSpec(size=size, seed=seed), index)
    for a, b, c in zip(plain, named, again, strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b) and np.array_equal(a, c)
    _, other_cells = render_image(SampleSpec(size=size, seed=seed + 1), index)
    assert not np.array_equal(plain[1], other_cells)


def test_shifted_domain_draws_other_cells_than_the_default_one():
    for index in range(3):
        default_image, default_cells = render_image(SMALL, index)
        shifted_image, shifted_cells = render_image(SampleSpec(size=64, domain="shifted"), index)

        assert not np.array_equal(default_cells, shifted_cells)
        assert not np.array_equal(default_image, shifted_image)


def test_shifted_domain_is_deterministic_per_seed_and_index(tmp_path):
    spec = SampleSpec(count=3, size=64, domain="shifted")
    generate_sample(tmp_path / "a", spec)
    generate_sample(tmp_path / "b", spec)
    generate_sample(tmp_path / "five", SampleSpec(count=5, size=64, domain="shifted"))

    a, b, five = (file_bytes(tmp_path / name) for name in ("a", "b", "five"))
    assert a == b
    assert a == {name: data for name, data in five.items() if name in a}
    other_seed, _ = render_image(SampleSpec(size=64, seed=1, domain="shifted"), 0)
    assert not np.array_equal(render_image(spec, 0)[0], other_seed)


def test_shifted_images_are_darker_with_less_contrast(default_images, shifted_images):
    default = [intensity_stats(*pair) for pair in default_images]
    shifted = [intensity_stats(*pair) for pair in shifted_images]

    def mean(rows, key):
        return float(np.mean([row[key] for row in rows]))

    # Measured on 24 images: mean 128 -> 103, cell contrast 16 -> 8, halo 29 -> 10.
    assert mean(shifted, "mean") < mean(default, "mean") - 10
    assert mean(shifted, "cell_contrast") < 0.7 * mean(default, "cell_contrast")
    assert mean(shifted, "halo_contrast") < 0.6 * mean(default, "halo_contrast")
    # ... but the cells are still there to be found: a bright halo, a visible body.
    assert mean(shifted, "halo_contrast") > 4
    assert mean(shifted, "cell_contrast") > 3


def test_shifted_masks_keep_the_default_masks_properties(default_images, shifted_images):
    def summary(pairs):
        counts = [int(instances.max()) for _, instances in pairs]
        cover = [float((instances > 0).mean()) for _, instances in pairs]
        return np.mean(counts), np.mean(cover)

    for image, instances in shifted_images:
        assert image.dtype == np.uint8 and image.shape == (256, 256)
        assert instances.dtype == np.uint16 and instances.shape == (256, 256)
        ids = np.unique(instances)
        assert ids[0] == 0
        np.testing.assert_array_equal(ids[1:], np.arange(1, len(ids)))
        assert len(ids) - 1 >= 3
    (default_count, default_cover), (shifted_count, shifted_cover) = (
        summary(default_images),
        summary(shifted_images),
    )
    assert abs(shifted_count - default_count) < 4
    assert abs(shifted_cover - default_cover) < 0.05


def test_an_unknown_domain_names_the_choices():
    with pytest.raises(ValueError, match="unknown sample domain 'phase'") as error:
        SampleSpec(domain="phase")

    for name in DOMAINS:
        assert name in str(error.value)


def segflow(*args: str) -> subprocess.CompletedProcess:
    """The installed `segflow` command, in its own process so its environment stays there."""
    return subprocess.run(
        [str(Path(sys.executable).parent / "segflow"), *args], capture_output=True, text=True, timeout=300
    )


def test_cli_writes_the_shifted_domain(tmp_path):
    result = segflow("sample", "--out", str(tmp_path), "--domain", "shifted", "--count", "2", "--size", "64")

    assert result.returncode == 0, result.stderr
    assert "shifted" in result.stdout
    image, _ = render_image(SampleSpec(size=64, domain="shifted"), 1)
    with Image.open(tmp_path / "images" / "cells_0001.png") as img:
        np.testing.assert_array_equal(np.asarray(img), image)


def test_cli_rejects_an_unknown_domain_with_the_choices(tmp_path):
    result = segflow("sample", "--out", str(tmp_path), "--domain", "phase", "--count", "1")

    assert result.returncode == 1
    assert "phase" in result.stderr and "default" in result.stderr and "shifted" in result.stderr
    assert not (tmp_path / "images").exists()


def test_cli_help_documents_the_domains():
    result = segflow("sample", "--help")

    assert result.returncode == 0
    assert "--domain" in result.stdout
    for name in DOMAINS:
        assert name in result.stdout
