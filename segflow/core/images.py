"""Reading and writing image files, with errors that name the file."""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from segflow.errors import UserError

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".npy")

# First byte of a pickle (protocol 2+): a file `np.load` could only open by unpickling it.
_PICKLE_MAGIC = b"\x80"
_SAVE_NUMERIC = "save a numeric array instead, e.g. np.save(path, image.astype(np.uint16))"
PICKLED_NPY = (
    "it holds Python objects (a pickled array; unpickling could run code) and will not be loaded; "
    + _SAVE_NUMERIC
)

# Pillow refuses images above this many pixels (decompression-bomb guard); raise it to a
# size real microscopy reaches, still far below what exhausts memory.
Image.MAX_IMAGE_PIXELS = 20_000 * 20_000


class ImageReadError(UserError):
    """A file could not be decoded as an image."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: cannot read image: {reason}")


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file completely (PNG, JPEG, TIFF or a NumPy .npy array).

    Returns:
        (H, W) or (H, W, C) array, uint8 or uint16 (int32 for 32-bit images, float for
        float TIFFs; a .npy array in whatever numeric dtype it was saved).

    Raises:
        ImageReadError: the file is missing, truncated, pickled or not an image.
    """
    path = Path(path)
    try:
        if path.suffix.lower() == ".npy":
            array = read_npy(path)
        elif path.suffix.lower() in {".tif", ".tiff"}:
            import tifffile

            array = tifffile.imread(path)
        else:
            array = decode_image(path.read_bytes())
    except ImageReadError:
        raise
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageReadError(path, str(exc) or type(exc).__name__) from exc
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]  # (H, W, 1) -> (H, W): one channel is a grey image
    if array.ndim not in (2, 3) or array.size == 0 or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ImageReadError(
            path,
            f"unsupported shape {array.shape}; expected (H, W) or (H, W, C) with C = 1, 3 or 4 "
            "(for a stack of images, save one file per image)",
        )
    return array


def read_npy(path: str | Path) -> np.ndarray:
    """Load a .npy file without ever unpickling: object arrays are refused from the header.

    Raises:
        ImageReadError: the file is pickled, holds Python objects, or is not a .npy file.
    """
    path = Path(path)
    with path.open("rb") as file:
        dtype = npy_dtype(file, path)
    if dtype.hasobject:
        raise ImageReadError(path, PICKLED_NPY)
    return np.load(path, allow_pickle=False)


def npy_dtype(file, path: str | Path) -> np.dtype:
    """The dtype in a .npy header, read before any data (the file is left after the header).

    Raises:
        ImageReadError: not a .npy file (a raw pickle is named as such) or a corrupt header.
    """
    fmt = np.lib.format
    start = file.read(len(fmt.MAGIC_PREFIX))
    file.seek(0)
    if start.startswith(_PICKLE_MAGIC):
        raise ImageReadError(
            path,
            "it is pickled data, not a .npy array, and will not be loaded (unpickling could "
            "run code); " + _SAVE_NUMERIC,
        )
    try:
        version = fmt.read_magic(file)
        read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        _, _, dtype = read_header(file)
    except ValueError as exc:
        raise ImageReadError(path, f"not a NumPy .npy file or its header is corrupt: {exc}") from None
    return dtype


def read_rgb(path: str | Path) -> np.ndarray:
    """Decode a colour image (colour masks): palette, grey and RGBA PNGs become RGB.

    Returns:
        (H, W, 3) uint8.

    Raises:
        ImageReadError: unreadable, or more than 8 bits per channel (not a colour mask).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
        check_png(data)
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.mode.startswith(("I", "F")):
                raise ImageReadError(
                    path, f"it is a {img.mode} (16/32-bit) image, not an 8-bit RGB colour mask"
                )
            array = np.asarray(img.convert("RGB"))  # (H, W, 3) uint8
    except ImageReadError:
        raise
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageReadError(path, str(exc) or type(exc).__name__) from exc
    return array


def decode_image(data: bytes) -> np.ndarray:
    """PNG, JPEG or another Pillow format -> array (pil_to_array), decoded strictly: damage
    anywhere in the file raises ValueError (check_png, decode_jpeg) or OSError (Pillow), never
    an image decoded from corrupt data. The caller checks the header's size first if it must."""
    with Image.open(io.BytesIO(data)) as img:
        if img.format == "JPEG":
            return decode_jpeg(data)
        if img.format == "PNG":
            check_png(data)
        img.load()  # decode fully now, so truncated files fail here
        return pil_to_array(img)


def decode_jpeg(data: bytes) -> np.ndarray:
    """JPEG bytes -> (H, W) or (H, W, 3) uint8, refusing damaged files.

    libjpeg reports damaged entropy-coded data ("Corrupt JPEG data: premature end of data
    segment") as a warning and fills in what it could not read; Pillow and OpenCV ignore the
    warning and hand back a damaged image. simplejpeg's strict mode (the same libjpeg-turbo)
    raises it instead. Its pixels are Pillow's: same decoder, same settings.

    Raises:
        ValueError: the file is truncated or corrupt (libjpeg's reason).
    """
    import simplejpeg

    colorspace = simplejpeg.decode_jpeg_header(data, strict=True)[2]
    if colorspace == "Gray":
        return np.ascontiguousarray(simplejpeg.decode_jpeg(data, colorspace="GRAY", strict=True)[..., 0])
    if colorspace in ("CMYK", "YCCK"):  # rare print-world files: checked here, converted by Pillow
        simplejpeg.decode_jpeg(data, colorspace="CMYK", strict=True)
        with Image.open(io.BytesIO(data)) as img:
            return pil_to_array(img)
    return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)


def check_png(data: bytes) -> None:
    """Verify every chunk's CRC, up to IEND. Pillow skips the image data's CRCs and stops
    reading once the pixels are filled, so a damaged byte in the compressed data can decode,
    wrongly and silently; the CRCs catch it, at a cost far below decoding.

    Raises:
        ValueError: a chunk fails its CRC, or the file ends before IEND (truncated).
    """
    offset = 8  # after the signature
    while offset + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[offset : offset + 8])
        end = offset + 8 + length
        if end + 4 > len(data):
            break
        (crc,) = struct.unpack(">I", data[end : end + 4])
        if zlib.crc32(data[offset + 4 : end]) != crc:
            name = kind.decode("latin-1")
            raise ValueError(f"PNG chunk {name!r} at byte {offset} fails its CRC check: the file is damaged")
        if kind == b"IEND":
            return
        offset = end + 4
    raise ValueError(f"the PNG ends at byte {len(data)} before its IEND chunk: the file is truncated")


def pil_to_array(img: Image.Image) -> np.ndarray:
    """A decoded Pillow image -> (H, W) or (H, W, 3) array in its own bit depth."""
    if img.mode in {"I;16", "I;16B", "I;16L"}:
        return np.asarray(img, dtype=np.uint16)
    if img.mode == "I":
        return np.asarray(img, dtype=np.int32)
    if img.mode in {"P", "1", "LA", "PA"}:
        img = img.convert("RGBA" if "A" in img.mode else "L")
    if img.mode in {"RGBA", "CMYK", "YCbCr", "LAB", "HSV"}:
        img = img.convert("RGB")
    return np.asarray(img)


def write_png(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 or uint16 (H, W) / (H, W, 3) array as PNG, creating folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def content_hash(array: np.ndarray) -> str:
    """Hash of the decoded pixels (not the file bytes): re-encoded duplicates collide."""
    digest = hashlib.sha256()
    digest.update(str((array.shape, array.dtype.str)).encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()
