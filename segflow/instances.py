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

from segflow.masks import relabel_sequential
from segflow.objects import outline_pixels

MAX_OBJECTS = np.iinfo(np.uint16).max


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


def watershed_instances(foreground: np.ndarray, interior: np.ndarray, seed_threshold: float) -> np.ndarray:
    """Split the foreground into objects grown from confident interior seeds.

    Args:
        foreground: (H, W) bool, pixels predicted to belong to some object.
        interior: (H, W) float32 P(interior) in [0, 1].
        seed_threshold: interior probability above which a pixel seeds an object.

    Returns:
        (H, W) uint16 instance ids, 0 = background. Foreground blobs without any seed
        become one object each, so nothing predicted is lost.
    """
    from skimage.segmentation import watershed

    seeds_mask = (interior > seed_threshold) & foreground
    count, seeds = cv2.connectedComponents(seeds_mask.astype(np.uint8), connectivity=4)
    # Flood from the seeds downhill in interior probability, inside the foreground only.
    relief = (1.0 - interior).astype(np.float32)
    labels = watershed(relief, markers=seeds, mask=foreground) if count > 1 else np.zeros_like(seeds)
    unseeded = foreground & (labels == 0)
    if unseeded.any():
        _, blobs = cv2.connectedComponents(unseeded.astype(np.uint8), connectivity=4)
        labels[blobs > 0] = blobs[blobs > 0] + labels.max()
    if labels.max() > MAX_OBJECTS:
        raise ValueError(f"more than {MAX_OBJECTS} objects in one image")
    return labels.astype(np.uint16)


def split_by_class(labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Objects that span several predicted classes split into one object per class.

    Args:
        labels: (H, W) uint16 instance ids.
        mask: (H, W) uint8 class ids.

    Returns:
        (H, W) uint16 ids 1..n, 0 = background.
    """
    key = labels.astype(np.int64) * 256 + mask  # (H, W): one value per (object, class) pair
    key[labels == 0] = 0
    return relabel_sequential(key)


def drop_small(instances: np.ndarray, min_area: int) -> np.ndarray:
    """Remove objects smaller than `min_area` pixels and renumber the rest 1..n."""
    if min_area <= 0 or not instances.any():
        return instances
    areas = np.bincount(instances.ravel())
    keep = areas >= min_area
    keep[0] = False
    new_ids = np.zeros(len(areas), np.uint16)
    new_ids[keep] = np.arange(1, keep.sum() + 1)
    return new_ids[instances]
