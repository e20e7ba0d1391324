"""segflow.core.inference (and segflow.release.export's ONNX round trip) with a tiny real model.

The torch model is a real smp Unet with random weights (encoder_weights None: nothing
downloads). Where exact values matter, the backend is a plain numpy function instead, so
the expected masks can be computed by hand.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from segflow.core.inference import Segmenter
from segflow.core.objects import label_instances
from segflow.core.postprocessing import sigmoid
from segflow.core.preprocessing import PREPROCESSING_VERSION, Preprocessing, normalize
from segflow.core.tiling import pad_to_multiple
from segflow.release.export import ParityError, check_parity, export_onnx
from segflow.train.checkpoints import torch_segmenter
from segflow.train.models import build_model

TINY_SPEC = {
    "architecture": "Unet",
    "encoder": "resnet18",
    "in_channels": 1,
    "classes": 1,
    "decoder_channels": [16, 16, 16, 16, 16],
}
PREP = Preprocessing(in_channels=1, mean=0.5, std=0.25, pad_multiple=32, threshold=0.5)
SIZES = [(50, 70), (64, 64), (256, 256)]


def random_image(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def first_channel(batch: np.ndarray) -> np.ndarray:
    """A model whose foreground logit is its (normalized) input: bright means foreground."""
    return batch[:, :1].copy()


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(TINY_SPEC).eval()


@pytest.fixture(scope="module")
def segmenter(model) -> Segmenter:
    return torch_segmenter(model, PREP)


@pytest.fixture(scope="module")
def onnx_path(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "m.onnx"
    export_onnx(model, PREP, path, opset=18, ir_version=10)
    return path


# --- sizes, dtypes and batching with the torch model -------------------------------------------


def test_logits_come_back_at_each_images_own_size(segmenter):
    images = [random_image(size, seed=i) for i, size in enumerate(SIZES)]

    logits = segmenter.logits(images)

    assert [logit.shape for logit in logits] == [(1, h, w) for h, w in SIZES]
    assert all(logit.dtype == np.float32 for logit in logits)
    assert all(np.isfinite(logit).all() for logit in logits)


def test_predictions_are_binary_masks_at_each_images_own_size(segmenter):
    images = [random_image(size, seed=i) for i, size in enumerate(SIZES)]

    predictions = segmenter.predict(images)

    for (h, w), prediction in zip(SIZES, predictions, strict=True):
        assert prediction.mask.shape == (h, w)
        assert prediction.mask.dtype == np.uint8
        assert set(np.unique(prediction.mask)) <= {0, 1}
        assert prediction.probability.shape == (h, w)
        assert ((prediction.probability >= 0) & (prediction.probability <= 1)).all()
        np.testing.assert_allclose(prediction.probability, sigmoid(prediction.logits), atol=1e-6)
        np.testing.assert_array_equal(prediction.mask, prediction.probability > PREP.threshold)


def test_batched_images_give_the_same_logits_as_one_at_a_time(segmenter):
    images = [random_image((64, 64), seed=i) for i in range(3)]

    batched = segmenter.logits(images)
    single = [segmenter.logits([image])[0] for image in images]

    for a, b in zip(batched, single, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_mixed_sizes_give_the_same_logits_as_one_at_a_time(segmenter):
    images = [random_image((50, 70), 1), random_image((64, 64), 2), random_image((50, 70), 3)]

    mixed = segmenter.logits(images)

    for image, logit in zip(images, mixed, strict=True):
        np.testing.assert_allclose(logit, segmenter.logits([image])[0], atol=1e-5, rtol=1e-5)


def test_predict_one_equals_predict_of_a_list(segmenter):
    image = random_image((40, 40))

    np.testing.assert_array_equal(segmenter.predict_one(image).logits, segmenter.predict([image])[0].logits)


def test_uint16_input_matches_the_same_image_as_uint8(segmenter):
    image8 = random_image((64, 64))
    image16 = image8.astype(np.uint16) * 257  # same intensities on the 16-bit scale

    np.testing.assert_allclose(
        segmenter.logits([image16])[0], segmenter.logits([image8])[0], atol=1e-5, rtol=1e-5
    )


def test_float_input_in_unit_range_matches_uint8(segmenter):
    image8 = random_image((64, 64))

    np.testing.assert_allclose(
        segmenter.logits([image8 / 255.0])[0], segmenter.logits([image8])[0], atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("channels", [3, 4])
def test_rgb_and_rgba_gray_images_match_the_gray_image(segmenter, channels):
    gray = random_image((64, 64))
    color = np.repeat(gray[..., None], channels, axis=2)
    if channels == 4:
        color[..., 3] = 17  # alpha is ignored

    np.testing.assert_allclose(
        segmenter.logits([color])[0], segmenter.logits([gray])[0], atol=1e-5, rtol=1e-5
    )


def test_from_torch_runs_in_eval_mode_and_restores_training_mode(model, segmenter):
    image = random_image((64, 64))
    expected = segmenter.logits([image])[0]
    model.train()
    try:
        got = segmenter.logits([image])[0]
        assert model.training
    finally:
        model.eval()

    np.testing.assert_allclose(got, expected, atol=1e-6)


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_float_input_raises(bad):
    image = np.full((32, 32), 0.5, np.float32)
    image[3, 4] = bad
    seg = Segmenter(first_channel, PREP)

    with pytest.raises(ValueError, match="NaN or infinite"):
        seg.logits([image])


def test_unsupported_dtype_raises():
    with pytest.raises(ValueError, match="dtype"):
        Segmenter(first_channel, PREP).logits([np.zeros((32, 32), np.int32)])


def test_two_channel_image_raises():
    with pytest.raises(ValueError, match="channels"):
        Segmenter(first_channel, PREP).logits([np.zeros((32, 32, 2), np.uint8)])


# --- exact behaviour with a numpy backend ------------------------------------------------------


def gradient_image() -> np.ndarray:
    return np.arange(256, dtype=np.uint8).reshape(16, 16)  # (H, W) uint8, every value once


def test_logits_are_the_normalized_input_cropped_back_from_the_padding():
    image = random_image((50, 70))

    logit = Segmenter(first_channel, PREP).logits([image])[0]

    np.testing.assert_allclose(logit[0], (image / 255.0 - PREP.mean) / PREP.std, atol=1e-6)


def test_threshold_half_makes_bright_pixels_foreground():
    image = gradient_image()

    mask = Segmenter(first_channel, PREP).predict_one(image).mask

    # logit = (x / 255 - 0.5) / 0.25 > 0  <=>  x >= 128
    np.testing.assert_array_equal(mask, (image >= 128).astype(np.uint8))


def test_threshold_argument_overrides_the_preprocessing_threshold():
    image = gradient_image()

    mask = Segmenter(first_channel, PREP).predict([image], threshold=0.8)[0].mask

    # sigmoid(logit) > 0.8  <=>  logit > ln 4  <=>  x / 255 > 0.5 + 0.25 ln 4  <=>  x >= 216
    np.testing.assert_array_equal(mask, (image >= 216).astype(np.uint8))


def test_preprocessing_threshold_is_the_default():
    prep = Preprocessing(in_channels=1, mean=0.5, std=0.25, pad_multiple=32, threshold=0.8)

    mask = Segmenter(first_channel, prep).predict_one(gradient_image()).mask

    np.testing.assert_array_equal(mask, (gradient_image() >= 216).astype(np.uint8))


def test_rgb_is_converted_to_gray_with_luminance_weights():
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 255

    logit = Segmenter(first_channel, PREP).logits([red])[0]

    np.testing.assert_allclose(logit, (0.299 - 0.5) / 0.25, atol=1e-5)


def test_gray_is_repeated_for_three_channel_models():
    prep = Preprocessing(in_channels=3, mean=0.5, std=0.25, pad_multiple=32, threshold=0.5)
    seen = []

    def record(batch: np.ndarray) -> np.ndarray:
        seen.append(batch)
        return batch[:, :1]

    Segmenter(record, prep).logits([random_image((20, 20))])

    assert seen[0].shape == (1, 3, 32, 32)
    np.testing.assert_array_equal(seen[0][:, 0], seen[0][:, 2])


def test_model_sees_padded_batches_no_larger_than_batch_size():
    shapes = []

    def record(batch: np.ndarray) -> np.ndarray:
        shapes.append(batch.shape)
        assert batch.dtype == np.float32
        return batch[:, :1]

    images = [random_image((40, 40), seed=i) for i in range(5)] + [random_image((70, 20))]
    logits = Segmenter(record, PREP, batch_size=2).logits(images)

    assert sorted(shapes) == sorted([(2, 1, 64, 64), (2, 1, 64, 64), (1, 1, 64, 64), (1, 1, 96, 32)])
    for image, logit in zip(images, logits, strict=True):  # results return in input order
        np.testing.assert_allclose(logit[0], (image / 255.0 - 0.5) / 0.25, atol=1e-6)


# --- preprocessing helpers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ((1, 50, 70), (1, 64, 96)),
        ((3, 64, 64), (3, 64, 64)),
        ((1, 10, 33), (1, 32, 64)),  # padding larger than the image
        ((1, 1, 1), (1, 32, 32)),
    ],
)
def test_pad_to_multiple_shapes(shape, expected):
    chw = np.random.default_rng(0).random(shape, dtype=np.float32)

    padded = pad_to_multiple(chw, 32)

    assert padded.shape == expected
    np.testing.assert_array_equal(padded[:, : shape[1], : shape[2]], chw)  # original stays top-left


def test_normalize_gives_float32_chw():
    x = normalize(random_image((10, 12)), PREP)

    assert x.shape == (1, 10, 12)
    assert x.dtype == np.float32


def test_preprocessing_save_load_roundtrip(tmp_path):
    prep = Preprocessing(
        in_channels=3, mean=0.4, std=0.2, pad_multiple=16, threshold=0.3, classes=["bg", "nucleus"]
    )

    prep.save(tmp_path / "preprocessing.json")

    assert Preprocessing.load(tmp_path / "preprocessing.json") == prep


@pytest.mark.parametrize("version", [PREPROCESSING_VERSION + 1, None])
def test_unsupported_preprocessing_version_is_rejected(version):
    data = PREP.to_dict()
    data["version"] = version

    with pytest.raises(ValueError, match="version"):
        Preprocessing.from_dict(data)


# --- ONNX export and parity --------------------------------------------------------------------


def test_export_writes_a_checked_model_with_the_requested_ir_version(onnx_path):
    proto = onnx.load(str(onnx_path))

    assert proto.ir_version == 10
    assert [i.name for i in proto.graph.input] == [PREP.input_name]
    assert [o.name for o in proto.graph.output] == [PREP.output_name]
    assert not list(onnx_path.parent.glob("*.tmp.onnx"))


def test_onnx_matches_torch_within_tolerance(segmenter, onnx_path):
    images = [random_image((64, 96), 1), random_image((100, 50), 2)]

    report = check_parity(segmenter, Segmenter.from_onnx(onnx_path, PREP), images, atol=1e-4)

    assert report["passed"] is True
    assert report["images"] == 2
    assert 0 <= report["mean_abs_diff"] <= report["max_abs_diff"] <= 1e-4


def test_from_onnx_reads_preprocessing_json(onnx_path, tmp_path):
    PREP.save(tmp_path / "preprocessing.json")

    seg = Segmenter.from_onnx(onnx_path, tmp_path / "preprocessing.json")

    assert seg.prep == PREP
    assert seg.predict_one(random_image((50, 70))).mask.shape == (50, 70)


def test_parity_fails_when_logits_differ(model, onnx_path):
    class Shifted(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x) + 1.0

    shifted = torch_segmenter(Shifted(model), PREP)
    images = [random_image((64, 96), 1), random_image((100, 50), 2)]

    with pytest.raises(ParityError, match="parity_atol"):
        check_parity(shifted, Segmenter.from_onnx(onnx_path, PREP), images, atol=1e-12)


def test_parity_needs_at_least_one_image():
    seg = Segmenter(first_channel, PREP)

    with pytest.raises(ValueError, match="at least one image"):
        check_parity(seg, seg, [], atol=1e-4)


def test_parity_fails_when_one_backend_returns_nan():
    def nan_on_large_inputs(batch: np.ndarray) -> np.ndarray:
        out = first_channel(batch)
        if batch.shape[2] > 32:
            out[:] = np.nan
        return out

    reference = Segmenter(first_channel, PREP)
    broken = Segmenter(nan_on_large_inputs, PREP)
    images = [random_image((32, 32), 1), random_image((64, 64), 2)]

    with pytest.raises(ParityError):
        check_parity(reference, broken, images, atol=1e-4)


@pytest.mark.parametrize("scaling", ["range", "percentile"])
def test_training_items_from_16_bit_images_match_their_8_bit_twins(scaling):
    from segflow.config import parse_params
    from segflow.data.samples import Sample
    from segflow.train.dataset import AugmentedDataset, build_augmentations
    from segflow.train.loop import preprocessing_from

    params = parse_params(
        {
            "base": {"intensity": {"scaling": scaling}},
            "train": {
                "crop_size": None,
                "augment": {
                    "hflip": 0,
                    "vflip": 0,
                    "rotate90": 0,
                    "brightness_contrast": 0,
                    "gauss_noise": 0,
                },
            },
        }
    )
    rng = np.random.default_rng(0)
    image8 = rng.integers(0, 256, (64, 64), dtype=np.uint8)
    image16 = image8.astype(np.uint16) * 257  # the same intensities on the 16-bit scale
    mask = (image8 > 128).astype(np.uint8)
    prep = preprocessing_from(params)
    instances = label_instances(mask)
    items = [
        AugmentedDataset([Sample("a", img, mask, instances)], build_augmentations(params), prep, 2)[0]
        for img in (image8, image16)
    ]
    np.testing.assert_allclose(items[0][0], items[1][0], atol=1e-5)
    assert set(items[0][1]) == {"semantic", "interior"}  # instance ids teach the watershed's interiors
    for key in items[0][1]:
        np.testing.assert_array_equal(items[0][1][key], items[1][1][key])
