"""Reading and writing image files, with errors that name the file."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")

# Pillow refuses images above this many pixels (decompression-bomb guard); raise it to a
# size real microscopy reaches, still far below what exhausts memory.
Image.MAX_IMAGE_PIXELS = 20_000 * 20_000


class ImageReadError(ValueError):
    """A file could not be decoded as an image."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: cannot read image: {reason}")


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file completely.

    Returns:
        (H, W) or (H, W, C) array, uint8 or uint16 (or float32 for float TIFFs).

    Raises:
        ImageReadError: the file is missing, truncated or not an image.
    """
    path = Path(path)
    try:
        if path.suffix.lower() in {".tif", ".tiff"}:
            import tifffile

            array = tifffile.imread(path)
        else:
            with Image.open(path) as img:
                img.load()  # decode fully now, so truncated files fail here
                array = pil_to_array(img)
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageReadError(path, str(exc) or type(exc).__name__) from exc
    if array.ndim not in (2, 3) or array.size == 0:
        raise ImageReadError(path, f"unsupported shape {array.shape}; expected (H, W) or (H, W, C)")
    return array


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
