"""Upload decoding: what is accepted, and the status and reason for what is not."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from segflow.serve.uploads import UploadError, UploadLimits, decode_upload, sniff_format


def encode(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    if fmt == "npy":
        np.save(buffer, array, allow_pickle=array.dtype == object)
    elif fmt == "tiff":
        import tifffile

        tifffile.imwrite(buffer, array)
    else:
        Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("array", "fmt"),
    [
        (np.arange(48 * 40, dtype=np.uint16).reshape(48, 40), "PNG"),
        (np.full((20, 30), 7, np.uint8), "PNG"),
        (np.full((20, 30, 3), 200, np.uint8), "PNG"),
        (np.full((16, 16), 1000, np.uint16), "tiff"),
        (np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8), "npy"),
        (np.zeros((8, 8, 3), np.uint8), "npy"),
    ],
)
def test_lossless_formats_round_trip(array, fmt):
    decoded = decode_upload(encode(array, fmt), UploadLimits())
    assert decoded.dtype == array.dtype and np.array_equal(decoded, array)


def test_jpeg_decodes_to_rgb_uint8():
    decoded = decode_upload(encode(np.full((10, 12, 3), 90, np.uint8), "JPEG"), UploadLimits())
    assert decoded.shape == (10, 12, 3) and decoded.dtype == np.uint8


@pytest.mark.parametrize(
    ("data", "status", "words"),
    [
        (b"", 400, "empty"),
        (b"hello world", 415, "not a PNG"),
        (encode(np.zeros((8, 8), np.uint8), "PNG")[:40], 400, "truncated"),
        (encode(np.array([{"a": 1}], dtype=object), "npy"), 422, "pickle"),
        (encode(np.array([[np.nan, 0.5]], np.float32), "npy"), 422, "NaN"),
        (encode(np.array([[2.0, 0.5]], np.float64), "npy"), 422, "[0, 1]"),
        (encode(np.zeros((8, 8), np.int64), "npy"), 422, "int64"),
        (encode(np.zeros((2, 8, 8), np.uint8), "npy"), 422, "shape"),
        (encode(np.zeros((8, 8), np.uint8), "npy")[:-10], 400, "corrupt"),
    ],
)
def test_refusals_carry_status_and_reason(data, status, words):
    with pytest.raises(UploadError) as caught:
        decode_upload(data, UploadLimits())
    assert caught.value.status == status
    assert words.lower() in caught.value.reason.lower()


def test_limits_apply_before_decoding():
    png = encode(np.zeros((100, 100), np.uint8), "PNG")
    with pytest.raises(UploadError) as too_big:
        decode_upload(png, UploadLimits(max_bytes=len(png) - 1))
    assert too_big.value.status == 413
    with pytest.raises(UploadError) as too_many_pixels:
        decode_upload(png, UploadLimits(max_pixels=99 * 100))
    assert too_many_pixels.value.status == 413 and "max_pixels" in too_many_pixels.value.reason
    npy = encode(np.zeros((100, 100), np.uint8), "npy")
    with pytest.raises(UploadError, match="pixels"):
        decode_upload(npy, UploadLimits(max_pixels=5000))
    with pytest.raises(UploadError) as not_allowed:
        decode_upload(npy, UploadLimits(formats=("png",)))
    assert not_allowed.value.status == 415


def test_format_comes_from_the_bytes_not_the_name():
    assert sniff_format(encode(np.zeros((4, 4), np.uint8), "PNG")) == "png"
    assert sniff_format(encode(np.zeros((4, 4), np.uint8), "npy")) == "npy"
    assert sniff_format(b"GIF89a") is None


def textured(shape: tuple[int, ...]) -> np.ndarray:
    """A uint8 image with structure everywhere, so its compressed data has no padding."""
    rng = np.random.default_rng(0)
    return np.clip(rng.normal(128, 40, shape), 0, 255).astype(np.uint8)


def scrambled(data: bytes, count: int = 200) -> bytes:
    """`data` with `count` random bytes in its middle (the corrupt-JPEG reproducer)."""
    damaged, middle = bytearray(data), len(data) // 2
    damaged[middle : middle + count] = np.random.default_rng(1).integers(0, 256, count, np.uint8).tobytes()
    return bytes(damaged)


def bit_flipped() -> bytes:
    """A PNG with one bit of its compressed data flipped (chunk CRC left as it was) that Pillow
    decodes without complaint, to other pixels: found by trying the flips near the data's end,
    where zlib has already produced every row and Pillow stops reading."""
    yy, xx = np.mgrid[:128, :128]
    image = ((np.sin(xx / 7) + np.cos(yy / 9)) * 60 + 128).astype(np.uint8)
    png = encode(image, "PNG")
    end = png.index(b"IEND") - 8  # the last IDAT chunk's CRC
    for offset in range(end - 400, end):
        damaged = bytearray(png)
        damaged[offset] ^= 0x04
        try:
            with Image.open(io.BytesIO(bytes(damaged))) as img:
                if not np.array_equal(np.asarray(img), image):
                    return bytes(damaged)
        except OSError:
            continue
    raise AssertionError("no single-bit flip that Pillow accepts; the test's premise no longer holds")


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (scrambled(encode(textured((256, 256)), "JPEG")), "corrupt jpeg data"),
        (scrambled(encode(textured((256, 256, 3)), "JPEG")), "corrupt jpeg data"),
        (bit_flipped(), "crc"),
    ],
    ids=["jpeg-grey-scrambled", "jpeg-rgb-scrambled", "png-bit-flip"],
)
def test_damaged_compressed_data_is_refused_not_segmented(data, words):
    # Pillow alone decodes these (the damage stays inside the compressed data), so the service
    # would segment a damaged image; the strict decoders refuse them.
    with Image.open(io.BytesIO(data)) as img:
        img.load()
    with pytest.raises(UploadError) as caught:
        decode_upload(data, UploadLimits())
    assert caught.value.status == 400 and words in caught.value.reason.lower()


@pytest.mark.parametrize("shape", [(40, 56), (40, 56, 3)])
def test_jpeg_pixels_are_pillows(shape):
    data = encode(textured(shape), "JPEG")
    with Image.open(io.BytesIO(data)) as img:
        expected = np.asarray(img)
    decoded = decode_upload(data, UploadLimits())
    assert decoded.dtype == np.uint8 and np.array_equal(decoded, expected)


def test_files_on_disk_are_decoded_as_strictly(tmp_path):
    from segflow.core.images import ImageReadError, read_image

    path = tmp_path / "cells.jpg"
    path.write_bytes(scrambled(encode(textured((256, 256)), "JPEG")))
    with pytest.raises(ImageReadError, match=r"cells\.jpg: cannot read image: Corrupt JPEG data"):
        read_image(path)
    png = tmp_path / "mask.png"
    png.write_bytes(bit_flipped())
    with pytest.raises(ImageReadError, match=r"mask\.png: .*CRC"):
        read_image(png)
