"""Extra evaluation sets (evaluate.extra_sets): labelled folders scored apart from the main data.

They answer "does the model still work on another microscope or clinic?", so they are read
as they are, never split, never trained on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segflow.core.images import read_image
from segflow.core.masks import instances_to_semantic, relabel_sequential
from segflow.data.folder import SourceFileError, scan_pairs
from segflow.data.samples import Sample


def load_extra_set(spec, n_classes: int, root: Path = Path(".")) -> list[Sample]:
    """Read one extra set's image/mask pairs (paired by file stem).

    Args:
        spec: its evaluate.extra_sets entry (config.ExtraSet).
        n_classes: len(base.classes); semantic masks must hold class ids below it.
        root: the folder `spec.source` is relative to (the repository).

    Raises:
        SourceFileError: a missing folder, an unpaired file or a mask value that is no class.
    """
    where = f"evaluate.extra_sets {spec.name!r}"
    source = root / spec.source
    if not (source / spec.image_dir).is_dir() or not (source / spec.mask_dir).is_dir():
        raise SourceFileError(
            f"{where}: expected images in {source / spec.image_dir} and masks in {source / spec.mask_dir}; "
            "fix its source/image_dir/mask_dir or remove it from params.yaml"
        )
    if spec.mask_kind == "instance" and n_classes > 2:
        raise SourceFileError(
            f"{where}: instance masks carry no class, but base.classes has {n_classes} classes; "
            "give this set semantic (class-id) masks and mask_kind: semantic"
        )
    pairs = scan_pairs(source, spec.image_dir, spec.mask_dir)
    unpaired = [key for key, image, mask in pairs if image is None or mask is None]
    if unpaired or not pairs:
        raise SourceFileError(f"{where}: images and masks must pair by file stem; unpaired: {unpaired[:5]}")
    return [_sample(key, image, mask, spec.mask_kind, n_classes, where) for key, image, mask in pairs]


def check_tracked(specs, dvc_yaml: Path = Path("dvc.yaml")) -> None:
    """Every extra set's folder must be a dep of the evaluate stage, or DVC would not re-run
    evaluate when its images change (and `dvc repro` would report stale scores as current).

    Raises:
        SourceFileError: naming the line to add to dvc.yaml.
    """
    import yaml

    deps = yaml.safe_load(dvc_yaml.read_text())["stages"]["evaluate"].get("deps", [])
    tracked = {Path(str(dep)) for dep in deps}
    for spec in specs:
        folder = Path(spec.source)
        if not any(folder == dep or dep in folder.parents for dep in tracked):
            raise SourceFileError(
                f"evaluate.extra_sets {spec.name!r}: {folder} is not a dep of the evaluate stage; add "
                f"`- {folder}` under stages.evaluate.deps in {dvc_yaml}, so DVC re-runs evaluate when "
                "its images change"
            )


def _sample(key: str, image: Path, mask: Path, kind: str, n_classes: int, where: str) -> Sample:
    raw = read_image(mask)
    if kind == "instance":
        instances = relabel_sequential(raw)  # (H, W) uint16 ids 1..n
        return Sample(key, read_image(image), instances_to_semantic(instances), instances)
    if raw.max() >= n_classes:
        raise SourceFileError(
            f"{where}: {mask} holds value {int(raw.max())}; semantic masks hold class ids 0-{n_classes - 1}"
        )
    return Sample(key, read_image(image), raw.astype(np.uint8))
