"""Test-time augmentation: average the logits of flipped and rotated views of each image.

Cells and nuclei have no preferred orientation, so the model's answer for a flipped image,
flipped back, is another estimate of the same map; averaging them smooths out errors that
depend on orientation (mostly along boundaries between touching objects). Each view costs one
more model pass: `flips` is 3 views, `d4` (every flip and quarter turn) 8.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from segflow.errors import UserError

# A view is (k quarter turns, flip left-right) applied to (C, H, W) planes; undone in reverse.
VIEWS: dict[str, list[tuple[int, bool]]] = {
    "none": [(0, False)],
    "flips": [(0, False), (0, True), (2, True)],  # identity, left-right, up-down (= half turn + left-right)
    "d4": [(k, flip) for k in range(4) for flip in (False, True)],
}


def check_tta(mode: str) -> None:
    """Raise UserError, listing the modes, unless `mode` is one of VIEWS."""
    if mode not in VIEWS:
        raise UserError(f"unknown test-time augmentation {mode!r}; choose one of: {', '.join(VIEWS)}")


def _apply(planes: np.ndarray, turns: int, flip: bool) -> np.ndarray:
    out = np.rot90(planes, turns, axes=(1, 2))
    return np.ascontiguousarray(out[:, :, ::-1] if flip else out)


def _undo(planes: np.ndarray, turns: int, flip: bool) -> np.ndarray:
    out = planes[:, :, ::-1] if flip else planes
    return np.ascontiguousarray(np.rot90(out, -turns, axes=(1, 2)))


def averaged_logits(
    run: Callable[[list[np.ndarray]], list[np.ndarray]], inputs: list[np.ndarray], mode: str
) -> list[np.ndarray]:
    """The mean over the views of `mode` of run(view of inputs), each mapped back.

    Args:
        run: (C, H, W) model inputs -> (K, H, W) logits each (e.g. tiled inference).
        inputs: the model inputs.
        mode: none | flips | d4.
    """
    check_tta(mode)
    views = VIEWS[mode]
    total: list[np.ndarray] | None = None
    for turns, flip in views:
        outputs = run([_apply(x, turns, flip) for x in inputs])
        back = [_undo(y, turns, flip) for y in outputs]
        total = back if total is None else [t + b for t, b in zip(total, back, strict=True)]
    return [(t / len(views)).astype(np.float32) for t in total]
