"""Object size: measuring it, and rescaling images so objects have the size the model learned.

A network sees objects through a receptive field of fixed size, so a model trained on cells
70 pixels across merges or misses cells 40 pixels across. Like Cellpose, segflow can train
at one object diameter (`train.diameter`): every training image is rescaled so its median
object has that diameter, and at inference each image is rescaled the same way, from a
diameter the user gives or one estimated from a first pass (`inference.diameter: auto`).
"""

from __future__ import annotations

import cv2
import numpy as np

from segflow.core.tiling import pad_to_multiple
from segflow.errors import UserError


def object_diameters(instances: np.ndarray) -> np.ndarray:
    """(H, W) instance ids -> (n,) float64 diameter of the disk of equal area, per object."""
    areas = np.bincount(instances.ravel().astype(np.int64))[1:]
    areas = areas[areas > 0]
    return 2.0 * np.sqrt(areas / np.pi)


def median_diameter(instances: np.ndarray, outlier: float = 3.0) -> float | None:
    """The typical object's equal-area diameter in pixels; None for an image without objects.

    The median is weighted by area (the diameter of the object a typical object pixel lies
    in), so a scatter of specks from a poor first pass cannot drag the estimate down. The
    largest objects are left out while each is more than `outlier` times the typical size of
    the rest: a first pass that floods a clump or an unlabelled tissue region into one blob
    holding most of the foreground would otherwise decide the size on its own (a Drosophila
    embryo's ring of 20-pixel nuclei read as one 450-pixel object, and the image shrunk 4x).
    """
    return _weighted_median(object_diameters(instances), outlier)


def _weighted_median(diameters: np.ndarray, outlier: float) -> float | None:
    """Area-weighted median diameter, the largest left out while each is more than `outlier`
    times the typical size of the rest (median_diameter)."""
    diameters = np.sort(diameters)
    if not diameters.size:
        return None
    mass = np.cumsum(diameters**2)  # the k smallest objects' pixels, times 4/pi (area = pi d^2 / 4)

    def typical(k: int) -> float:  # area-weighted median of the k smallest objects
        return float(diameters[np.searchsorted(mass[:k], mass[k - 1] / 2)])

    k = diameters.size
    while k > 1 and diameters[k - 1] > outlier * typical(k - 1):
        k -= 1
    return typical(k)


# In a model's own objects, giant ones are floods when they are at most FLOOD_SHARE of the
# objects while the objects they dwarf still hold at least REST_MASS of the object pixels.
FLOOD_SHARE = 0.1
REST_MASS = 0.25


def predicted_diameter(instances: np.ndarray, outlier: float = 3.0) -> float | None:
    """median_diameter of a model's predicted objects, after leaving out a few floods.

    A model can flood an unlabelled region (a Drosophila embryo's interior) or clumps into a
    handful of giant objects whose pixels outweigh the hundreds of real nuclei beside them;
    the area-weighted median then lands on the floods, inference shrinks the image, the
    objects merge further and the estimate runs away (an embryo of 20-pixel nuclei read as
    85 pixels, its AP50 0.72 at the true size falling to 0). So objects more than `outlier`
    times the typical object by count (the plain median) are left out when they are few and
    the rest are a real population. Otherwise the small ones are specks a poor pass cut
    nuclei into (many, holding few pixels), or the large ones a population of their own, and
    the area-weighted median decides, as it does for annotations.
    """
    diameters = object_diameters(instances)
    if not diameters.size:
        return None
    giant = diameters > outlier * np.median(diameters)
    rest_mass = np.sum(diameters[~giant] ** 2) / np.sum(diameters**2)
    if giant.sum() <= FLOOD_SHARE * diameters.size and rest_mass >= REST_MASS:
        diameters = diameters[~giant]
    return _weighted_median(diameters, outlier)


# An object whose area fills at least this share of its convex hull counts as solid. Nuclei
# seen at the right size are nearly convex (0.95 and up); two merged into one, or one cut
# into pieces by a watershed, are not.
SOLID = 0.9


def solid_fraction(instances: np.ndarray) -> float:
    """The share of object pixels in objects whose solidity (area / convex hull area) is at
    least SOLID; 0.0 without objects. Comparing it across the sizes an image was segmented at
    tells, for convex objects, which size left the fewest merged or fragmented ones."""
    from skimage.measure import regionprops  # only size choices need it: keep startup light

    solid = total = 0
    for region in regionprops(instances.astype(np.int32, copy=False)):
        total += region.area
        if region.solidity >= SOLID:
            solid += region.area
    return solid / total if total else 0.0


def shared_outline(instances: np.ndarray) -> float:
    """The share of object outline that borders another object rather than background; 0.0
    without objects.

    A model shown objects far larger than it learned cuts each into pieces that border one
    another (a quarter to a third of the outline shared); shown them near the trained size
    it outlines nuclei apart (a few percent shared). Comparing it across two sizes an image
    was segmented at tells which one cut objects up. It cannot see merges: merged objects
    share no outline.
    """
    shared = outline = 0
    # Each pair of 4-neighbours whose ids differ is one step of outline for each object in it.
    for a, b in ((instances[1:, :], instances[:-1, :]), (instances[:, 1:], instances[:, :-1])):
        edge = a != b
        touching = edge & (a > 0) & (b > 0)
        outline += int((edge & (a > 0)).sum() + (edge & (b > 0)).sum())
        shared += 2 * int(touching.sum())
    return shared / outline if outline else 0.0


# A model's size head (Preprocessing.size_output) sees the middle of an image at most
# SIZE_CROP pixels a side, rescaled as the model would see it: enough objects to measure in
# any image, one model pass whatever the image's size.
SIZE_CROP = 512


def size_view(planes: np.ndarray, multiple: int) -> np.ndarray:
    """The (C, h, w) middle of rescaled model input `planes` a size head reads: at most SIZE_CROP
    a side, reflect-padded on the bottom and right to a multiple of `multiple`, as tiles are."""
    _, h, w = planes.shape
    top, left = max(0, (h - SIZE_CROP) // 2), max(0, (w - SIZE_CROP) // 2)
    return pad_to_multiple(planes[:, top : top + SIZE_CROP, left : left + SIZE_CROP], multiple)


def scale_for(diameter: float | None, target: float, low: float = 0.25, high: float = 4.0) -> float:
    """The factor that makes objects of `diameter` pixels `target` pixels across (1 if unknown).

    Clamped to [low, high]: an estimate from an image with one speck or one giant blob must
    not blow an image up to gigapixels or shrink it to nothing.
    """
    if not diameter or diameter <= 0 or target <= 0:
        return 1.0
    return float(np.clip(target / diameter, low, high))


def scaled_shape(shape: tuple[int, ...], scale: float) -> tuple[int, int]:
    """(height, width) of an image of `shape` rescaled by `scale` (at least 1 pixel each)."""
    return max(1, round(shape[0] * scale)), max(1, round(shape[1] * scale))


def resize_image(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize an (H, W) or (H, W, C) image to `shape` (h, w), keeping its dtype.

    Area averaging when shrinking (no aliasing), bilinear when enlarging.
    """
    h, w = shape
    if (h, w) == image.shape[:2]:
        return image
    shrinking = h * w < image.shape[0] * image.shape[1]
    out = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    return out[..., None] if image.ndim == 3 and out.ndim == 2 else out  # cv2 drops a lone channel axis


def resize_planes(planes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize channels-first (C, H, W) float32 planes (model input or logits) to `shape` (h, w)."""
    if planes.shape[1:] == tuple(shape):
        return planes
    return np.stack([resize_image(plane, shape) for plane in planes])


def resize_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize an (H, W) integer label image (class or instance ids) by nearest neighbour."""
    h, w = shape
    if (h, w) == labels.shape:
        return labels
    if labels.dtype not in (np.uint8, np.uint16, np.int16, np.int32, np.float32):  # what cv2.resize takes
        raise UserError(
            f"cannot rescale a label image of dtype {labels.dtype}; masks must be 8- or 16-bit "
            "(convert writes them so: re-run `dvc repro convert`)"
        )
    return cv2.resize(labels, (w, h), interpolation=cv2.INTER_NEAREST)
