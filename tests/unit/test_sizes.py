"""Object size: measuring it, rescaling to the trained size, and the Segmenter doing both."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from scipy.ndimage import label

from segflow.config import InferenceParams
from segflow.core.inference import Segmenter
from segflow.core.preprocessing import Preprocessing
from segflow.core.sizes import (
    median_diameter,
    predicted_diameter,
    resize_labels,
    resize_planes,
    scale_for,
    solid_fraction,
)
from segflow.data.samples import Sample
from segflow.errors import UserError
from segflow.evaluate.scoring import choose_postprocessing, val_as_served


def disks(size: int, radius: int, spacing: int) -> np.ndarray:
    """(size, size) uint16 ids: a grid of separate disks of `radius` pixels."""
    yy, xx = np.mgrid[:size, :size]
    out = np.zeros((size, size), np.uint16)
    n = 0
    for cy in range(spacing // 2, size - radius, spacing):
        for cx in range(spacing // 2, size - radius, spacing):
            n += 1
            out[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = n
    return out


def test_median_diameter_is_the_equal_area_diameter_weighted_by_area():
    image = disks(200, 10, 40)
    assert median_diameter(image) == pytest.approx(20, rel=0.05)
    specks = image.copy()
    specks[0:40:4, 0:200:4] = np.arange(1000, 1000 + 500, dtype=np.uint16)[:500].reshape(10, 50)
    # 500 one-pixel specks outnumber the 25 disks but hold few pixels: the estimate holds.
    assert median_diameter(specks) == pytest.approx(20, rel=0.1)
    assert median_diameter(np.zeros((8, 8), np.uint16)) is None


def test_median_diameter_ignores_a_blob_that_floods_most_of_the_foreground():
    flooded = np.zeros((500, 500), np.uint16)
    flooded[:200, :200] = disks(200, 10, 40)  # 25 disks 20 px across
    flooded[200:500, 200:500] = 1000  # and one 300 x 300 blob: ten times their pixels
    assert median_diameter(flooded) == pytest.approx(20, rel=0.1)
    # Objects of many sizes are not outliers: nuclei from 10 to 28 px all count.
    mixed = np.zeros((100, 400), np.uint16)
    for i, radius in enumerate(range(5, 15)):
        yy, xx = np.ogrid[:100, :400]
        mixed[(yy - 50) ** 2 + (xx - 20 - 38 * i) ** 2 <= radius**2] = i + 1
    assert 18 <= median_diameter(mixed) <= 26


def nuclei_and_floods() -> np.ndarray:
    """50 disks 20 px across, and below them 3 flooded 100 x 100 squares holding twice their pixels."""
    image = np.zeros((400, 400), np.uint16)
    image[:200, :] = disks(400, 10, 40)[:200]
    for i, x in enumerate((20, 150, 280)):
        image[260:360, x : x + 100] = 1000 + i
    return image


def test_predicted_sizes_leave_out_a_few_floods_but_not_a_population():
    flooded = nuclei_and_floods()
    # Several floods outweigh the nuclei, so the area-weighted median lands on them; they are
    # 3 objects of 53, so the model's own size estimate leaves them out.
    assert median_diameter(flooded) > 100
    assert predicted_diameter(flooded) == pytest.approx(20, rel=0.1)
    # 500 specks make the 25 real objects "giant" by count, but the specks hold few pixels:
    # they are no population the objects could be floods beside, so the area-weighted median decides.
    specks = disks(200, 10, 40)
    specks[0:40:4, 0:200:4] = np.arange(1000, 1500, dtype=np.uint16).reshape(10, 50)
    assert predicted_diameter(specks) == pytest.approx(20, rel=0.1)
    assert predicted_diameter(np.zeros((8, 8), np.uint16)) is None


def test_scale_for_is_clamped_and_neutral_when_unknown():
    assert scale_for(40, 20) == 0.5
    assert scale_for(None, 20) == 1.0 and scale_for(0, 20) == 1.0
    assert scale_for(1, 30) == 4.0 and scale_for(1000, 30) == 0.25


def test_resizing_keeps_ids_and_shapes():
    labels = disks(64, 6, 16)
    small = resize_labels(labels, (32, 32))
    assert small.dtype == labels.dtype and set(np.unique(small)) <= set(np.unique(labels))
    planes = np.random.default_rng(0).random((2, 30, 40), dtype=np.float32)
    assert resize_planes(planes, (60, 80)).shape == (2, 60, 80)


class DiskModel:
    """A stand-in network: confident foreground wherever the input is bright, the same map as
    its seed channel (every disk its own seed); it records the shape of every input."""

    def __init__(self):
        self.shapes: list[tuple[int, int]] = []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.shapes += [tuple(x.shape[1:]) for x in batch]
        fg = np.where(batch[:, :1] > 0, 8.0, -8.0).astype(np.float32)
        return np.concatenate([fg, fg], axis=1)  # (N, 2, H, W): foreground and seed logits


def _segmenter(model, **prep) -> Segmenter:
    base = {
        "in_channels": 1,
        "mean": 0.0,
        "std": 1.0,
        "pad_multiple": 1,
        "threshold": 0.5,
        "scaling": "range",
    }
    base |= {"instances": "distance", "seed_threshold": 0.5, "train_diameter": 20.0, "data_diameter": 20.0}
    return Segmenter(model, Preprocessing(**(base | prep)))


def test_a_given_diameter_rescales_the_input_and_results_come_back_at_full_size():
    image = (disks(128, 20, 64) > 0).astype(np.uint8) * 255  # disks 40 px across
    model = DiskModel()
    [prediction] = _segmenter(model).predict([image], diameters=[40.0])
    assert model.shapes == [(64, 64)]  # 40 px objects -> the trained 20 px: half size
    assert prediction.instances.shape == image.shape and prediction.instances.max() == 4


def test_auto_estimates_each_images_object_size_with_a_first_pass():
    image = (disks(128, 20, 64) > 0).astype(np.uint8) * 255
    model = DiskModel()
    [prediction] = _segmenter(model, diameter="auto").predict([image])
    assert model.shapes == [(128, 128), (64, 64)]  # first guess: the training data's scale (1)
    assert prediction.instances.max() == 4
    model.shapes.clear()
    _segmenter(model, diameter=40.0).predict([image])  # a fixed diameter needs one pass
    assert model.shapes == [(64, 64)]


def test_auto_is_not_led_away_by_a_few_floods():
    image = (nuclei_and_floods() > 0).astype(np.uint8) * 255
    model = DiskModel()
    _, [applied] = _segmenter(model, diameter="auto").scaled_logits([image])
    # The first pass at the trained size finds the nuclei at 20 px: no shrinking after the floods.
    assert applied == pytest.approx(1.0) and model.shapes == [(400, 400)]


class SplittingModel(DiskModel):
    """Like DiskModel, but objects far larger than it learned come out cut in quarters: in an
    input over 160 px across (disks(256, 40, 128) shown at more than 2.5x the trained 20 px),
    seeds break along the lines through the disks' centres."""

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        out = super().__call__(batch)
        h, w = batch.shape[2:]
        if h > 160:
            for frac in (0.25, 0.75):
                out[:, 1, round(h * frac) - 1 : round(h * frac) + 1, :] = -8.0
                out[:, 1, :, round(w * frac) - 1 : round(w * frac) + 1] = -8.0
        return out


def test_auto_measures_again_until_the_size_settles():
    image = (disks(256, 40, 128) > 0).astype(np.uint8) * 255  # four disks 80 px across, trained at 20
    model = SplittingModel()
    [prediction] = _segmenter(model, diameter="auto").predict([image])
    # Pass 1 at the data's scale sees quarters (40 px) and halves the image; pass 2 sees whole
    # disks (80 px) and halves it again; pass 3 shows them at the trained 20 px.
    assert model.shapes == [(256, 256), (128, 128), (64, 64)]
    assert prediction.instances.max() == 4


class PartialModel(DiskModel):
    """Like DiskModel, but a disk shown over 1.6x the trained 20 px wide comes out as a smaller
    disk, 20 + 0.35 x (shown - 20) px across, as a real model sees an object far larger than
    it learned only in part. Shown closer to 20 px, disks come out whole."""

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.shapes += [tuple(x.shape[1:]) for x in batch]
        fg = np.full((len(batch), 1, *batch.shape[2:]), -8.0, np.float32)
        for i, x in enumerate(batch[:, 0] > 0):
            ids, n = label(x)
            depth = cv2.distanceTransform(x.astype(np.uint8), cv2.DIST_L2, 5)  # to the disk's edge
            for k in range(1, n + 1):
                shown = 2 * np.sqrt((ids == k).sum() / np.pi)
                seen = shown if shown <= 1.6 * 20 else 20 + 0.35 * (shown - 20)
                fg[i, 0][(ids == k) & (depth >= (shown - seen) / 2)] = 8.0
        return np.concatenate([fg, fg], axis=1)


def test_auto_keeps_measuring_while_a_large_objects_size_still_moves():
    """Disks 80 px across, trained at 20: the passes measure them about 42, 56 and then 80 px,
    as the dsb subset's largest nuclei (96 px) were measured ever larger. Three passes would
    stop at 56 px (the dsb nuclei stopped at 47, every one then cut in pieces); measuring goes
    on while the scale moves by more than 10%, up to SIZE_PASSES passes."""
    image = (disks(320, 40, 160) > 0).astype(np.uint8) * 255
    model = PartialModel()
    _, [scale] = _segmenter(model, diameter="auto").scaled_logits([image])
    assert 20.0 / scale == pytest.approx(80.0, rel=0.1)


def test_models_at_native_scale_ignore_diameters():
    image = np.zeros((32, 32), np.uint8)
    model = DiskModel()
    _segmenter(model, train_diameter=0.0).predict([image], diameters=[80.0])
    assert model.shapes == [(32, 32)]


@pytest.mark.parametrize("bad", [0.0, -3.0, float("nan"), float("inf")])
def test_a_bad_diameter_is_refused_by_name(bad):
    with pytest.raises(UserError, match="diameter"):
        _segmenter(DiskModel()).predict([np.zeros((16, 16), np.uint8)], diameters=[bad])


def test_enlarging_stops_at_max_pixels():
    image = (disks(64, 5, 16) > 0).astype(np.uint8) * 255  # 10 px objects, trained at 20: 2x wanted
    model = DiskModel()
    segmenter = _segmenter(model)
    segmenter.max_pixels = 96 * 96
    segmenter.predict([image], diameters=[10.0])
    assert model.shapes == [(96, 96)]  # 1.5x: as large as serve.max_pixels allows
    model.shapes.clear()
    segmenter.predict([image], diameters=[40.0])  # shrinking is never limited
    assert model.shapes == [(32, 32)]


@pytest.mark.parametrize("image", [disks(128, 20, 64), disks(64, 10, 32)], ids=["40px", "20px"])
def test_min_area_counts_pixels_at_the_models_scale(image):
    # Disks 40 or 20 px across, given with their diameter to a model trained at 20 px: it sees
    # both at about 310 px of area. So min_area 200 keeps both and 400 drops both, though in
    # the images as given the large disks cover about 1,250 px and the small ones 310.
    image = (image > 0).astype(np.uint8) * 255
    diameter = float(2 * round(np.sqrt(np.count_nonzero(image) / 4 / np.pi)))
    [kept] = _segmenter(DiskModel(), min_area=200).predict([image], diameters=[diameter])
    [dropped] = _segmenter(DiskModel(), min_area=400).predict([image], diameters=[diameter])
    assert kept.instances.max() == 4 and dropped.instances.max() == 0
    assert kept.mask.any() and not dropped.mask.any()


def test_scaled_logits_report_the_factor_each_image_was_resized_by():
    images = [(disks(128, 20, 64) > 0).astype(np.uint8) * 255, np.zeros((64, 64), np.uint8)]
    logits, scales = _segmenter(DiskModel()).scaled_logits(images, diameters=[40.0, 10.0])
    assert [logit.shape[1:] for logit in logits] == [(128, 128), (64, 64)]
    assert scales == pytest.approx([0.5, 2.0])
    assert _segmenter(DiskModel(), train_diameter=0.0).scaled_logits(images)[1] == [1.0, 1.0]


def pairs(size: int, radius: int, gap: int, spacing: int) -> np.ndarray:
    """(size, size) uint16 ids: a grid of disk pairs side by side, `gap` pixels apart."""
    yy, xx = np.mgrid[:size, :size]
    out = np.zeros((size, size), np.uint16)
    n = 0
    for cy in range(spacing // 2, size - radius, spacing):
        for cx in range(spacing // 2, size - 3 * radius - gap, spacing):
            for x in (cx, cx + 2 * radius + gap):
                n += 1
                out[(yy - cy) ** 2 + (xx - x) ** 2 <= radius**2] = n
    return out


def test_solid_fraction_is_the_share_of_object_pixels_in_convex_objects():
    assert solid_fraction(disks(128, 10, 32)) == pytest.approx(1.0)
    dumbbells = (pairs(128, 10, 6, 64) > 0).astype(np.uint16)
    dumbbells[28:36, 40:50] = 1  # each pair joined by an 8-pixel bar: about 0.8 of its convex hull
    dumbbells[92:100, 40:50] = 1
    joined = label(dumbbells)[0].astype(np.uint16)
    assert joined.max() == 2 and solid_fraction(joined) == 0.0
    half = joined.copy()
    half[64:] = disks(128, 10, 32)[64:]  # the top half a dumbbell, the bottom convex disks
    assert 0.6 < solid_fraction(half) < 0.85
    assert solid_fraction(np.zeros((16, 16), np.uint16)) == 0.0


class MergingModel(DiskModel):
    """Like DiskModel, but at 200 px or more per side it joins neighbours closer than 9 px
    (a horizontal closing of both channels), as a network shown objects smaller than it
    learned merges touching ones."""

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        out = super().__call__(batch)
        if batch.shape[2] >= 200:
            kernel = np.ones((1, 9), np.uint8)
            for plane in out.reshape(-1, *out.shape[2:]):
                joined = cv2.morphologyEx((plane > 0).astype(np.uint8), cv2.MORPH_CLOSE, kernel)
                plane[joined > 0] = 8.0
        return out


def merging_case() -> tuple[np.ndarray, int]:
    """An image of 8 pairs of 20 px disks 6 px apart, and its number of disks."""
    truth = pairs(256, 10, 6, 64)
    return (truth > 0).astype(np.uint8) * 255, int(truth.max())


def test_auto_alone_can_settle_on_a_size_that_merges_neighbours():
    image, count = merging_case()
    model = MergingModel()
    [prediction] = _segmenter(model, diameter="auto").predict([image])
    # Pass 1 (native) merges pairs, reads them as ~30 px and shrinks the image; pass 2 sees
    # single disks about 20 px across, so pass 3 goes back near native, where pairs merge again,
    # and so on until the passes run out (SIZE_PASSES = 5), on a size that merges them.
    assert model.shapes == [(256, 256), (172, 172), (232, 232), (156, 156), (233, 233)]
    assert prediction.instances.max() == count // 2


def test_diameter_choices_keep_the_size_whose_objects_are_convex():
    image, count = merging_case()
    model = MergingModel()
    [prediction] = _segmenter(model, diameter="auto", diameter_choices=[1.0, 1.5]).predict([image])
    # One more pass, as if objects were 1.5x the estimate: 233 px / 1.5, no merging.
    assert model.shapes[5:] == [(156, 156)]
    assert prediction.instances.max() == count
    assert prediction.instances.shape == image.shape


def test_diameter_choices_keep_the_estimate_on_ties_and_never_override_a_given_diameter():
    image = (disks(128, 10, 32) > 0).astype(np.uint8) * 255  # 20 px disks: the trained size
    model = DiskModel()
    segmenter = _segmenter(model, diameter="auto", diameter_choices=[0.8, 1.0, 1.25])
    scales = segmenter.scaled_logits([image])[1]
    assert model.shapes == [(128, 128), (160, 160), (102, 102)]  # the estimate, then x0.8, x1.25
    assert scales == [1.0]  # every run all convex: the estimate stays
    model.shapes.clear()
    segmenter.predict([image], diameters=[40.0])
    assert model.shapes == [(64, 64)]  # a diameter the user gives is used as given


def test_one_diameter_choice_segments_every_image_at_that_multiple_of_the_estimate():
    image = (disks(128, 10, 32) > 0).astype(np.uint8) * 255  # 20 px disks: the trained size
    model = DiskModel()
    [prediction] = _segmenter(model, diameter="auto", diameter_choices=[0.8]).predict([image])
    # The estimate (20 px, native scale), then one run as if objects were 16 px: enlarged 1.25x.
    assert model.shapes == [(128, 128), (160, 160)]
    assert prediction.instances.shape == image.shape
    assert prediction.instances.max() == disks(128, 10, 32).max()
    model.shapes.clear()
    _segmenter(model, diameter="auto", diameter_choices=[0.8]).predict([image], diameters=[20.0])
    assert model.shapes == [(128, 128)]  # a diameter the user gives is used as given


def test_tuning_tries_each_set_of_diameter_choices_on_val_and_keeps_the_best():
    image, _ = merging_case()
    truth = pairs(256, 10, 6, 64)
    val = [Sample("pairs", image, (truth > 0).astype(np.uint8), truth)]
    cfg = InferenceParams(
        diameter_choices_grid=[[1.0], [1.0, 1.5]],
        threshold_grid=[0.5],
        seed_threshold_grid=[0.5],
        min_area_grid=[0],
    )
    tuning = choose_postprocessing(_segmenter(MergingModel(), diameter="auto"), val, cfg)
    assert tuning.prep.diameter_choices == [1.0, 1.5]
    assert [row["diameter_choices"] for row in tuning.grid] == [[1.0], [1.0, 1.5]]
    assert [row["ap50"] for row in tuning.grid] == [0.0, 1.0]  # merged pairs match no disk at IoU 0.5
    assert set(tuning.seconds_per_image) == {"none", "none_2sizes"}
    # A model at native scale estimates no sizes: the choices are not tried.
    native = choose_postprocessing(_segmenter(MergingModel(), train_diameter=0.0), val, cfg)
    assert [row["diameter_choices"] for row in native.grid] == [[1.0]]


class RimModel(DiskModel):
    """Like DiskModel, but its foreground logit rises from -3 at an object's edge by 1 per
    pixel inward, so the threshold decides how large objects come out, and with it the size
    estimate: 20 px disks measure about 14 px at 0.5 and about 8 px at 0.95."""

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.shapes += [tuple(x.shape[1:]) for x in batch]
        out = np.full((len(batch), 2, *batch.shape[2:]), -8.0, np.float32)
        for i, x in enumerate(batch[:, 0] > 0):
            depth = cv2.distanceTransform(x.astype(np.uint8), cv2.DIST_L2, 5)
            out[i, :][:, x] = depth[x] - 3.0
        return out


def test_val_is_scored_as_served_where_sizes_follow_the_post_processing():
    truth = disks(128, 10, 32)
    val = [Sample("disks", (truth > 0).astype(np.uint8) * 255, (truth > 0).astype(np.uint8), truth)]
    # Tuning sizes val with params.inference's threshold (0.95) and chooses 0.5, the only one on its grid.
    cfg = InferenceParams(threshold=0.95, threshold_grid=[0.5], seed_threshold_grid=[0.5], min_area_grid=[0])
    model = RimModel()
    segmenter = _segmenter(model, diameter="auto", seed_threshold=0.5)
    tuning = choose_postprocessing(segmenter, val, cfg)
    assert tuning.prep.threshold == 0.5
    logits, scales = val_as_served(tuning, segmenter, val)
    served_logits, served_scales = segmenter.scaled_logits([s.image for s in val])  # as predict runs
    assert scales == served_scales and np.array_equal(logits[0], served_logits[0])
    # Objects read smaller at 0.95, so tuning enlarged val more than serving does.
    assert tuning.scales[0] > scales[0] > 1.0
    # A model at native scale sizes nothing: the tuning's logits are already what is served.
    native_model = RimModel()
    native = _segmenter(native_model, train_diameter=0.0)
    native_tuning = choose_postprocessing(native, val, cfg)
    calls = len(native_model.shapes)
    logits, scales = val_as_served(native_tuning, native, val)
    assert logits is native_tuning.logits and scales is native_tuning.scales
    assert len(native_model.shapes) == calls  # no model pass
    # Nor does a choice equal to params.inference's values: val was sized with them already.
    same = InferenceParams(threshold=0.5, threshold_grid=[0.5], seed_threshold_grid=[0.5], min_area_grid=[0])
    same_tuning = choose_postprocessing(segmenter, val, same)
    calls = len(model.shapes)
    logits, scales = val_as_served(same_tuning, segmenter, val)
    assert logits is same_tuning.logits and len(model.shapes) == calls
