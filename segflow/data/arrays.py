"""NumPy stacks: one .npz holding `images` (N, H, W[, C]), `masks` (N, H, W), maybe `names`.

The archive is opened with `allow_pickle=False` and every member's header is read before
its data, so a pickled member is refused by name instead of being unpickled. The stack's
structure (keys, shapes, dtypes, N) is checked once and stops ingest when wrong
(ArraysFileError); values are checked per item (float range, negative ids, unknown
semantic values) as manifest rows, so `ingest.on_error: skip` can drop single items.

Each good item is written into the ingested folder, keeping its values exactly:
images/<id>.png (uint8, or uint16 grey) or .tif (float, and RGB uint16, which PNG via
Pillow cannot hold); masks/<id>.png in the smallest of uint8/uint16 that holds the values,
else a 32-bit TIFF. Large ids are kept, not relabelled here: PNG stops at 16 bits, the
values are the user's data (semantic values must stay as found), and convert already
renumbers instance ids 1..n in one place.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from segflow.core.images import PICKLED_NPY, ImageReadError, npy_dtype, write_png
from segflow.data.folder import SourceFileError, describe_pair, manifest_frame

KEYS = ("images", "masks")
_SAFE_NAME = re.compile(r"^[\w][\w.\-+ ]*$")  # ids become file names


class ArraysFileError(SourceFileError):
    """The .npz cannot be used as a whole; the message names the file and the array."""


def read_arrays(cfg, source: Path, out: Path) -> pd.DataFrame:
    """Check the stack, write each good item into `out`, describe every item.

    Args:
        cfg: the ingest params (arrays, mask_kind, mask_values).
        source: the folder `cfg.arrays` is relative to.
        out: the ingested folder; images/ and masks/ are written there.

    Returns:
        The manifest; rows without a problem point at images/<id>.* and masks/<id>.* in
        `out`, rows with one name the item as `<file>:images[i]` for the report.

    Raises:
        FileNotFoundError: the .npz is missing.
        ArraysFileError: not an .npz, a pickled member, missing keys, or wrong shapes/dtypes.
    """
    path = source / cfg.arrays
    images, masks, names = load_arrays(path)
    ids = names if names is not None else [f"{path.stem}_{i:04d}" for i in range(len(images))]
    for folder in ("images", "masks"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    rows = [
        _write_item(i, item, images[i], masks[i], cfg, out, cfg.arrays, names is not None)
        for i, item in enumerate(ids)
    ]
    return manifest_frame(rows)


def load_arrays(path: Path) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """Load and check the archive's structure.

    Returns:
        images (N, H, W) or (N, H, W, 3), masks (N, H, W) integer, and the ids from
        `names` (None when absent). A trailing channel axis of size 1 is dropped.

    Raises:
        FileNotFoundError, ArraysFileError: as for `read_arrays`.
    """
    if not path.is_file():
        raise FileNotFoundError(
            f"ingest.arrays: {path} not found; give the .npz path relative to ingest.source"
        )
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ArraysFileError(
            f"{path} is not a NumPy .npz archive ({exc}); save one with "
            "np.savez_compressed(path, images=images, masks=masks)"
        ) from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ArraysFileError(
            f"{path} holds a single array, not an .npz archive with `images` and `masks`; save "
            "one with np.savez_compressed, or for one .npy file per image use format: folder"
        )
    with archive:
        missing = [key for key in KEYS if key not in archive.files]
        if missing:
            raise ArraysFileError(
                f"{path} has no {missing} array(s); it holds {sorted(archive.files)}. Save with "
                "np.savez_compressed(path, images=images, masks=masks[, names=names])"
            )
        images, masks = (_member(archive, key, path) for key in KEYS)
        names = _member(archive, "names", path) if "names" in archive.files else None
    images, masks = _check_stacks(images, masks, path)
    return images, masks, None if names is None else _check_names(names, len(images), path)


def _member(archive, key: str, path: Path) -> np.ndarray:
    """One array of the archive, its header checked before its data is read."""
    try:
        with archive.zip.open(f"{key}.npy") as file:
            dtype = npy_dtype(file, f"{path}:{key}")
    except ImageReadError as exc:
        raise ArraysFileError(f"{path}: array {key!r}: {exc.reason}") from None
    if dtype.hasobject:
        hint = " (for names use strings: np.array(names, dtype=str))" if key == "names" else ""
        raise ArraysFileError(f"{path}: array {key!r}: {PICKLED_NPY}{hint}")
    return archive[key]  # still allow_pickle=False


def _check_stacks(images: np.ndarray, masks: np.ndarray, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Shapes and dtypes every item shares; returns the stacks with a size-1 channel axis dropped."""
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]  # (N, H, W, 1) -> (N, H, W)
    if masks.ndim == 4 and masks.shape[-1] == 1:
        masks = masks[..., 0]
    _check_shapes(images.shape, masks.shape, path)
    if not np.issubdtype(masks.dtype, np.integer):
        raise ArraysFileError(
            f"{path}: masks are {masks.dtype}; masks must be integers, e.g. masks.astype(np.uint16)"
        )
    if not (images.dtype in (np.uint8, np.uint16) or np.issubdtype(images.dtype, np.floating)):
        raise ArraysFileError(
            f"{path}: images are {images.dtype}; use uint8, uint16, or float scaled to [0, 1]"
        )
    return images, masks


def _check_shapes(images: tuple, masks: tuple, path: Path) -> None:
    expected = "expected (N, H, W) grey or (N, H, W, 3) RGB"
    if len(images) == 4 and images[-1] != 3:
        if images[1] in (1, 3):
            expected += "; it looks channel-first: use np.moveaxis(images, 1, -1)"
        raise ArraysFileError(f"{path}: images has shape {images}; {expected}")
    if len(images) not in (3, 4):
        raise ArraysFileError(f"{path}: images has shape {images}; {expected}")
    if len(masks) != 3:
        raise ArraysFileError(f"{path}: masks has shape {masks}; expected (N, H, W), one 2-D mask per image")
    if images[0] != masks[0]:
        raise ArraysFileError(
            f"{path}: images holds {images[0]} items but masks holds {masks[0]}; each image needs one mask"
        )
    if images[1:3] != masks[1:3]:
        raise ArraysFileError(
            f"{path}: images are {images[2]}x{images[1]} but masks are {masks[2]}x{masks[1]} "
            "(width x height); every mask needs its image's size"
        )


def _check_names(names: np.ndarray, count: int, path: Path) -> list[str]:
    if names.ndim != 1 or len(names) != count or names.dtype.kind not in "US":
        raise ArraysFileError(
            f"{path}: names must be {count} strings, one per image (got {names.dtype} {names.shape})"
        )
    ids = [n.decode() if isinstance(n, bytes) else str(n) for n in names.tolist()]
    seen: set[str] = set()
    for index, item in enumerate(ids):
        if not _SAFE_NAME.match(item) or item in seen:
            why = "appears twice" if item in seen else "is not usable as a file name"
            raise ArraysFileError(
                f"{path}: names[{index}] {item!r} {why}; ids become file names, so use unique names "
                "of letters, digits, '_', '-', '.'"
            )
        seen.add(item)
    return ids


def _write_item(index, item, image, mask, cfg, out: Path, arrays: str, named: bool) -> dict:
    """Describe one item; write its files when it has no problem."""
    label = f" ({item})" if named else ""
    image_ref, mask_ref = f"{arrays}:images[{index}]{label}", f"{arrays}:masks[{index}]{label}"
    mask = _smallest_mask_dtype(mask)  # (H, W), values unchanged
    row = describe_pair(item, image_ref, mask_ref, image, mask, cfg.mask_kind, cfg.mask_values)
    if row["problem"]:
        return row  # the references name the file and item in the report
    image_name = f"images/{item}{_image_suffix(image)}"
    mask_name = f"masks/{item}{'.png' if mask.dtype in (np.uint8, np.uint16) else '.tif'}"
    _write(out / image_name, image)
    _write(out / mask_name, mask)
    row.update(image=image_name, mask=mask_name)  # relative to the ingested folder
    return row


def _smallest_mask_dtype(mask: np.ndarray) -> np.ndarray:
    """uint8 / uint16 when the values fit (PNG), else uint32 (or the own dtype, signed) for TIFF."""
    low, high = int(mask.min()), int(mask.max())
    if low < 0:
        return mask  # negative values: kept as found, reported by the value checks
    for dtype in (np.uint8, np.uint16, np.uint32):
        if high <= np.iinfo(dtype).max:
            return mask.astype(dtype, copy=False)
    return mask


def _image_suffix(image: np.ndarray) -> str:
    # Pillow writes uint8 grey/RGB and uint16 grey PNGs; everything else goes to TIFF.
    png = image.dtype == np.uint8 or (image.dtype == np.uint16 and image.ndim == 2)
    return ".png" if png else ".tif"


def _write(path: Path, array: np.ndarray) -> None:
    if path.suffix == ".png":
        write_png(path, array)
    else:
        import tifffile

        tifffile.imwrite(path, array)
