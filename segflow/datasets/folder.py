"""Folders of image/mask pairs: <source>/<image_dir>/NAME.ext with <source>/<mask_dir>/NAME.ext.

`scan_pairs` lists what is there and `inspect_pairs` decodes every file once, recording
what validation needs to know (one manifest row per image, or per orphan mask).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from segflow.images import IMAGE_SUFFIXES, ImageReadError, content_hash, read_image

MANIFEST_COLUMNS = [
    "id", "image", "mask", "image_readable", "mask_readable", "height", "width", "channels",
    "dtype", "mask_height", "mask_width", "size", "mask_size", "mask_values_ok", "objects",
    "content_hash", "mask_hash", "dtype_ok", "problem",
]  # fmt: skip


def scan_pairs(source: Path, image_dir: str, mask_dir: str) -> list[tuple[str, Path | None, Path | None]]:
    """Pair images and masks by file stem.

    Returns:
        (stem, image path or None, mask path or None) sorted by stem; a None marks an
        image without mask or a mask without image, for validation to report.

    Raises:
        FileNotFoundError: the image folder does not exist.
        AmbiguousPairError: two files in one folder share a stem (a.png and a.tif).
    """
    images_root, masks_root = source / image_dir, source / mask_dir
    if not images_root.is_dir():
        raise FileNotFoundError(
            f"ingest.source: no image folder at {images_root}; set ingest.source and "
            "ingest.image_dir to the folder holding your images"
        )
    images = _by_stem(images_root)
    masks = _by_stem(masks_root) if masks_root.is_dir() else {}
    stems = sorted(set(images) | set(masks))
    return [(stem, images.get(stem), masks.get(stem)) for stem in stems]


class AmbiguousPairError(ValueError):
    """Two files in one folder share a stem, so pairing by name cannot decide."""


def _by_stem(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not (path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES):
            continue
        if path.stem in found:
            raise AmbiguousPairError(
                f"{found[path.stem]} and {path} share the name {path.stem!r}; images and masks "
                "pair by name, so keep one of them (or rename it)"
            )
        found[path.stem] = path
    return found


def inspect_pairs(
    pairs: list[tuple[str, Path | None, Path | None]],
    root: Path,
    mask_kind: str,
    mask_values: list[int] | None,
) -> list[dict]:
    """Decode every image and mask and describe it as a manifest row.

    Args:
        pairs: from `scan_pairs`.
        root: paths in the manifest are written relative to this folder.
        mask_kind: "instance" (non-negative ids) or "semantic" (values in mask_values).
        mask_values: the allowed raw values for semantic masks.

    Returns:
        One dict per pair with MANIFEST_COLUMNS; `problem` explains any defect in words.
    """
    return [_inspect(stem, image, mask, root, mask_kind, mask_values) for stem, image, mask in pairs]


def manifest_frame(rows: list[dict]) -> pd.DataFrame:
    """Rows as a DataFrame with every manifest column, even when there are no rows."""
    return pd.DataFrame(rows, columns=MANIFEST_COLUMNS)


def _inspect(stem, image_path, mask_path, root, mask_kind, mask_values) -> dict:
    row = dict.fromkeys(MANIFEST_COLUMNS)
    row.update(id=stem, image=_rel(image_path, root), mask=_rel(mask_path, root), problem="")
    problems = []
    image = mask = None
    if image_path is None:
        problems.append("mask has no image")
    else:
        try:
            image = read_image(image_path)
        except ImageReadError as exc:
            problems.append(f"image unreadable: {exc.reason}")
    if mask_path is None:
        problems.append("image has no mask")
    else:
        try:
            mask = read_image(mask_path)
        except ImageReadError as exc:
            problems.append(f"mask {row['mask']} unreadable: {exc.reason}")
    row["image_readable"] = image is not None
    row["mask_readable"] = mask is not None
    if image is not None:
        row.update(
            height=image.shape[0], width=image.shape[1],
            channels=1 if image.ndim == 2 else image.shape[2],
            dtype=str(image.dtype), content_hash=content_hash(image),
            size=f"{image.shape[1]}x{image.shape[0]}",
        )  # fmt: skip
        dtype_problem = _check_image_dtype(image)
        row["dtype_ok"] = not dtype_problem
        if dtype_problem:
            problems.append(dtype_problem)
    if mask is not None:
        row.update(
            mask_height=mask.shape[0], mask_width=mask.shape[1], mask_size=f"{mask.shape[1]}x{mask.shape[0]}"
        )
        row["mask_hash"] = content_hash(mask)
        ok, detail, objects = _check_mask_values(mask, mask_kind, mask_values)
        row.update(mask_values_ok=ok, objects=objects)
        if not ok:
            problems.append(f"mask {row['mask']}: {detail}")
    if image is not None and mask is not None and image.shape[:2] != mask.shape[:2]:
        problems.append(f"mask {row['mask']} is {row['mask_size']} but the image is {row['size']}")
    row["problem"] = "; ".join(problems)
    return row


def _check_image_dtype(image: np.ndarray) -> str:
    """'' when inference can scale this image to [0, 1], else the reason it cannot."""
    if image.dtype in (np.uint8, np.uint16):
        return ""
    if np.issubdtype(image.dtype, np.floating):
        if not np.isfinite(image).all():
            return "image has NaN or infinite values"
        if image.min() < 0 or image.max() > 1:
            return f"float image values span [{image.min():g}, {image.max():g}]; expected [0, 1]"
        return ""
    return f"image dtype {image.dtype} is not supported; use 8- or 16-bit unsigned, or float in [0, 1]"


def _check_mask_values(mask: np.ndarray, kind: str, allowed: list[int] | None) -> tuple[bool, str, int]:
    if mask.ndim != 2:
        return False, f"mask has {mask.shape[2]} channels; masks must be single-channel", 0
    if not np.issubdtype(mask.dtype, np.integer):
        return False, f"mask dtype {mask.dtype} is not an integer type", 0
    values = np.unique(mask)
    if kind == "instance":
        if values.min() < 0:
            return False, "instance mask has negative ids", 0
        return True, "", int((values > 0).sum())
    unknown = sorted(set(values.tolist()) - set(allowed or []))
    if unknown:
        return False, f"mask values {unknown[:10]} not in ingest.mask_values {allowed}", 0
    return True, "", 0


def _rel(path: Path | None, root: Path) -> str | None:
    if path is None:
        return None
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())
