"""train.crop_sampling: how an epoch's random crops are dealt over the training images."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from segflow.config import ParamsError, parse_params
from segflow.data.samples import Sample
from segflow.errors import UserError
from segflow.train.dataset import AugmentedDataset, build_augmentations, crop_order, touching_band
from segflow.train.loop import preprocessing_from, train_model


def objects(pairs: int, alone: int, width: int = 96) -> np.ndarray:
    """(32, width) uint16 ids: `pairs` pairs of 8x8 squares sharing an edge, then `alone`
    squares far from every other."""
    ids = np.zeros((32, width), np.uint16)
    x, next_id = 2, 1
    for _ in range(pairs):
        ids[4:12, x : x + 8], ids[4:12, x + 8 : x + 16] = next_id, next_id + 1
        x, next_id = x + 24, next_id + 2
    for _ in range(alone):
        ids[20:28, x : x + 8] = next_id
        x, next_id = x + 16, next_id + 1
    return ids


def sample(name: str, ids: np.ndarray) -> Sample:
    return Sample(name, np.where(ids > 0, 200, 20).astype(np.uint8), (ids > 0).astype(np.uint8), ids)


def test_uniform_crops_every_image_equally_in_the_order_it_always_had():
    samples = [sample(n, objects(1, 1)) for n in "abc"]

    assert crop_order(samples, 3, "uniform", 2) == [0, 1, 2, 0, 1, 2, 0, 1, 2]


def test_contacts_deal_the_extra_crops_by_touching_pixels_and_keep_the_epoch_length():
    one_pair, isolated, two_pairs = objects(1, 2), objects(0, 3), objects(2, 0)
    assert touching_band(two_pairs, 2).sum() == 2 * touching_band(one_pair, 2).sum() > 0
    samples = [sample("one pair", one_pair), sample("isolated", isolated), sample("two pairs", two_pairs)]

    order = crop_order(samples, 4, "contacts", 2)

    # 3 x 4 crops: one per image, and the other 9 split 1 : 0 : 2 by touching pixels.
    assert len(order) == 12
    assert [order.count(i) for i in range(3)] == [1 + 3, 1, 1 + 6]


def test_contacts_round_to_the_epoch_length_by_the_largest_remainders():
    samples = [sample("a", objects(1, 0)), sample("b", objects(1, 0)), sample("c", objects(2, 0))]

    order = crop_order(samples, 2, "contacts", 2)  # 3 extra crops, shares 0.75 : 0.75 : 1.5

    assert len(order) == 6
    assert [order.count(i) for i in range(3)] == [1 + 1, 1 + 1, 1 + 1]  # 0, 0, 1 then remainders .75 .75 .5


def test_contacts_fall_back_to_uniform_where_nothing_touches(caplog):
    samples = [sample("a", objects(0, 2)), sample("b", objects(0, 3))]

    with caplog.at_level(logging.WARNING, "segflow.train.dataset"):
        order = crop_order(samples, 3, "contacts", 2)

    assert order == [0, 1, 0, 1, 0, 1]
    assert "no objects touch" in caplog.text


def test_contacts_without_instance_ids_say_what_to_set():
    ids = objects(1, 0)
    without_ids = Sample("a", ids.astype(np.uint8), (ids > 0).astype(np.uint8), None)

    with pytest.raises(UserError, match=r"train\.crop_sampling"):
        crop_order([without_ids], 2, "contacts", 2)


def test_the_dataset_crops_the_images_the_order_names():
    # No augmentation and no crop, so each item keeps its image's width.
    off = dict.fromkeys(["hflip", "vflip", "rotate90", "brightness_contrast", "gauss_noise"], 0.0)
    params = parse_params(
        {"train": {"crop_size": None, "augment": off}, "inference": {"instances": "distance"}}
    )
    samples = [sample("narrow", objects(0, 1, 32)), sample("wide", objects(2, 0, 64))]

    dataset = AugmentedDataset(
        samples, build_augmentations(params), preprocessing_from(params), 2, 3, sampling="contacts"
    )

    widths = [dataset[i][0].shape[-1] for i in range(len(dataset))]
    assert sorted(widths) == [32] + [64] * 5


def test_class_masks_cannot_deal_crops_by_contacts():
    semantic = {"ingest": {"mask_kind": "semantic", "mask_values": [0, 255]}}
    with pytest.raises(ParamsError) as info:
        parse_params(semantic | {"train": {"crop_sampling": "contacts"}})

    assert "train.crop_sampling" in str(info.value) and "uniform" in str(info.value)


def test_training_deals_its_crops_by_contacts_when_asked(tmp_path, caplog):
    samples = [sample(f"s{i}", objects(i % 2 * 2, 1, 64)) for i in range(6)]
    params = parse_params(
        {
            "inference": {"instances": "distance"},
            "train": {
                "epochs": 1,
                "batch_size": 2,
                "crop_size": 32,
                "crops_per_image": 3,
                "crop_sampling": "contacts",
            },
        }
    )

    with caplog.at_level(logging.INFO, "segflow.train.dataset"):
        train_model(params, samples[:4], samples[4:], tmp_path / "model.pt")

    # s0 and s2 hold no touching objects, s1 and s3 two pairs each: 8 extra crops, 4 apiece.
    assert "{'s0': 1, 's1': 5, 's2': 1, 's3': 5}" in caplog.text
