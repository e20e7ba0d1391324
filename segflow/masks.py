"""Conversions between mask representations.

Canonical forms used downstream:
- semantic: (H, W) uint8 class ids, 0 = background;
- instances: (H, W) uint16 ids, 0 = background, one id per object.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


def instances_to_semantic(instances: np.ndarray) -> np.ndarray:
    """(H, W) instance ids -> (H, W) uint8 class ids (every object is class 1)."""
    return (instances > 0).astype(np.uint8)


def semantic_from_values(mask: np.ndarray, foreground_values: list[int] | None) -> np.ndarray:
    """Raw semantic mask -> (H, W) uint8 class ids for a binary task.

    Args:
        mask: (H, W) integer mask as found in the source.
        foreground_values: raw values meaning foreground; None means every non-zero value.
    """
    if foreground_values is None:
        return (mask != 0).astype(np.uint8)
    return np.isin(mask, foreground_values).astype(np.uint8)


def relabel_sequential(instances: np.ndarray) -> np.ndarray:
    """Instance ids renumbered 1..n in order of first appearance; (H, W) uint16."""
    ids = np.unique(instances)
    ids = ids[ids != 0]
    if len(ids) > np.iinfo(np.uint16).max:
        raise ValueError(f"{len(ids)} objects in one mask; at most 65535 are supported")
    lookup = np.zeros(int(instances.max()) + 1, np.uint16)
    lookup[ids] = np.arange(1, len(ids) + 1, dtype=np.uint16)
    return lookup[instances]


def connected_instances(semantic: np.ndarray) -> np.ndarray:
    """Foreground connected components as (H, W) uint16 instance ids."""
    labels, _ = ndi.label(semantic > 0)
    return labels.astype(np.uint16)


def outline(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels on the border of each labelled region of `mask`."""
    eroded = ndi.grey_erosion(mask, size=3)
    dilated = ndi.grey_dilation(mask, size=3)
    return (mask > 0) & ((eroded != mask) | (dilated != mask))
