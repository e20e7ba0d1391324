"""Samples: one canonical image with its class-id mask and (when known) instance ids, as the
split manifests list them. Training, evaluation and extra evaluation sets all read these."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from segflow.core.images import read_image


@dataclass
class Sample:
    id: str
    image: np.ndarray  # (H, W) or (H, W, C) uint8/uint16, as stored
    mask: np.ndarray  # (H, W) uint8 class ids
    instances: np.ndarray | None = None  # (H, W) uint16 object ids, when the dataset has them


def load_samples(manifest: pd.DataFrame, root: Path) -> list[Sample]:
    """Read the canonical images, semantic masks and (when known) instance ids a split manifest lists."""
    return [
        Sample(row.id, read_image(root / row.image), read_image(root / row.mask), _instances(row, root))
        for row in manifest.itertuples()
    ]


def _instances(row, root: Path) -> np.ndarray | None:
    name = getattr(row, "instances", "")
    return read_image(root / name) if isinstance(name, str) and name else None
