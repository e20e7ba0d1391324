"""Cross-validation bookkeeping: grouped folds, each fold's roles, the summary over folds."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from scipy.ndimage import label

from segflow.config import ParamsError, parse_params
from segflow.core.postprocessing import Prediction
from segflow.core.sizes import median_diameter
from segflow.data.samples import Sample
from segflow.errors import UserError
from segflow.evaluate.crossval import (
    WORKDIR_PREFIX,
    FoldResult,
    _fold_models_dir,
    assign_folds,
    check_subsets,
    describe,
    fold_roles,
    fold_table,
    known_diameter_scores,
    partition_seeds,
    rescaled,
    summarize_folds,
    with_seed,
)
from segflow.evaluate.scoring import score_split
from tests.unit.test_sizes import DiskModel, _segmenter, pairs


def test_folds_keep_groups_together_balance_images_and_repeat():
    groups = pd.Series(["a"] * 4 + ["b"] * 3 + list("cdefghij"))  # 15 images, 10 groups
    folds = assign_folds(groups, 3, seed=7)
    for name in groups.unique():
        assert folds[groups == name].nunique() == 1
    counts = folds.value_counts()
    assert sorted(counts.index) == [0, 1, 2] and counts.max() - counts.min() <= 1
    assert folds.equals(assign_folds(groups, 3, seed=7))
    shuffled = groups.sample(frac=1, random_state=0)
    assert assign_folds(shuffled, 3, seed=7).sort_index().equals(folds)  # row order does not matter


def test_too_few_groups_for_the_folds_is_a_clear_error():
    with pytest.raises(UserError, match=r"crossval\.folds 5 needs at least 5 groups"):
        assign_folds(pd.Series(["a", "a", "b", "c"]), 5, seed=0)


def test_every_fold_is_held_out_once_and_never_trains_on_itself():
    roles = [fold_roles(i, 5) for i in range(5)]
    assert sorted(r["held_out"][0] for r in roles) == list(range(5))
    for i, r in enumerate(roles):
        assert r["val"] == [(i + 1) % 5] and set(r["train"]) == set(range(5)) - {i, (i + 1) % 5}


def test_rescaled_samples_shrink_images_and_ids_together():
    ids = np.zeros((40, 40), np.uint16)
    ids[5:25, 5:25] = 3
    sample = Sample("x", np.full((40, 40), 100, np.uint8), (ids > 0).astype(np.uint8), ids)
    [small] = rescaled([sample], 0.5)
    assert small.image.shape == small.mask.shape == small.instances.shape == (20, 20)
    assert (small.instances == 3).sum() == 100 and small.id == "x"
    assert rescaled([sample], 1.0)[0] is sample


def _result(fold: int, ap50: float, seed: int = 42, merged: int | None = None) -> FoldResult:
    """A fold's result; with `merged`, its summary at scale 1 counts unmatched objects too."""
    scores = {
        1.0: {"images": 2, "ap50": ap50, "dice": 0.8},
        0.6: {"images": 2, "ap50": ap50 - 0.1, "dice": 0.7},
    }
    if merged is not None:
        scores[1.0] |= {"merged": merged, "missed": 1, "outlined": 0, "fragments": 2, "unannotated": 0}
    chosen = {"threshold": 0.5, "tta": "none"}
    return FoldResult(fold, scores, [], chosen, epochs=3, train_seconds=1.0, seed=seed)


def test_summary_gives_mean_spread_and_every_fold_per_scale():
    summary = summarize_folds([_result(0, 0.8), _result(1, 0.9), _result(2, 1.0)], [1.0, 0.6])
    assert summary["folds"] == 3 and summary["images"] == 6
    block = summary["scale_1"]
    assert block["ap50"]["mean"] == pytest.approx(0.9) and block["ap50"]["std"] == pytest.approx(0.1)
    assert (block["ap50"]["min"], block["ap50"]["max"]) == (0.8, 1.0)
    assert summary["scale_0.6"]["ap50"]["mean"] == pytest.approx(0.8)
    assert [row["fold"] for row in block["per_fold"]] == [0, 1, 2]
    assert len(fold_table(summary)) == 6 and {r["scale"] for r in fold_table(summary)} == {1.0, 0.6}
    assert "ap50 0.900 ± 0.100" in describe(summary, [1.0, 0.6])
    assert summary["seeds"] == [42] and "per_seed" not in block  # one partition: nothing to compare
    assert "merged" not in block["per_fold"][0]  # summaries without object counts (no instance ids)


def test_repeated_partitions_spread_over_every_fold_and_give_each_seeds_means():
    results = [_result(f, ap50, 42, merged=f) for f, ap50 in enumerate((0.8, 0.9, 1.0))]
    results += [_result(f, ap50, 7, merged=10 * f) for f, ap50 in enumerate((0.6, 0.7, 0.8))]
    summary = summarize_folds(results, [1.0])
    assert summary["folds"] == 3 and summary["images"] == 6 and summary["seeds"] == [42, 7]  # one partition's
    block = summary["scale_1"]
    assert block["ap50"]["mean"] == pytest.approx(0.8) and (block["ap50"]["min"], block["ap50"]["max"]) == (
        0.6,
        1.0,
    )
    assert block["ap50"]["std"] == pytest.approx(np.std([0.8, 0.9, 1.0, 0.6, 0.7, 0.8], ddof=1), abs=1e-6)
    assert [(r["seed"], r["ap50"]) for r in block["per_seed"]] == [
        (42, pytest.approx(0.9)),
        (7, pytest.approx(0.7)),
    ]
    # Unmatched objects add up over each seed's folds (and stay per fold in folds.csv).
    assert [(r["merged"], r["missed"], r["fragments"]) for r in block["per_seed"]] == [(3, 3, 6), (30, 3, 6)]
    assert [r["merged"] for r in block["per_fold"]] == [0, 1, 2, 0, 10, 20]
    assert [(r["seed"], r["fold"]) for r in block["per_fold"]] == [(s, f) for s in (42, 7) for f in range(3)]
    assert [(r["seed"], r["fold"]) for r in summary["chosen"]][3] == (7, 0)
    text = describe(summary, [1.0])
    assert "2 partitions (seeds 42, 7) of 3 folds, 6 images" in text and "ap50 0.800 ± 0.141" in text
    assert "seed 42's folds: ap50 0.900, dice 0.800; unmatched objects: merged 3, missed 3" in text
    assert "seed 7's folds: ap50 0.700, dice 0.800; unmatched objects: merged 30" in text
    assert len(fold_table(summary)) == 6


def test_a_partition_seed_replaces_base_seed_and_deals_other_folds():
    params = parse_params({"crossval": {"folds": 3, "seeds": [42, 7]}})
    assert partition_seeds(params) == [42, 7] and partition_seeds(parse_params({})) == [42]
    seeded = with_seed(params, 7)
    assert seeded.base.seed == 7 and params.base.seed == 42 and seeded.train == params.train
    assert seeded.digest() != params.digest()  # the fold's resume fingerprint follows the seed
    groups = pd.Series(list("abcdefghijkl"))
    assert not assign_folds(groups, 3, 42).equals(assign_folds(groups, 3, 7))


@pytest.mark.parametrize(("value", "words"), [(2, "at least 3 folds"), (1, "at least 3 folds")])
def test_crossval_params_are_checked(value, words):
    with pytest.raises(ParamsError, match=words):
        parse_params({"crossval": {"folds": value}})
    with pytest.raises(ParamsError, match=r"\(0, 4\]"):
        parse_params({"crossval": {"folds": 3, "scales": [0]}})
    with pytest.raises(ParamsError, match=r"crossval\.seeds.*distinct seeds of 0 or more, e\.g\. \[42, 7\]"):
        parse_params({"crossval": {"folds": 3, "seeds": [7, 7]}})


def test_size_normalisation_needs_instance_ids():
    semantic = {
        "ingest": {"mask_kind": "semantic", "mask_values": [0, 255]},
        "convert": {"foreground_values": [255]},
    }
    with pytest.raises(ParamsError, match=r"train\.diameter"):
        parse_params(semantic | {"train": {"diameter": 30}, "inference": {"instances": "components"}})
    with pytest.raises(ParamsError, match=r"inference\.instances: distance"):
        parse_params(semantic | {"inference": {"instances": "distance"}})
    assert (
        parse_params({"train": {"diameter": 30}, "inference": {"diameter": 12.5}}).inference.diameter == 12.5
    )


def _square(i: int, shift: int, confidence: float) -> tuple[Sample, Prediction]:
    """An image with one 10x10 object, and a prediction of it shifted by `shift` pixels."""
    truth = np.zeros((20, 20), np.uint16)
    truth[5:15, 5:15] = 1
    pred = np.roll(truth, shift, axis=1)
    mask = (pred > 0).astype(np.uint8)
    sample = Sample(f"img{i}", np.zeros((20, 20), np.uint8), (truth > 0).astype(np.uint8), truth)
    return sample, Prediction(mask.astype(np.float32), mask * np.float32(confidence), mask, pred)


def test_pooled_and_subset_scores_use_every_held_out_image_once():
    results = []
    for fold, shift in enumerate((0, 6)):  # fold 0 perfect; fold 1's object overlaps by IoU 0.25
        sample, prediction = _square(fold, shift, confidence=0.9 - 0.3 * fold)
        scores = {1.0: {"images": 1, "ap50": 1.0 - fold}}
        results.append(FoldResult(fold, scores, [], {}, 1, 1.0, {1.0: ([sample], [prediction])}))
    summary = summarize_folds(results, [1.0], ["background", "cell"], {"hard": ["img1"]})
    block = summary["scale_1"]
    # Pooled: the confident, right object first, then the wrong one: precision 1 up to recall 0.5.
    assert block["pooled"]["images"] == 2 and block["pooled"]["ap50"] == pytest.approx(0.5, abs=0.01)
    # Fold 1's object, outlined off by 6 pixels: too little of it found, and a detection beside it.
    lost = {"merged": 0, "missed": 0, "outlined": 1, "fragments": 0, "unannotated": 1}
    assert block["subset_hard"] == {"images": 1, "ap50": 0.0} | lost
    assert {k: block["pooled"][k] for k in lost} == lost
    assert "unmatched objects: merged 0, missed 0, outlined 1, fragments 0, unannotated 1" in describe(
        summary, [1.0]
    )
    with pytest.raises(UserError, match="imgX"):
        check_subsets({"hard": ["img1", "imgX"]}, ["img0", "img1"])


def test_summary_sets_scores_at_known_object_sizes_beside_the_estimated_ones():
    results = [_result(0, 0.8), _result(1, 0.9)]
    assert "known_diameter" not in summarize_folds(results, [1.0])["scale_1"]  # a model without sizes
    for r, ap50 in zip(results, (0.9, 1.0), strict=True):
        r.known = {scale: {"images": 2, "ap50": ap50 - (1 - scale) / 2, "dice": 0.8} for scale in (1.0, 0.6)}
    summary = summarize_folds(results, [1.0, 0.6])
    assert summary["scale_1"]["known_diameter"]["ap50"]["mean"] == pytest.approx(0.95)
    assert summary["scale_1"]["ap50"]["mean"] == pytest.approx(0.85)  # the estimated sizes' scores
    assert summary["scale_0.6"]["known_diameter"]["ap50"]["mean"] == pytest.approx(0.75)
    assert "at each image's true object diameter: ap50 0.950 ± 0.071" in describe(summary, [1.0, 0.6])
    # A fold without known scores (held-out images without instance ids) leaves no block.
    results[1].known = {}
    assert "known_diameter" not in summarize_folds(results, [1.0])["scale_1"]


class SizeBoundModel(DiskModel):
    """Like DiskModel, but it sees disks apart only when shown within 15% of the trained 20 px;
    shown larger or smaller it joins neighbours closer than 15 px, as a network shown objects
    off its size merges touching ones. Its own size estimate then locks onto merged objects."""

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        out = super().__call__(batch)
        for i, bright in enumerate(batch[:, 0] > 0):
            shown = median_diameter(label(bright)[0])
            if shown and abs(shown / 20.0 - 1) > 0.15:
                kernel = np.ones((1, 15), np.uint8)
                joined = cv2.morphologyEx(bright.astype(np.uint8), cv2.MORPH_CLOSE, kernel)
                out[i][:, joined > 0] = 8.0
        return out


def test_known_diameter_scores_say_what_the_size_estimate_costs():
    truth = pairs(512, 20, 8, 128)  # 24 disks 40 px across in pairs 8 px apart; trained at 20 px
    sample = Sample("pairs", (truth > 0).astype(np.uint8) * 255, (truth > 0).astype(np.uint8), truth)
    classes = ["background", "cell"]
    model = SizeBoundModel()
    segmenter = _segmenter(model, diameter="auto", diameter_choices=[0.8, 1.0])
    estimated = score_split(segmenter, [sample], "held_out")
    assert estimated.summary["ap50"] < 0.1  # rows of disks merged into 4 objects
    model.shapes.clear()
    known = known_diameter_scores(segmenter, [sample], classes)
    assert known.summary["ap50"] == pytest.approx(1.0)  # shown at 40 -> 20 px, every disk apart
    assert model.shapes == [(256, 256)]  # one pass at the true size: no estimate, no size choices
    # Nothing to compare where no size is estimated: a fixed diameter, or a native-scale model.
    assert known_diameter_scores(_segmenter(DiskModel(), diameter=40.0), [sample], classes) is None
    assert known_diameter_scores(_segmenter(DiskModel(), train_diameter=0.0), [sample], classes) is None
    semantic = Sample("pairs", sample.image, sample.mask, None)  # no instance ids: no true size
    assert known_diameter_scores(segmenter, [semantic], classes) is None


def test_fold_models_live_in_the_resume_dir_and_a_killed_runs_are_removed(tmp_path):
    resume = tmp_path / ".resume" / "crossval"
    stale = resume / f"{WORKDIR_PREFIX}killed"  # what a SIGKILLed run leaves behind
    (stale / "seed42").mkdir(parents=True)
    (stale / "seed42" / "fold0.pt").write_bytes(b"a model")
    kept = resume / "seed42"  # resume states are not the fold models' directory
    kept.mkdir()
    (kept / "fold0.pt").write_bytes(b"a state")
    with _fold_models_dir(resume) as tmp:
        assert Path(tmp).parent == resume and Path(tmp).name.startswith(WORKDIR_PREFIX)
        assert not stale.exists()
    assert not Path(tmp).exists() and (kept / "fold0.pt").read_bytes() == b"a state"
    with _fold_models_dir(None) as tmp:  # no resume dir: the system's temporary directory
        assert resume not in Path(tmp).parents
