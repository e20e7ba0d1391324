"""segflow.data.splits: deterministic grouped splits and the leakage check."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from segflow.data.splits import (
    SPLITS,
    LeakageError,
    assign_from_file,
    assign_splits,
    check_leakage,
    group_keys,
)

RATIOS = {"train": 0.7, "val": 0.2, "test": 0.1}


def manifest(n: int, hashes: list[str] | None = None) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "id": [f"img{i:03d}" for i in range(n)],
            "content_hash": hashes if hashes is not None else [f"hash{i:03d}" for i in range(n)],
        }
    )


def test_same_seed_gives_the_same_split():
    frame = manifest(100)

    pd.testing.assert_series_equal(assign_splits(frame, RATIOS, seed=7), assign_splits(frame, RATIOS, seed=7))


def test_different_seeds_give_different_splits():
    frame = manifest(100)

    assert (assign_splits(frame, RATIOS, seed=1) != assign_splits(frame, RATIOS, seed=2)).any()


def test_split_does_not_depend_on_row_order():
    frame = manifest(50)
    shuffled = frame.sample(frac=1.0, random_state=3)

    a = assign_splits(frame, RATIOS, seed=7)
    b = assign_splits(shuffled, RATIOS, seed=7).sort_index()
    pd.testing.assert_series_equal(a, b)


def test_ratios_are_respected():
    counts = assign_splits(manifest(100), RATIOS, seed=42).value_counts()

    assert counts["train"] == pytest.approx(70, abs=1)
    assert counts["val"] == pytest.approx(20, abs=1)
    assert counts["test"] == pytest.approx(10, abs=1)


def test_every_row_gets_a_split_aligned_with_the_index():
    frame = manifest(30).set_index(pd.Index(range(100, 130)))

    splits = assign_splits(frame, RATIOS, seed=0)

    assert splits.index.equals(frame.index)
    assert splits.notna().all()
    assert set(splits) <= set(SPLITS)
    assert set(splits) == set(SPLITS)


def test_small_datasets_still_get_one_image_per_split():
    counts = assign_splits(manifest(3), RATIOS, seed=0).value_counts()

    assert counts.to_dict() == {"train": 1, "val": 1, "test": 1}


def test_rows_sharing_a_content_hash_land_in_the_same_split():
    # 40 distinct images, each also present under a second name.
    hashes = [f"hash{i:03d}" for i in range(40)] * 2
    frame = manifest(80, hashes)

    frame["split"] = assign_splits(frame, RATIOS, seed=5)

    assert (frame.groupby("content_hash")["split"].nunique() == 1).all()
    assert set(frame["split"]) == set(SPLITS)


def test_grouping_column_can_be_chosen():
    frame = manifest(30)
    frame["patient"] = [f"p{i % 6}" for i in range(30)]

    frame["split"] = assign_splits(frame, RATIOS, seed=5, group_column="patient")

    assert (frame.groupby("patient")["split"].nunique() == 1).all()


def test_too_few_distinct_images_raise_value_error():
    with pytest.raises(ValueError, match="at least 3"):
        assign_splits(manifest(2), RATIOS, seed=0)


def test_duplicates_do_not_count_as_distinct_images():
    with pytest.raises(ValueError, match="got 2"):
        assign_splits(manifest(6, ["a", "b"] * 3), RATIOS, seed=0)


def test_check_leakage_accepts_disjoint_splits():
    frame = manifest(20)
    frame["split"] = assign_splits(frame, RATIOS, seed=1)

    check_leakage({name: frame[frame["split"] == name] for name in SPLITS})


def test_check_leakage_names_an_id_in_two_splits():
    frames = {
        "train": manifest(3),
        "val": pd.DataFrame({"id": ["img001"], "content_hash": ["other"]}),
        "test": pd.DataFrame({"id": ["x"], "content_hash": ["y"]}),
    }

    with pytest.raises(LeakageError, match="img001") as info:
        check_leakage(frames)
    assert "train" in str(info.value) and "val" in str(info.value)


def test_check_leakage_names_a_content_hash_in_two_splits():
    frames = {
        "train": manifest(3),
        "test": pd.DataFrame({"id": ["renamed"], "content_hash": ["hash002"]}),
    }

    with pytest.raises(LeakageError, match="hash002"):
        check_leakage(frames)


def test_leakage_error_is_a_value_error():
    assert issubclass(LeakageError, ValueError)


def _grouped_manifest(rng, n_images: int, n_groups: int) -> pd.DataFrame:
    """Images named <group>_<k>.png; a few share pixels with an image of another group."""
    group_of = rng.integers(0, n_groups, n_images)
    hashes = [f"h{i}" for i in range(n_images)]
    for _ in range(2):  # two images duplicated (possibly into another group)
        a, b = rng.integers(0, n_images, 2)
        hashes[b] = hashes[a]
    return pd.DataFrame(
        {
            "id": [f"well{g:02d}_{i:03d}" for i, g in enumerate(group_of)],
            "image": [f"images/well{g:02d}_{i:03d}.png" for i, g in enumerate(group_of)],
            "content_hash": hashes,
            "foreground_fraction": rng.random(n_images),
        }
    )


@pytest.mark.parametrize("stratify", [None, "foreground_fraction"])
def test_grouped_split_never_puts_a_group_in_two_splits_for_any_seed(stratify):
    rng = np.random.default_rng(0)
    for seed in range(150):
        frame = _grouped_manifest(
            rng, n_images=int(rng.integers(30, 120)), n_groups=int(rng.integers(10, 25))
        )
        frame["group"] = group_keys(frame, regex=r"^(well\d+)_")
        frame["split"] = assign_splits(frame, RATIOS, seed, "group", stratify)
        assert (frame.groupby("group")["split"].nunique() == 1).all(), seed
        assert (frame.groupby("content_hash")["split"].nunique() == 1).all(), seed
        assert (frame.groupby(frame["id"].str[:6])["split"].nunique() == 1).all(), (
            seed
        )  # the wells themselves
        assert set(frame["split"]) == set(SPLITS), seed
        frames = {s: frame[frame["split"] == s] for s in SPLITS}
        check_leakage(frames, ("id", "content_hash", "group"))


def test_identical_pixels_merge_their_groups():
    frame = pd.DataFrame(
        {
            "id": ["a_1", "b_1", "c_1"],
            "image": ["a_1.png", "b_1.png", "c_1.png"],
            "content_hash": ["x", "x", "y"],
        }
    )
    assert group_keys(frame, regex=r"^(\w)_").tolist() == ["a", "a", "c"]


def test_group_regex_must_match_every_file_name():
    frame = pd.DataFrame(
        {"id": ["p1_a", "oops"], "image": ["p1_a.png", "oops.png"], "content_hash": ["1", "2"]}
    )
    with pytest.raises(ValueError, match=r"matches no part of 1 file name.*oops\.png"):
        group_keys(frame, regex=r"^(p\d+)_")
    with pytest.raises(ValueError, match="not a manifest column"):
        group_keys(frame, column="patient")


def test_stratified_splits_span_the_foreground_range():
    rng = np.random.default_rng(3)
    frame = pd.DataFrame(
        {"id": [f"i{k}" for k in range(200)], "content_hash": [f"h{k}" for k in range(200)]}
        | {"foreground_fraction": np.sort(rng.random(200))}
    )
    frame["split"] = assign_splits(frame, RATIOS, 11, stratify_column="foreground_fraction")
    counts = frame["split"].value_counts()
    assert (counts["train"], counts["val"], counts["test"]) == (140, 40, 20)
    # Every split has images from each fifth of the foreground range.
    quintile = pd.qcut(frame["foreground_fraction"], 5, labels=False)
    assert (pd.crosstab(frame["split"], quintile) > 0).all(axis=None)


def test_split_file_decides_every_split(tmp_path):
    frame = manifest(5)
    path = tmp_path / "splits.csv"
    path.write_text(
        "image,split\nimg000.png,test\nimg001.png,val\nimg002.png,train\nimg003.png,train\nimg004,train\n"
    )
    assert assign_from_file(frame, path).tolist() == ["test", "val", "train", "train", "train"]
    path.write_text("image,split\nimg000.png,test\n")
    with pytest.raises(ValueError, match="does not list 4 image"):
        assign_from_file(frame, path)
    path.write_text("image,split\n" + "".join(f"img{i:03d}.png,holdout\n" for i in range(5)))
    with pytest.raises(ValueError, match=r"unknown split name.*holdout"):
        assign_from_file(frame, path)
    with pytest.raises(ValueError, match="not found"):
        assign_from_file(frame, tmp_path / "nope.csv")
