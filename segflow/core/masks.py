"""Conversions between mask representations.

Canonical forms used downstream:
- semantic: (H, W) uint8 class ids, 0 = background;
- instances: (H, W) uint16 ids, 0 = background, one id per object.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from segflow.errors import UserError


def instances_to_semantic(instances: np.ndarray) -> np.ndarray:
    """(H, W) instance ids -> (H, W) uint8 class ids (every object is class 1)."""
    return (instances > 0).astype(np.uint8)


def semantic_from_values(
    mask: np.ndarray,
    foreground_values: list[int] | None,
    class_values: dict[int, list[int]] | None = None,
    n_classes: int = 2,
) -> np.ndarray:
    """Raw semantic mask -> (H, W) uint8 class ids.

    Args:
        mask: (H, W) integer mask as found in the source.
        foreground_values: two classes: raw values meaning foreground (None: every non-zero value).
        class_values: class id -> its raw values; values not listed become background.
        n_classes: with more than two classes and no class_values, raw values are the class ids.
    """
    if class_values is not None:
        classes = np.zeros(mask.shape, np.uint8)
        for class_id, values in class_values.items():
            classes[np.isin(mask, values)] = class_id
        return classes
    if n_classes > 2:
        return mask.astype(np.uint8)  # config checked that ingest.mask_values are class ids
    if foreground_values is None:
        return (mask != 0).astype(np.uint8)
    return np.isin(mask, foreground_values).astype(np.uint8)


def id_dtype(objects: int) -> type:
    """The label dtype for this many objects: uint16 (a 16-bit PNG), uint32 beyond 65,535."""
    return np.uint16 if objects <= np.iinfo(np.uint16).max else np.uint32


def sequential_ids(instances: np.ndarray) -> np.ndarray:
    """Instance ids renumbered 1..n in increasing id order; (H, W) id_dtype(n).

    Works from the ids present (np.unique), so 32-bit ids near 4e9 cost no lookup table.
    """
    ids, inverse = np.unique(instances, return_inverse=True)
    objects = len(ids) - int(ids[0] == 0)
    if ids[0] != 0:
        inverse = inverse + 1  # no background pixel: the smallest id becomes 1
    return inverse.reshape(instances.shape).astype(id_dtype(objects))


def relabel_sequential(instances: np.ndarray) -> np.ndarray:
    """sequential_ids for a stored mask: (H, W) uint16 (canonical masks are 16-bit PNGs)."""
    relabelled = sequential_ids(instances)
    if relabelled.dtype != np.uint16:
        raise UserError(f"{int(relabelled.max())} objects in one mask; at most 65535 are supported")
    return relabelled


def connected_instances(semantic: np.ndarray) -> np.ndarray:
    """Foreground connected components as (H, W) uint16 instance ids."""
    labels, _ = ndi.label(semantic > 0)
    return labels.astype(np.uint16)


def outline(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels on the border of each labelled region of `mask`."""
    eroded = ndi.grey_erosion(mask, size=3)
    dilated = ndi.grey_dilation(mask, size=3)
    return (mask > 0) & ((eroded != mask) | (dilated != mask))
