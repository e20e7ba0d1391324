"""Sliding-window inference: any image size, model memory bounded by `batch_size` tiles.

An image no larger than the tile runs whole (padded to the network's multiple). A larger
image runs as overlapping tiles whose logits are blended with a window that ramps down
toward the tile edges shared with a neighbour, so seams do not show. The model is any
function that maps (N, C, h, w) float32 to (N, K, h, w) float32, as in `Segmenter`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from segflow.errors import UserError


def check_tiling(tile_size: int, overlap: int, multiple: int) -> None:
    """Raise ValueError, saying what to change, when tiles cannot be fed to the network."""
    if tile_size < 0 or tile_size % multiple:
        raise UserError(
            f"inference.tile_size {tile_size} must be a multiple of {multiple} (the network's input "
            f"multiple), e.g. {max(multiple, tile_size // multiple * multiple)}, or 0 for whole images"
        )
    if tile_size and not 0 <= 2 * overlap < tile_size:
        raise UserError(
            f"inference.tile_overlap {overlap} must be >= 0 and less than half of tile_size {tile_size}; "
            f"lower it to at most {(tile_size - 1) // 2} or raise tile_size"
        )


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles covering [0, length), spread evenly, first 0 and last length - tile.

    Args:
        length: size of the image along one axis.
        tile: size of a tile along that axis; when >= length, one tile starting at 0.
        overlap: neighbouring tiles share at least this many pixels (needs overlap < tile).

    Returns:
        Increasing start offsets.
    """
    if length <= tile:
        return [0]
    span = length - tile  # the last start
    count = -(-span // (tile - overlap)) + 1  # fewest tiles whose step is at most tile - overlap
    # floor(i * span / (count - 1)) steps by at most ceil(span / (count - 1)) <= tile - overlap.
    return [i * span // (count - 1) for i in range(count)]


def _window(length: int, tile: int, start: int, overlap: int) -> np.ndarray:
    """(tile,) float64 blending weights: 1, ramping linearly to 1/(overlap+1) at inner edges.

    Edges on the image border keep weight 1: no other tile covers those pixels.
    """
    weight = np.ones(tile)
    ramp = np.arange(1, overlap + 1) / (overlap + 1)  # strictly positive
    if overlap and start > 0:
        weight[:overlap] = ramp
    if overlap and start + tile < length:
        weight[-overlap:] = ramp[::-1]
    return weight


def pad_to_multiple(chw: np.ndarray, multiple: int) -> np.ndarray:
    """Reflect-pad (C, H, W) on the bottom/right so H and W are multiples of `multiple`."""
    _, h, w = chw.shape
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return chw
    mode = "reflect" if ph < h and pw < w else "edge"  # reflect needs pad < size
    return np.pad(chw, ((0, 0), (0, ph), (0, pw)), mode=mode)


def tiled_logits(
    run_batch: Callable[[np.ndarray], np.ndarray],
    inputs: Sequence[np.ndarray],
    tile_size: int,
    overlap: int,
    multiple: int,
    batch_size: int,
) -> list[np.ndarray]:
    """Run the model on whole images or overlapping tiles and return logits at each image's size.

    Model inputs of the same shape (whole images, or tiles from any image) share calls of at
    most `batch_size`. Every call's h and w are multiples of `multiple`.

    Args:
        run_batch: (N, C, h, w) float32 -> (N, K, h, w) float32 logits.
        inputs: (C, H, W) float32 normalised images of any size.
        tile_size: images with H or W above this run as tiles of this size; 0 = never tile.
        overlap: pixels shared by neighbouring tiles and blended over.
        multiple: the network needs h and w to be multiples of this.
        batch_size: most model inputs per call.

    Returns:
        (K, H, W) float32 logits per input.

    Raises:
        ValueError: tile_size is not a multiple of `multiple`, or overlap is too large.
    """
    check_tiling(tile_size, overlap, multiple)
    # One job per model input: (image index, top, left, tile height, tile width). A side no
    # longer than tile_size is one tile of the whole side, padded to `multiple` when run.
    jobs_by_shape: dict[tuple[int, int], list[tuple[int, int, int, int, int]]] = {}
    for i, x in enumerate(inputs):
        _, h, w = x.shape
        th, tw = (h, w) if tile_size == 0 else (min(h, tile_size), min(w, tile_size))
        shape = (-(-th // multiple) * multiple, -(-tw // multiple) * multiple)
        for top in tile_starts(h, th, overlap):
            for left in tile_starts(w, tw, overlap):
                jobs_by_shape.setdefault(shape, []).append((i, top, left, th, tw))

    results: list[np.ndarray | None] = [None] * len(inputs)
    # Tiled images only: float64 so that blending equal values returns them bit for bit.
    sums: dict[int, np.ndarray] = {}  # (K, H, W) float64 weighted logits
    weights: dict[int, np.ndarray] = {}  # (H, W) float64 summed window weights
    for jobs in jobs_by_shape.values():
        for first in range(0, len(jobs), batch_size):
            chunk = jobs[first : first + batch_size]
            crops = [inputs[i][:, top : top + th, left : left + tw] for i, top, left, th, tw in chunk]
            batch = np.stack([pad_to_multiple(c, multiple) for c in crops])  # (n, C, h', w') float32
            out = run_batch(batch)  # (n, K, h', w')
            for (i, top, left, th, tw), logit in zip(chunk, out, strict=True):
                logit = logit[:, :th, :tw]
                _, h, w = inputs[i].shape
                if (th, tw) == (h, w):  # the whole image in one piece: nothing to blend
                    results[i] = np.ascontiguousarray(logit, dtype=np.float32)
                    continue
                if i not in sums:
                    sums[i] = np.zeros((logit.shape[0], h, w))
                    weights[i] = np.zeros((h, w))
                window = np.outer(_window(h, th, top, overlap), _window(w, tw, left, overlap))  # (th, tw)
                sums[i][:, top : top + th, left : left + tw] += logit * window
                weights[i][top : top + th, left : left + tw] += window
    for i, total in sums.items():
        results[i] = (total / weights.pop(i)).astype(np.float32)
    return results  # type: ignore[return-value]
