"""segflow.splits: deterministic grouped splits and the leakage check."""

from __future__ import annotations

import pandas as pd
import pytest

from segflow.splits import SPLITS, LeakageError, assign_splits, check_leakage

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
