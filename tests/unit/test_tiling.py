"""segflow.core.tiling: sliding-window inference agrees with whole-image inference.

A pixel-wise model must give the same logits bit for bit, tiled or whole; a small
convolutional model must agree wherever no tile's own edge is within its receptive field.
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
import torch

from segflow.core.tiling import tile_starts, tiled_logits

MULTIPLE = 32


def images(sizes: list[tuple[int, int]], channels: int = 1, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(channels, h, w)).astype(np.float32) for h, w in sizes]  # (C, H, W)


def pixelwise(batch: np.ndarray) -> np.ndarray:
    """(N, 2, h, w) -> (N, 2, h, w): each output pixel depends only on the same input pixel."""
    return np.concatenate([batch[:, :1] * 2, batch[:, 1:2] - batch[:, :1] ** 2], axis=1)


@pytest.mark.parametrize(
    ("length", "tile", "overlap"),
    [
        (100, 100, 10),
        (50, 128, 16),
        (129, 128, 0),
        (129, 128, 16),
        (700, 256, 32),
        (1024, 512, 64),
        (1000, 96, 47),
    ],
)
def test_tile_starts_cover_with_overlap(length: int, tile: int, overlap: int):
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0
    assert starts[-1] == max(0, length - tile)
    assert starts == sorted(set(starts))
    assert all(b - a <= tile - overlap for a, b in pairwise(starts))  # overlap kept
    covered = np.zeros(length, bool)
    for s in starts:
        covered[s : s + tile] = True
    assert covered.all()


@pytest.mark.parametrize("tile_size", [64, 128, 256])
def test_pixelwise_model_matches_whole_image_exactly(tile_size: int):
    inputs = images([(700, 513), (1022, 1024), (33, 900), (5, 5), (64, 300)], channels=2)
    expected = [pixelwise(x[None])[0] for x in inputs]  # (2, H, W) each
    whole = tiled_logits(pixelwise, inputs, tile_size=0, overlap=0, multiple=MULTIPLE, batch_size=3)
    tiled = tiled_logits(
        pixelwise, inputs, tile_size, overlap=tile_size // 4, multiple=MULTIPLE, batch_size=3
    )
    for x, want, got_whole, got_tiled in zip(inputs, expected, whole, tiled, strict=True):
        assert got_tiled.shape == got_whole.shape == want.shape == (2, *x.shape[1:])
        assert got_tiled.dtype == got_whole.dtype == np.float32
        np.testing.assert_array_equal(got_whole, want)
        np.testing.assert_array_equal(got_tiled, want)


def test_conv_model_matches_away_from_seams():
    torch.manual_seed(0)
    net = torch.nn.Sequential(  # two 3x3 convolutions: each output sees 2 pixels either way
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 2, 3, padding=1)
    ).eval()
    reach = 2

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return net(torch.from_numpy(batch)).numpy()

    tile, overlap = 128, 16
    inputs = images([(300, 413), (97, 250)])
    whole = tiled_logits(run, inputs, tile_size=0, overlap=0, multiple=MULTIPLE, batch_size=4)
    tiled = tiled_logits(run, inputs, tile, overlap, multiple=MULTIPLE, batch_size=4)
    for x, want, got in zip(inputs, whole, tiled, strict=True):
        _, h, w = x.shape
        # Clean pixels: no covering tile has an inner edge within `reach`, and not within
        # `reach` of the bottom/right border (whole images see reflect padding there, tiles
        # ending at the border see the convolution's zero padding).
        clean = np.ones((h, w), bool)
        clean[h - reach :] = clean[:, w - reach :] = False
        th, tw = min(h, tile), min(w, tile)
        for top in tile_starts(h, th, overlap):
            for left in tile_starts(w, tw, overlap):
                if top > 0:
                    clean[top : top + reach, left : left + tw] = False
                if top + th < h:
                    clean[top + th - reach : top + th, left : left + tw] = False
                if left > 0:
                    clean[top : top + th, left : left + reach] = False
                if left + tw < w:
                    clean[top : top + th, left + tw - reach : left + tw] = False
        assert clean.mean() > 0.9
        np.testing.assert_allclose(got[:, clean], want[:, clean], atol=1e-5)
        # Stated tolerances (observed: about 0.04 and 0.005 of the largest logit). Near seams
        # the blend leans on the tile whose view is complete; the border differs by padding.
        scale = np.abs(want).max()
        assert np.abs(got - want)[:, : h - reach, : w - reach].max() < 0.1 * scale
        assert np.abs(got - want).mean() < 0.02 * scale


def test_calls_are_bounded_and_multiples():
    calls: list[tuple[int, ...]] = []

    def recording(batch: np.ndarray) -> np.ndarray:
        assert batch.dtype == np.float32
        calls.append(batch.shape)
        return batch[:, :1] * 2

    inputs = images([(700, 513), (1022, 1024), (33, 900), (5, 5), (40, 40), (2000, 70)])
    tiled_logits(recording, inputs, tile_size=128, overlap=16, multiple=MULTIPLE, batch_size=5)
    assert calls
    for n, _, h, w in calls:
        assert 1 <= n <= 5
        assert h % MULTIPLE == 0 and w % MULTIPLE == 0
        assert h <= 128 and w <= 128  # memory per call does not grow with the image


def test_whole_images_of_one_shape_share_calls():
    calls: list[int] = []

    def recording(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        return batch[:, :1]

    inputs = images([(50, 70)] * 5 + [(64, 64)])  # five pad to (64, 96); one is (64, 64)
    out = tiled_logits(recording, inputs, tile_size=512, overlap=64, multiple=MULTIPLE, batch_size=4)
    assert sorted(calls) == [1, 1, 4]
    assert [o.shape for o in out] == [(1, 50, 70)] * 5 + [(1, 64, 64)]


@pytest.mark.parametrize(
    ("tile_size", "overlap", "message"),
    [
        (100, 10, "multiple of 32"),
        (-32, 0, "multiple of 32"),
        (128, 64, "less than half"),
        (128, -1, "tile_overlap"),
    ],
)
def test_bad_tiling_says_what_to_change(tile_size: int, overlap: int, message: str):
    with pytest.raises(ValueError, match=message):
        tiled_logits(pixelwise, images([(10, 10)], 2), tile_size, overlap, MULTIPLE, batch_size=1)


def test_segmenter_runs_large_images_as_tiles_of_its_preprocessing():
    from segflow.core.inference import Segmenter
    from segflow.core.preprocessing import Preprocessing

    shapes = []

    def model(batch: np.ndarray) -> np.ndarray:
        shapes.append(batch.shape)
        return batch[:, :1] * 3.0

    prep = Preprocessing(1, 0.5, 0.25, 32, 0.5, tile_size=64, tile_overlap=8)
    image = np.random.default_rng(1).integers(0, 256, (100, 150), dtype=np.uint8)
    [logit] = Segmenter(model, prep, batch_size=4).logits([image])
    assert logit.shape == (1, 100, 150)
    assert {s[2:] for s in shapes} == {(64, 64)} and sum(s[0] for s in shapes) > 1
    whole = Segmenter(model, Preprocessing(1, 0.5, 0.25, 32, 0.5), batch_size=4).logits([image])[0]
    np.testing.assert_allclose(logit, whole, atol=1e-5)  # a pixel-wise model: tiling changes nothing
