"""Image -> model input, and the contract that says how: `Preprocessing`.

The contract is saved as preprocessing.json beside model.onnx (and inside the torch
checkpoint), so training, evaluation, the CLI and the service scale, convert and
standardise every image the same way (segflow.core.inference runs the model).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from segflow.errors import UserError

PREPROCESSING_VERSION = 1
# What evaluate may choose after training (params.inference, tuned on val): how logits become
# objects, how large images are tiled, how object size is found and which views are averaged.
# The network's inputs and outputs stay as trained.
POSTPROCESS_FIELDS = (
    "threshold",
    "seed_threshold",
    "seed_prominence",
    "min_area",
    "tile_size",
    "tile_overlap",
    "diameter",
    "diameter_choices",
    "tta",
    "object_score",
)


@dataclass(frozen=True)
class Preprocessing:
    """Everything needed to turn an image into model input and logits into a mask.

    Saved as preprocessing.json beside model.onnx, and inside the torch checkpoint.
    """

    in_channels: int
    mean: float
    std: float
    pad_multiple: int
    threshold: float
    classes: list[str] = field(default_factory=lambda: ["background", "cell"])
    # Intensity scaling to [0, 1] (base.intensity). The defaults reproduce models exported
    # before these fields existed: divide by the dtype's range.
    scaling: str = "range"  # range | percentile | auto (range for uint8, else percentile)
    low: float = 1.0  # percentile scaling: these per-image percentiles map to 0 and 1
    high: float = 99.8
    # Objects (inference.* in params.yaml). The defaults reproduce older models: connected
    # components of the mask, whole-image inference.
    # components | watershed (the last channel is P(interior) logits) | distance (the last channel
    # is each object pixel's distance to the object's edge, divided by the object's largest)
    instances: str = "components"
    seed_threshold: float = 0.5  # watershed, distance: last-channel value above which a pixel seeds an object
    # watershed, distance: 0 = each region above seed_threshold seeds one object; above 0, each
    # peak of the last channel rising this far above its pass to a higher peak does (h-maxima)
    seed_prominence: float = 0.0
    min_area: int = 0  # objects smaller than this many pixels are dropped
    tile_size: int = 0  # images larger than this run as overlapping tiles; 0 = whole images
    tile_overlap: int = 0
    # Object size (segflow.core.sizes). The defaults reproduce older models: native scale.
    train_diameter: float = 0.0  # the network learned objects this many pixels across; 0 = native scale
    data_diameter: float = 0.0  # the training images' median object diameter as stored (auto's first guess)
    diameter: float | str = "auto"  # objects' diameter in the input images, or auto: estimate per image
    # auto: multipliers of the estimate also tried; the most solid objects win ([1.0]: the estimate)
    diameter_choices: list[float] = field(default_factory=lambda: [1.0])
    tta: str = "none"  # test-time augmentation: none | flips | d4 (segflow.core.tta)
    # Distance models: a logistic regression over each object's features (segflow.core.objects)
    # that ranks objects, fitted on validation with inference.learned_score; None: the rule.
    object_score: dict | None = None
    input_name: str = "image"
    output_name: str = "logits"
    # The model's size head, if it has one: the output giving each input's log(object diameter
    # as shown / train_diameter), where diameter auto refines sizes from a second start
    # (segflow.core.inference). "" = no size head (models before it, or train.size_head false).
    size_output: str = ""
    version: int = PREPROCESSING_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    def with_postprocess(self, values: dict) -> Preprocessing:
        """A copy with the POSTPROCESS_FIELDS found in `values` (params.inference or postprocess.json)."""
        return replace(self, **{k: values[k] for k in POSTPROCESS_FIELDS if k in values})

    @classmethod
    def from_dict(cls, data: dict) -> Preprocessing:
        if data.get("version") != PREPROCESSING_VERSION:
            raise UserError(
                f"preprocessing version {data.get('version')} is not supported "
                f"(expected {PREPROCESSING_VERSION}); re-run `dvc repro export`"
            )
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Preprocessing:
        return cls.from_dict(json.loads(Path(path).read_text()))


def to_unit_range(image: np.ndarray) -> np.ndarray:
    """Scale intensities to [0, 1] float32 by the dtype's range.

    Raises:
        ValueError: float input with NaN/inf, or an unsupported dtype.
    """
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    if image.dtype == np.uint16:
        return image.astype(np.float32) / 65535.0
    if np.issubdtype(image.dtype, np.floating):
        if not np.isfinite(image).all():
            raise UserError("image contains NaN or infinite values")
        return np.clip(image.astype(np.float32), 0.0, 1.0)
    raise UserError(f"unsupported image dtype {image.dtype}; use uint8, uint16 or float in [0, 1]")


def scale_intensity(image: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """Raw intensities -> float32 on a [0, 1] scale, as `prep` says (training and inference alike).

    Percentile scaling maps each image's `low` and `high` percentiles to 0 and 1 (values
    beyond stay beyond), so dim 16-bit microscopy uses the whole input range.
    """
    method = prep.scaling
    if method == "auto":
        method = "range" if image.dtype == np.uint8 else "percentile"
    if method == "range":
        return to_unit_range(image)
    unit = to_unit_range(image)  # validates the dtype and finiteness first
    flat = unit.ravel()
    flat = flat[:: max(1, flat.size // 2**20)]  # a 1M-pixel sample estimates the percentiles closely
    lo, hi = np.percentile(flat, [prep.low, prep.high])
    return ((unit - lo) / max(float(hi - lo), 1e-6)).astype(np.float32)


def to_channels(image: np.ndarray, in_channels: int) -> np.ndarray:
    """(H, W) or (H, W, C) -> (in_channels, H, W), converting gray <-> RGB as needed."""
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[2] == 4:
        image = image[..., :3]
    if image.shape[2] not in (1, 3):
        raise UserError(f"image has {image.shape[2]} channels; expected 1, 3 or 4")
    if in_channels == 1 and image.shape[2] == 3:
        image = image @ np.array([0.299, 0.587, 0.114], np.float32)
        image = image[..., None]
    elif in_channels == 3 and image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image.transpose(2, 0, 1))


def normalize(image: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """Raw image -> (C, H, W) float32 model input at the original size (no padding)."""
    return standardize(scale_intensity(image, prep), prep)


def standardize(unit: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """Image already scaled by scale_intensity -> (C, H, W) float32 model input."""
    chw = to_channels(unit, prep.in_channels)
    return ((chw - prep.mean) / prep.std).astype(np.float32)
