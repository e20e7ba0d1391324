"""CVAT "Segmentation mask 1.1" exports: RGB colour masks, one colour per class.

An unzipped export looks like this (the folders are ingest.image_dir and ingest.mask_dir):

    labelmap.txt                    # label:color_rgb:parts:actions, e.g. cell:255,0,0::
    JPEGImages/<name>.jpg           # the images
    SegmentationClass/<name>.png    # RGB, every pixel the colour of its label
    SegmentationObject/<name>.png   # not read: per-object colours carry no class

Labels map to class ids by name through base.classes (CVAT's `background` label is class
0). Each colour mask becomes a (H, W) uint8 class-id mask in <out>/masks/<id>.png. A
pixel whose colour is not in the palette is an item problem (manifest `palette_ok`
False, the colours and pixel counts in `problem`), so `ingest.on_error: skip` can drop
that item alone; an unusable palette or labelmap stops ingest (CvatFileError).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from segflow.core.images import read_image, read_rgb, write_png
from segflow.data.folder import (
    Pairing,
    SourceFileError,
    describe_pair,
    manifest_frame,
    manifest_path,
    read_noting,
    scan_pairs,
)

LABELMAP = "labelmap.txt"
CVAT_DIRS = ("JPEGImages", "SegmentationClass")  # what CVAT names image_dir and mask_dir
BACKGROUND = "background"  # CVAT always exports this label; it is class 0


class CvatFileError(SourceFileError):
    """The palette or labelmap cannot be used; the message names the file, line or class."""


def read_cvat(cfg, source: Path, out: Path, classes: list[str]) -> pd.DataFrame:
    """Decode every colour mask into class ids and describe each pair as a manifest row.

    Args:
        cfg: the ingest params (image_dir, mask_dir, globs, labelmap or palette).
        source: the export's folder.
        out: the ingested folder; good masks are written to out/masks/<id>.png.
        classes: base.classes (index = class id).

    Returns:
        The manifest: MANIFEST_COLUMNS plus `palette_ok`. Rows without a problem point at
        masks/<id>.png in `out`; rows with one keep the export's mask path for the report.

    Raises:
        CvatFileError: the labelmap or palette is malformed or does not match classes.
        FileNotFoundError: no labelmap, or no image folder (with the CVAT names to use).
    """
    palette, where = load_palette(cfg, source)
    table = colour_table(palette, classes, where)
    _check_layout(source, cfg.image_dir, cfg.mask_dir)
    pairing = Pairing.from_params(cfg)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    rows = [
        _convert_item(item, image, mask, source, out, table, len(classes), where, pairing.hint())
        for item, image, mask in scan_pairs(source, cfg.image_dir, cfg.mask_dir, pairing)
    ]
    return manifest_frame(rows, extra=("palette_ok",))


def load_palette(cfg, source: Path) -> tuple[dict[str, tuple[int, int, int]], str]:
    """The class colours: ingest.palette, else the labelmap file.

    Returns:
        (label name -> (r, g, b), where they came from, for messages).

    Raises:
        FileNotFoundError: neither a palette nor a labelmap file.
        CvatFileError: the labelmap is malformed.
    """
    if cfg.palette:
        return {name: tuple(colour) for name, colour in cfg.palette.items()}, "ingest.palette"
    path = source / (cfg.labelmap or LABELMAP)
    if not path.is_file():
        if cfg.labelmap:
            raise FileNotFoundError(f"ingest.labelmap: {path} not found; give its path relative to {source}")
        raise FileNotFoundError(
            f"format 'cvat' needs each class's colour, and {source} has no {LABELMAP}; export with "
            "CVAT's 'Segmentation mask 1.1' format (it writes labelmap.txt), set ingest.labelmap to "
            "the file, or set ingest.palette, e.g. {background: [0, 0, 0], cell: [255, 0, 0]}"
        )
    return parse_labelmap(path), str(path)


def parse_labelmap(path: Path) -> dict[str, tuple[int, int, int]]:
    """Read CVAT's labelmap.txt: `name:r,g,b:parts:actions` per line, `#` comments.

    Returns:
        Label name -> (r, g, b), in file order.

    Raises:
        CvatFileError: a line is malformed, or a name or colour appears twice.
    """
    palette: dict[str, tuple[int, int, int]] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, colour = _labelmap_line(line, path, number)
        if name in palette:
            raise CvatFileError(f"{path}, line {number}: label {name!r} is listed twice; keep one")
        twin = next((other for other, c in palette.items() if c == colour), None)
        if twin is not None:
            raise CvatFileError(
                f"{path}, line {number}: {name!r} has the colour {colour} of {twin!r}; each label "
                "needs its own colour"
            )
        palette[name] = colour
    if not palette:
        raise CvatFileError(f"{path} lists no labels; expected lines like `background:0,0,0::`")
    return palette


def _labelmap_line(line: str, path: Path, number: int) -> tuple[str, tuple[int, int, int]]:
    fields = line.strip().split(":")
    try:
        colour = tuple(int(c) for c in fields[1].split(","))
    except (IndexError, ValueError):
        colour = ()
    if len(fields) < 2 or not fields[0] or len(colour) != 3 or not all(0 <= c <= 255 for c in colour):
        raise CvatFileError(
            f"{path}, line {number}: {line.strip()!r} is not `name:r,g,b:parts:actions` "
            "(e.g. `cell:255,0,0::`)"
        )
    return fields[0], colour  # type: ignore[return-value]


def colour_table(palette: dict[str, tuple[int, int, int]], classes: list[str], where: str) -> dict[int, int]:
    """Packed colour (r << 16 | g << 8 | b) -> class id, checked against base.classes.

    Args:
        palette: label name -> (r, g, b).
        classes: base.classes; CVAT's `background` label is class 0 whatever its name there.
        where: the palette's origin, named in errors.

    Raises:
        CvatFileError: a label is not a class, or a class has no colour.
    """
    ids = {name: k for k, name in enumerate(classes)}
    ids.setdefault(BACKGROUND, 0)
    unknown = [name for name in palette if name not in ids]
    if unknown:
        raise CvatFileError(
            f"{where}: label(s) {unknown} are not in base.classes {classes}; add them to base.classes "
            "(class 0 is the background) or rename the labels to class names"
        )
    table = {_pack(colour): ids[name] for name, colour in palette.items()}
    uncoloured = [name for k, name in enumerate(classes) if k not in table.values()]
    if uncoloured:
        raise CvatFileError(
            f"base.classes {uncoloured} have no colour in {where}; add a `name:r,g,b::` line per class "
            "to the labelmap (or an entry to ingest.palette), or remove the class from base.classes"
        )
    return table


def colours_to_classes(rgb: np.ndarray, table: dict[int, int]) -> tuple[np.ndarray, list[tuple]]:
    """Map an RGB mask to class ids.

    Args:
        rgb: (H, W, 3) uint8 colour mask.
        table: from `colour_table`.

    Returns:
        ((H, W) uint8 class ids, unknown colours as [((r, g, b), pixel count)], most
        frequent first); unknown pixels are 0 in the class-id mask.
    """
    packed = _pack(tuple(rgb[..., c].astype(np.uint32) for c in range(3)))  # (H, W) uint32
    colours, inverse, counts = np.unique(packed.ravel(), return_inverse=True, return_counts=True)
    lookup = np.array([table.get(int(c), 0) for c in colours], np.uint8)
    class_ids = lookup[inverse].reshape(packed.shape)  # (H, W) uint8 class ids
    unknown = [(_unpack(int(c)), int(n)) for c, n in zip(colours, counts, strict=True) if int(c) not in table]
    return class_ids, sorted(unknown, key=lambda item: -item[1])


def _pack(colour):
    r, g, b = colour
    return (r << 16) | (g << 8) | b


def _unpack(packed: int) -> tuple[int, int, int]:
    return (packed >> 16) & 255, (packed >> 8) & 255, packed & 255


def _check_layout(source: Path, image_dir: str, mask_dir: str) -> None:
    """A missing folder where CVAT's own names exist: say which params to set."""
    if not (source / image_dir).is_dir() and all((source / d).is_dir() for d in CVAT_DIRS):
        raise FileNotFoundError(
            f"ingest.image_dir: no folder {source / image_dir}, but {source} is laid out like a CVAT "
            f"export; set ingest.image_dir: {CVAT_DIRS[0]} and ingest.mask_dir: {CVAT_DIRS[1]}"
        )


def _convert_item(item, image_path, mask_path, source, out, table, n_classes, where, hint) -> dict:
    image_ref, mask_ref = manifest_path(image_path, source), manifest_path(mask_path, source)
    problems: list[str] = []
    image = read_noting(image_path, "image", image_ref, problems, hint, read_image)
    rgb = read_noting(mask_path, "mask", mask_ref, problems, hint, read_rgb)  # (H, W, 3) uint8
    class_ids, palette_ok = None, None
    if rgb is not None:
        class_ids, unknown = colours_to_classes(rgb, table)
        palette_ok = not unknown
        if unknown:
            problems.append(f"mask {mask_ref}: {_describe_unknown(unknown)} not in the palette ({where})")
    row = describe_pair(
        item, image_ref, mask_ref, image, class_ids, "semantic", list(range(n_classes)), problems
    )
    row["palette_ok"] = palette_ok
    if not row["problem"]:  # only masks that reach convert are written
        write_png(out / "masks" / f"{item}.png", class_ids)
        row["mask"] = f"masks/{item}.png"  # relative to the ingested folder
    return row


def _describe_unknown(unknown: list[tuple]) -> str:
    shown = ", ".join(f"rgb{colour} in {count} pixel(s)" for colour, count in unknown[:5])
    more = f" and {len(unknown) - 5} more colour(s)" if len(unknown) > 5 else ""
    return f"colour(s) {shown}{more}"
