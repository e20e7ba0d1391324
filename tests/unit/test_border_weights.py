"""train.border_weight: the pixels where touching objects meet weigh more in the training loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segflow.config import ParamsError, parse_params
from segflow.data.samples import Sample
from segflow.train.dataset import AugmentedDataset, build_augmentations, loss_targets, touching_band
from segflow.train.loop import _make_loss, preprocessing_from, train_model


def neighbours() -> np.ndarray:
    """(40, 70) uint16: two 12x12 squares sharing an edge, a third 2 pixels from the second,
    and a fourth far from all."""
    ids = np.zeros((40, 70), np.uint16)
    ids[10:22, 5:17] = 1
    ids[10:22, 17:29] = 2  # touches 1 along column 16 | 17
    ids[10:22, 31:43] = 3  # columns 29-30 are a 2-pixel gap
    ids[10:22, 55:67] = 4
    return ids


def test_touching_band_marks_where_objects_meet_and_narrow_gaps_only():
    ids = neighbours()
    band = touching_band(ids, 2)

    assert band[15, 15:19].all()  # two pixels either side of the shared edge
    assert not band[15, 13] and not band[15, 20]  # three pixels away: not
    assert band[15, 29:31].all()  # the narrow gap, though background
    assert not band[ids == 4].any()  # alone: no band at all, not even on its edge
    assert not band[:, 48:].any()  # nor around it
    assert not band[15, 6:13].any()  # the first square's own edges and interior


def test_touching_band_of_an_image_without_objects_is_empty():
    assert not touching_band(np.zeros((8, 8), np.uint16), 2).any()


def test_border_targets_reach_the_loss_through_the_augmentations():
    ids = neighbours()
    # Flips and rotations, no crop or rescale.
    params = parse_params({"train": {"crop_size": None}, "inference": {"instances": "distance"}})
    prep = preprocessing_from(params)
    image = np.where(ids > 0, 200, 20).astype(np.uint8)
    dataset = AugmentedDataset(
        [Sample("a", image, (ids > 0).astype(np.uint8), ids)],
        build_augmentations(params),
        prep,
        2,
        borders=True,
    )

    _, target = dataset[0]
    assert set(target) == {"semantic", "interior", "border"}
    assert set(np.unique(target["border"])) == {0.0, 1.0}
    assert target["border"].sum() == touching_band(ids, 2).sum()  # flips move the band, never resize it
    # Aligned with the class target: as much of the band lies on objects as before augmenting.
    band = touching_band(ids, 2)
    assert target["semantic"][target["border"] == 1].mean() == pytest.approx((ids > 0)[band].mean())


@pytest.mark.parametrize("n_classes", [2, 3])
def test_errors_on_the_band_cost_border_weight_more_than_the_same_errors_elsewhere(n_classes):
    labels = np.zeros((16, 16, 3), np.uint8)
    labels[..., 0], labels[..., 1] = 1, 255  # every pixel an object pixel, and a seed
    labels[:8, :, 2] = 255  # the band: the top half
    target = {k: torch.from_numpy(v)[None] for k, v in loss_targets(labels, n_classes).items()}
    n_semantic = 1 if n_classes == 2 else n_classes
    right = torch.full((1, n_semantic + 1, 16, 16), 6.0)
    if n_classes > 2:
        right[:, :n_semantic] = torch.tensor([-6.0, 6.0, -6.0])[:, None, None]  # class 1 everywhere
    on_band, off_band = right.clone(), right.clone()
    on_band[..., 2, :] = -right[..., 2, :]  # one wrong row on the band ...
    off_band[..., 12, :] = -right[..., 12, :]  # ... or off it

    for weight, ratio in ((0.0, 1.0), (4.0, 5.0)):
        loss = _make_loss(0.0, n_classes, weight)  # pixel losses only: the part the weight scales
        base = loss(right, target).item()
        assert loss(on_band, target).item() - base == pytest.approx(
            ratio * (loss(off_band, target).item() - base)
        )


def test_without_border_targets_the_loss_is_the_unweighted_one():
    rng = np.random.default_rng(0)
    labels = np.dstack([rng.integers(0, 2, (16, 16)), rng.integers(0, 256, (16, 16))]).astype(np.uint8)
    target = {k: torch.from_numpy(v)[None] for k, v in loss_targets(labels, 2).items()}
    logits = torch.from_numpy(rng.normal(size=(1, 2, 16, 16)).astype(np.float32))

    assert _make_loss(0.5, 2, 5.0)(logits, target).item() == _make_loss(0.5, 2, 0.0)(logits, target).item()


def test_train_model_weighs_the_band_when_border_weight_is_set(tmp_path):
    ids = neighbours()[:, :64]
    image = np.where(ids > 0, 200, 20).astype(np.uint8)
    samples = [
        Sample(f"s{i}", np.roll(image, i, 1), np.roll(ids > 0, i, 1).astype(np.uint8), np.roll(ids, i, 1))
        for i in range(6)
    ]
    first_epochs = {}
    for weight in (0.0, 5.0):
        params = parse_params(
            {
                "inference": {"instances": "distance"},
                "train": {"epochs": 1, "batch_size": 2, "crop_size": 32, "border_weight": weight},
            }
        )
        first_epochs[weight] = train_model(params, samples[:4], samples[4:], tmp_path / f"{weight}.pt")[0]

    # The band's pixels count six times over, so the same first crops from the same initial
    # weights cost more.
    assert first_epochs[5.0]["train_loss"] > first_epochs[0.0]["train_loss"]


def test_border_weight_needs_a_model_that_learns_instance_seeds():
    semantic = {"ingest": {"mask_kind": "semantic", "mask_values": [0, 255]}}
    with pytest.raises(ParamsError) as info:
        parse_params(semantic | {"train": {"border_weight": 5}})

    assert "train.border_weight" in str(info.value) and "inference.instances: distance" in str(info.value)
    assert parse_params({"train": {"border_weight": 5}}).train.border_weight == 5  # auto = watershed here
