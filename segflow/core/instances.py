"""Telling touching objects apart: interior targets for training, watershed for inference.

A mask alone cannot separate two cells that touch: their pixels form one connected blob.
With `inference.instances: watershed` the network gets one more output channel that
predicts each object's *interior* (its pixels away from any edge, including the edge it
shares with a neighbour). Interiors of touching cells are disjoint, so they seed a
watershed that grows them back out to the predicted foreground, one object per seed.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage as ndi

from segflow.core.masks import id_dtype, sequential_ids
from segflow.core.objects import outline_pixels


def interior_target(instances: np.ndarray, margin: int) -> np.ndarray:
    """(H, W) instance ids -> (H, W) uint8, 1 on each object's interior.

    An object pixel is interior when it is at least `margin` pixels from the object's
    edge (background or another object). An object too thin for that keeps its innermost
    pixels, so every object still has a seed to learn.
    """
    objects = instances > 0
    if not objects.any():
        return np.zeros(instances.shape, np.uint8)
    # Distance of every object pixel to the nearest edge pixel or background pixel.
    inside = objects & ~outline_pixels(instances)
    distance = cv2.distanceTransform(inside.astype(np.uint8), cv2.DIST_L2, 3)  # (H, W) float32
    labels = instances.astype(np.int64)
    deepest = ndi.maximum(distance, labels, index=np.arange(labels.max() + 1))  # per id
    needed = np.minimum(float(margin), deepest[labels])  # thin objects: their deepest pixels
    return (objects & (distance >= needed)).astype(np.uint8)


def distance_target(instances: np.ndarray) -> np.ndarray:
    """(H, W) instance ids -> (H, W) float32 in [0, 1]: each object pixel's distance to the
    object's edge (background or another object), divided by the object's largest.

    The map peaks once near each object's centre and falls to 0 on every edge, also where two
    objects touch, whatever their size (the division makes it scale-free). Seeding a watershed
    from its high values and flooding down it separates touching neighbours along the valley
    between them, as in StarDist's and InstanSeg's distance-based seeds.
    """
    objects = instances > 0
    if not objects.any():
        return np.zeros(instances.shape, np.float32)
    inside = objects & ~outline_pixels(instances)
    # Outline pixels get 1, not 0: every object pixel, even of a two-pixel-wide object, stays
    # above background, so the map keeps thin objects' pixels apart from the gaps between them.
    distance = cv2.distanceTransform(inside.astype(np.uint8), cv2.DIST_L2, 5) + objects
    labels = instances.astype(np.int64)
    deepest = ndi.maximum(distance, labels, index=np.arange(labels.max() + 1))  # per id
    return np.where(objects, distance / np.maximum(deepest[labels], 1.0), 0.0).astype(np.float32)


def watershed_instances(
    foreground: np.ndarray,
    interior: np.ndarray,
    seed_threshold: float,
    min_area: int = 1,
    seed_prominence: float = 0.0,
) -> np.ndarray:
    """Split the foreground into objects grown from confident interior seeds.

    Args:
        foreground: (H, W) bool, pixels predicted to belong to some object.
        interior: (H, W) float32 in [0, 1]: P(interior), or the predicted normalised distance.
        seed_threshold: interior value above which a pixel seeds an object.
        min_area: objects of fewer pixels are dropped (the same as drop_small afterwards,
            without numbering the image twice).
        seed_prominence: 0: each connected region above seed_threshold is one seed. Above 0:
            each peak of `interior` (above seed_threshold) that rises at least this far above
            the pass to any higher peak is one seed (see seed_peaks).

    Returns:
        (H, W) uint16 instance ids, 0 = background. A foreground blob with one seed, or
        none, is one object; only blobs holding several seeds are split by the watershed.
    """
    n_blobs, blobs = cv2.connectedComponents(foreground.astype(np.uint8), connectivity=4)  # (H, W) int32
    seeds_mask = (interior > seed_threshold) & foreground
    if seed_prominence > 0:
        seeds_mask &= seed_peaks(np.where(foreground, interior, 0.0), seed_prominence)
    # 4-connected like the blobs, so no seed straddles two blobs that touch only at a corner.
    n_seeds, seeds = cv2.connectedComponents(seeds_mask.astype(np.uint8), connectivity=4)
    # Which blob each seed lies in; a blob with one seed or none needs no watershed (most
    # cells in most images), which keeps per-request post-processing cheap.
    blob_of_seed = np.zeros(n_seeds, np.int64)
    blob_of_seed[seeds[seeds_mask]] = blobs[seeds_mask]  # a seed lies inside one blob
    seeds_per_blob = np.bincount(blob_of_seed[1:], minlength=n_blobs)
    is_crowded = seeds_per_blob > 1  # per blob
    if not is_crowded.any():
        return compact_ids(blobs, min_area)
    crowded = is_crowded[blobs]  # (H, W) bool: pixels of blobs holding several seeds
    split = _flood(seeds, interior, crowded)  # ids 1..k
    labels = np.where(crowded, split + n_blobs, blobs)
    return compact_ids(labels, min_area)


def seed_peaks(interior: np.ndarray, prominence: float) -> np.ndarray:
    """(H, W) bool: the tops of the peaks of `interior` that rise at least `prominence` above
    the highest pass leading to a higher peak (h-maxima).

    Why not a threshold alone: two touching nuclei whose predicted distance maps meet at a
    saddle above the threshold form one seed region and stay merged, whatever the threshold
    that still keeps faint nuclei's seeds. A peak's prominence does not depend on its height,
    so it separates them at any brightness. It costs a greyscale reconstruction (about 60 ms
    for 512x512 on one core), hence off by default.
    """
    from skimage.morphology import h_maxima

    return h_maxima(interior.astype(np.float32, copy=False), prominence).astype(bool)


def _flood(seeds: np.ndarray, interior: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Watershed from `seeds` downhill in interior probability, inside `region` only (its box)."""
    from skimage.segmentation import watershed

    rows, cols = np.flatnonzero(region.any(axis=1)), np.flatnonzero(region.any(axis=0))
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    inside = region[box]
    relief = (1.0 - interior[box]).astype(np.float32)
    out = np.zeros(region.shape, np.int64)
    out[box] = watershed(relief, markers=np.where(inside, seeds[box], 0), mask=inside)
    return out


def split_by_class(labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Objects that span several predicted classes split into one object per class.

    Args:
        labels: (H, W) uint16 (or uint32) instance ids.
        mask: (H, W) uint8 class ids.

    Returns:
        (H, W) ids 1..n, 0 = background: uint16, or uint32 beyond 65,535 objects.
    """
    key = labels.astype(np.int64) * 256 + mask  # (H, W): one value per (object, class) pair
    key[labels == 0] = 0
    return sequential_ids(key)


def drop_small(instances: np.ndarray, min_area: int) -> np.ndarray:
    """Remove objects smaller than `min_area` pixels and renumber the rest 1..n (the same
    array back when none is that small)."""
    if min_area <= 0 or not instances.any():
        return instances
    areas = np.bincount(instances.ravel())[1:]  # by id 1..max
    if areas.min() >= min_area:  # every id present and none small: ids already 1..n
        return instances.astype(id_dtype(areas.size), copy=False)  # as compact_ids types them
    return compact_ids(instances, min_area)


def compact_ids(labels: np.ndarray, min_area: int = 1) -> np.ndarray:
    """Non-negative integer labels -> (H, W) ids 1..n in label order, 0 = background: uint16,
    or uint32 beyond 65,535 objects (a label image then needs TIFF, not PNG).

    Labels covering fewer than `min_area` pixels become background. For labels up to about
    the pixel count (a lookup table that large); sequential_ids handles any id.
    """
    areas = np.bincount(labels.ravel())
    keep = areas >= min_area
    keep[0] = False
    if keep[1:].all():  # labels already 1..n with none dropped (connected components): no renumbering
        return labels.astype(id_dtype(len(areas) - 1))
    new_ids = np.zeros(len(areas), id_dtype(int(keep.sum())))
    new_ids[keep] = np.arange(1, keep.sum() + 1)
    return new_ids[labels]
