"""Untrusted image uploads -> arrays, or a 4xx reason.

The service decodes whatever a client sends. Every check here runs before the expensive
or dangerous step it guards: the pixel count is read from the file header before any
pixel is decoded (decompression bombs), a NumPy header is read before its data, and
NumPy object arrays (pickles, which run code when loaded) are refused outright.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np

from segflow.errors import UserError

# First bytes of each accepted format.
_MAGIC = {
    b"\x89PNG\r\n\x1a\n": "png",
    b"\xff\xd8\xff": "jpeg",
    b"II*\x00": "tiff",
    b"MM\x00*": "tiff",
    b"II+\x00": "tiff",  # BigTIFF
    b"MM\x00+": "tiff",
    b"\x93NUMPY": "npy",
}


class UploadError(UserError):
    """An upload the service refuses; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, reason: str):
        self.status = status
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True)
class UploadLimits:
    """What the service accepts (from params.yaml `serve`)."""

    max_bytes: int = 32 * 2**20
    max_pixels: int = 2048 * 2048
    formats: tuple[str, ...] = ("png", "jpeg", "tiff", "npy")
    dtypes: tuple[str, ...] = ("uint8", "uint16", "float32", "float64")
    body_timeout_s: float = 30.0  # the whole body must arrive within this (the gatekeeper's 408)

    @classmethod
    def from_params(cls, serve) -> UploadLimits:
        return cls(
            serve.max_upload_bytes,
            serve.max_pixels,
            tuple(serve.formats),
            tuple(serve.dtypes),
            serve.body_timeout_s,
        )


def sniff_format(data: bytes) -> str | None:
    """The format named by the file's first bytes (never by its name or content type)."""
    for magic, name in _MAGIC.items():
        if data.startswith(magic):
            return name
    return None


def decode_upload(data: bytes, limits: UploadLimits) -> np.ndarray:
    """Decode one uploaded file.

    Returns:
        (H, W) or (H, W, C) array with C in {1, 3, 4}, of an allowed dtype, finite.

    Raises:
        UploadError: 400 empty/corrupt, 413 too many bytes or pixels, 415 unsupported
            format, 422 decodable but unusable (dtype, shape, NaN, object array).
    """
    if not data:
        raise UploadError(400, "the file is empty: send the image's bytes")
    if len(data) > limits.max_bytes:
        raise UploadError(
            413, f"the file has {len(data)} bytes; this service accepts at most {limits.max_bytes}"
        )
    fmt = sniff_format(data[:8])
    if fmt is None:
        raise UploadError(
            415,
            f"not a PNG, JPEG, TIFF or NumPy .npy file (it starts with {data[:8]!r}); "
            "send one of those formats",
        )
    if fmt not in limits.formats:
        raise UploadError(415, f"{fmt} files are not accepted here; accepted: {', '.join(limits.formats)}")
    array = {"png": _decode_pil, "jpeg": _decode_pil, "tiff": _decode_tiff, "npy": _decode_npy}[fmt](
        data, limits
    )
    check_array(array, limits)
    return array


def check_array(array: np.ndarray, limits: UploadLimits) -> None:
    """Shape, size, dtype and value checks shared by every format (raises UploadError)."""
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise UploadError(
            422, f"array shape {array.shape} is not an image; expected (H, W) or (H, W, C) with C = 1, 3 or 4"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise UploadError(400, f"the image is empty (shape {array.shape})")
    _check_pixels(array.shape[0], array.shape[1], limits)
    if array.dtype.name not in limits.dtypes:
        raise UploadError(
            422, f"pixel type {array.dtype.name} is not accepted; accepted: {', '.join(limits.dtypes)}"
        )
    if np.issubdtype(array.dtype, np.floating):
        finite = np.isfinite(array)
        if not finite.all():
            bad = int(array.size - np.count_nonzero(finite))
            raise UploadError(422, f"the array holds {bad} NaN or infinite values; send finite values")
        low, high = float(array.min()), float(array.max())
        if low < 0.0 or high > 1.0:
            raise UploadError(
                422, f"float images must be scaled to [0, 1]; this one spans [{low:.4g}, {high:.4g}]"
            )


def _check_pixels(height: int, width: int, limits: UploadLimits) -> None:
    if height * width > limits.max_pixels:
        raise UploadError(
            413,
            f"the image is {width}x{height} = {height * width} pixels; this service accepts at most "
            f"{limits.max_pixels} (serve.max_pixels)",
        )


def _decode_pil(data: bytes, limits: UploadLimits) -> np.ndarray:
    from PIL import Image

    from segflow.core.images import decode_image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                _check_pixels(img.height, img.width, limits)  # from the header, nothing decoded yet
            return decode_image(data)  # strictly: a damaged file is refused, not segmented
    except UploadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UploadError(
            413, f"the image header declares more than {limits.max_pixels} pixels (serve.max_pixels): {exc}"
        ) from None
    except Exception as exc:
        raise UploadError(400, f"the image is truncated or corrupt: {exc or type(exc).__name__}") from None


def _decode_tiff(data: bytes, limits: UploadLimits) -> np.ndarray:
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            series = tif.series[0]
            shape = series.shape
            if len(tif.series) > 1 or len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] > 4):
                raise UploadError(
                    422, f"TIFF holds {len(tif.series)} series of shape {shape}; send one 2-D image"
                )
            _check_pixels(shape[0], shape[1], limits)
            return series.asarray()
    except UploadError:
        raise
    except Exception as exc:
        raise UploadError(400, f"the TIFF is truncated or corrupt: {exc or type(exc).__name__}") from None


def _decode_npy(data: bytes, limits: UploadLimits) -> np.ndarray:
    fmt = np.lib.format
    buffer = io.BytesIO(data)
    try:
        version = fmt.read_magic(buffer)
        read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, _, dtype = read_header(buffer)
    except Exception as exc:
        raise UploadError(400, f"the .npy header is corrupt: {exc}") from None
    if dtype.hasobject:
        raise UploadError(
            422,
            "the .npy file holds Python objects (a pickle, which could run code when loaded) and is "
            "refused; save a numeric array, e.g. np.save(path, image.astype(np.uint16))",
        )
    if len(shape) >= 2:
        _check_pixels(shape[0], shape[1], limits)
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:
        raise UploadError(400, f"the .npy file is truncated or corrupt: {exc}") from None
