"""Folders of image/mask pairs: <source>/<image_dir>/NAME.ext with <source>/<mask_dir>/NAME.ext.

`scan_pairs` lists what is there (globs choose the files, stem suffixes such as `_masks`
are removed before pairing) and `inspect_pairs` decodes every file once, recording what
validation needs to know (one manifest row per image, or per orphan mask). Readers of
other formats build the same rows from decoded arrays with `describe_pair`.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from segflow.core.images import IMAGE_SUFFIXES, ImageReadError, content_hash, read_image
from segflow.errors import UserError

MANIFEST_COLUMNS = [
    "id", "image", "mask", "image_readable", "mask_readable", "height", "width", "channels",
    "dtype", "mask_height", "mask_width", "size", "mask_size", "mask_values_ok", "objects",
    "content_hash", "mask_hash", "dtype_ok", "problem",
]  # fmt: skip


class SourceFileError(UserError):
    """The source as a whole cannot be read (a palette, labelmap or array file is unusable).

    Problems with single items are manifest rows instead, so `ingest.on_error: skip` can
    drop them; this error stops ingest with the message alone.
    """


class AmbiguousPairError(SourceFileError):
    """Two files in one folder share a stem, so pairing by name cannot decide."""


@dataclass(frozen=True)
class Pairing:
    """Which files count and how their names pair (ingest.image_glob ... mask_stem_suffix).

    The defaults take every image file and pair equal stems: a.png with a.tif.
    """

    image_glob: str = "*"
    mask_glob: str = "*"
    image_stem_suffix: str = ""  # removed from image stems before pairing ("_img")
    mask_stem_suffix: str = ""  # removed from mask stems before pairing ("_masks")

    @classmethod
    def from_params(cls, cfg) -> Pairing:
        """From the ingest params (IngestParams)."""
        return cls(cfg.image_glob, cfg.mask_glob, cfg.image_stem_suffix, cfg.mask_stem_suffix)

    def hint(self) -> str:
        """How names pair, in words, for reports ('' with the defaults: equal stems is obvious)."""
        if self == Pairing():
            return ""
        rule = f"images <name>{self.image_stem_suffix}.* pair with masks <name>{self.mask_stem_suffix}.*"
        return f"{rule} (ingest.image_glob {self.image_glob!r}, ingest.mask_glob {self.mask_glob!r})"


def scan_pairs(
    source: Path, image_dir: str, mask_dir: str, pairing: Pairing = Pairing()
) -> list[tuple[str, Path | None, Path | None]]:
    """Pair images and masks by name: file stem minus the pairing's stem suffix.

    Args:
        source: the dataset folder.
        image_dir, mask_dir: its image and mask folders.
        pairing: globs selecting the files and suffixes removed before pairing.

    Returns:
        (id, image path or None, mask path or None) sorted by id; a None marks an image
        without mask or a mask without image, for validation to report. A file whose stem
        lacks its suffix pairs with nothing (id: its whole stem).

    Raises:
        FileNotFoundError: the image folder does not exist, or a glob matches no file.
        AmbiguousPairError: two files in one folder pair under one name (a.png and a.tif).
    """
    images_root, masks_root = source / image_dir, source / mask_dir
    for kind, glob in (("image", pairing.image_glob), ("mask", pairing.mask_glob)):
        if "/" in glob or "\\" in glob:
            raise FileNotFoundError(
                f"ingest.{kind}_glob {glob!r} contains a path separator; it matches file names inside "
                f"ingest.{kind}_dir (e.g. '*_{kind}.png'), so put any subfolder in ingest.{kind}_dir"
            )
    if not images_root.is_dir():
        raise FileNotFoundError(
            f"ingest.source: no image folder at {images_root}; set ingest.source and "
            "ingest.image_dir to the folder holding your images"
        )
    images, stray_images = _by_key(images_root, pairing.image_glob, pairing.image_stem_suffix, "image")
    masks, stray_masks = {}, []
    if masks_root.is_dir():
        masks, stray_masks = _by_key(masks_root, pairing.mask_glob, pairing.mask_stem_suffix, "mask")
    pairs = [(key, images.get(key), masks.get(key)) for key in set(images) | set(masks)]
    pairs += [(path.stem, path, None) for path in stray_images]
    pairs += [(path.stem, None, path) for path in stray_masks]
    return sorted(pairs, key=lambda pair: (pair[0], str(pair[1]), str(pair[2])))


def _by_key(folder: Path, glob: str, suffix: str, kind: str) -> tuple[dict[str, Path], list[Path]]:
    """Files of `folder` matching `glob` by pairing key, and those whose stem lacks `suffix`."""
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    matched = [p for p in files if fnmatch.fnmatchcase(p.name, glob)]
    if files and not matched:
        examples = ", ".join(p.name for p in files[:3])
        raise FileNotFoundError(
            f"ingest.{kind}_glob {glob!r} matches none of the {len(files)} image files in {folder} "
            f"(e.g. {examples}); fix the pattern (it is case-sensitive) or use '*'"
        )
    found: dict[str, Path] = {}
    strays: list[Path] = []
    for path in matched:
        if suffix and (path.stem == suffix or not path.stem.endswith(suffix)):
            strays.append(path)
            continue
        key = path.stem.removesuffix(suffix) if suffix else path.stem
        if key in found:
            raise AmbiguousPairError(
                f"{found[key]} and {path} both pair under the name {key!r}; images and masks "
                "pair by name, so keep one of them (or rename it)"
            )
        found[key] = path
    return found, strays


def inspect_pairs(
    pairs: list[tuple[str, Path | None, Path | None]],
    root: Path,
    mask_kind: str,
    mask_values: list[int] | None,
    unpaired_hint: str = "",
) -> list[dict]:
    """Decode every image and mask and describe it as a manifest row.

    Args:
        pairs: from `scan_pairs`.
        root: paths in the manifest are written relative to this folder.
        mask_kind: "instance" (non-negative ids) or "semantic" (values in mask_values).
        mask_values: the allowed raw values for semantic masks.
        unpaired_hint: how names pair (Pairing.hint), added to "image has no mask" and
            "mask has no image" so a suffix or glob mistake is easy to see.

    Returns:
        One dict per pair with MANIFEST_COLUMNS; `problem` explains any defect in words.
    """
    return [
        _inspect(stem, image, mask, root, mask_kind, mask_values, unpaired_hint)
        for stem, image, mask in pairs
    ]


def manifest_frame(rows: list[dict], extra: tuple[str, ...] = ()) -> pd.DataFrame:
    """Rows as a DataFrame with every manifest column (and `extra` ones), even with no rows."""
    return pd.DataFrame(rows, columns=[*MANIFEST_COLUMNS, *extra])


def _inspect(stem, image_path, mask_path, root, mask_kind, mask_values, hint) -> dict:
    image_ref, mask_ref = manifest_path(image_path, root), manifest_path(mask_path, root)
    problems: list[str] = []
    image = read_noting(image_path, "image", image_ref, problems, hint)
    mask = read_noting(mask_path, "mask", mask_ref, problems, hint)
    return describe_pair(stem, image_ref, mask_ref, image, mask, mask_kind, mask_values, problems)


def read_noting(
    path: Path | None, what: str, ref: str | None, problems: list[str], hint: str = "", reader=read_image
) -> np.ndarray | None:
    """Decode one side of a pair, or note in `problems` why there is nothing to decode.

    Args:
        path: the file, or None when the pair lacks it.
        what: "image" or "mask".
        ref: the path as the manifest shows it (named in the problem).
        problems: appended to.
        hint: how names pair (Pairing.hint), for a missing partner.
        reader: decodes the file (read_image; colour masks use read_rgb).

    Returns:
        The array, or None when the file is missing or unreadable.
    """
    other = "mask" if what == "image" else "image"
    if path is None:
        problems.append(f"{other} has no {what}" + (f" ({hint})" if hint else ""))
        return None
    try:
        return reader(path)
    except ImageReadError as exc:
        # The report names the image file already; a mask is named in the text.
        problems.append(
            f"image unreadable: {exc.reason}" if what == "image" else f"mask {ref} unreadable: {exc.reason}"
        )
        return None


def describe_pair(
    item: str,
    image_ref: str | None,
    mask_ref: str | None,
    image: np.ndarray | None,
    mask: np.ndarray | None,
    mask_kind: str,
    mask_values: list[int] | None,
    problems: list[str] | tuple[str, ...] = (),
) -> dict:
    """One manifest row from decoded arrays (readers that decode or draw masks share it).

    Args:
        item: the row id.
        image_ref, mask_ref: what the manifest's image and mask columns say (paths).
        image: (H, W) or (H, W, C) array, or None when missing or unreadable.
        mask: (H, W) array, or None when missing or unreadable.
        mask_kind, mask_values: as for `inspect_pairs`.
        problems: what the caller already found (missing or unreadable files).

    Returns:
        A dict with MANIFEST_COLUMNS; `problem` joins every defect found.
    """
    row = dict.fromkeys(MANIFEST_COLUMNS)
    row.update(id=item, image=image_ref, mask=mask_ref)
    problems = list(problems)
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
            problems.append(f"mask {mask_ref}: {detail}")
    if image is not None and mask is not None and image.shape[:2] != mask.shape[:2]:
        problems.append(f"mask {mask_ref} is {row['mask_size']} but the image is {row['size']}")
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
        return False, f"mask dtype {mask.dtype} is not an integer type; save masks as uint8/uint16", 0
    values = np.unique(mask)
    if kind == "instance":
        if values.min() < 0:
            return False, "instance mask has negative ids", 0
        return True, "", int((values > 0).sum())
    unknown = sorted(set(values.tolist()) - set(allowed or []))
    if unknown:
        return False, f"mask values {unknown[:10]} not in ingest.mask_values {allowed}", 0
    return True, "", 0


def manifest_path(path: Path | None, root: Path) -> str | None:
    """`path` as the manifest writes it: relative to `root` (POSIX), else absolute."""
    if path is None:
        return None
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())
