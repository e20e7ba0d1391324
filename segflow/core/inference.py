"""The one inference path: preprocess -> model -> postprocess.

evaluate, export's parity check, the CLI and the service all go through `Segmenter`, so
what is measured is what is served. The model is anything that maps a (N, C, H, W)
float32 batch to (N, K, H, W) float32 logits: a torch module or an ONNX Runtime session.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np

from segflow.core.instances import drop_small, split_by_class, watershed_instances
from segflow.core.objects import label_instances
from segflow.core.sizes import median_diameter, resize_planes, scale_for, scaled_shape, solid_fraction
from segflow.core.tiling import tiled_logits
from segflow.core.tta import averaged_logits
from segflow.errors import UserError

log = logging.getLogger(__name__)

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
)
# Instance methods whose last model channel seeds a watershed: P(interior) or normalised distance.
SEEDED = ("watershed", "distance")


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
    input_name: str = "image"
    output_name: str = "logits"
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


@dataclass
class Prediction:
    """One image's result at its original size."""

    logits: np.ndarray  # two classes: (H, W) float32 foreground logit; K > 2: (K, H, W)
    probability: np.ndarray  # (H, W) float32 in [0, 1]: P(foreground) = 1 - P(background)
    mask: np.ndarray  # (H, W) uint8 class ids
    instances: np.ndarray  # (H, W) object ids, 0 = background: uint16, uint32 beyond 65,535 objects
    interior: np.ndarray | None = None  # watershed models: (H, W) float32 P(object interior)
    # Distance models: the same seed channel, each pixel's predicted distance to its object's
    # edge relative to the object's deepest point; how high it rises inside an object says how
    # sure the model is of its centre, so objects are scored by it (objects.object_scores).
    # None for watershed models: their interior probability is near 1 inside every object.
    centres: np.ndarray | None = None


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


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function 1 / (1 + exp(-x)), float32, in place on one new array: it runs twice
    per image on every request. OpenCV's vectorised exp took a 256x256 plane in 0.04 ms
    against NumPy's tanh's 0.19, within 1e-7 of float64 (it saturates instead of overflowing,
    so large |x| give exactly 0 or 1)."""
    y = np.negative(x, dtype=np.float32)
    flat = y.reshape(-1)  # a view: OpenCV would read a 3-D array's last axis as channels
    cv2.exp(flat, flat)
    y += 1.0
    np.divide(1.0, y, out=y)
    return y


def to_prediction(logit: np.ndarray, prep: Preprocessing, scale: float = 1.0) -> Prediction:
    """(channels, H, W) logits -> Prediction, post-processed as `prep` says.

    The channels are one foreground logit (two classes) or K class logits, followed by
    one seed logit (interior or distance) when prep.instances is "watershed" or "distance".
    `scale` is the factor the image was resized by for the model (Segmenter.scaled_logits):
    prep.min_area counts pixels at the model's scale (see area_at).
    """
    watershed = prep.instances in SEEDED
    semantic = logit[:-1] if watershed else logit
    probability, mask = semantic_mask(semantic, prep.threshold)
    if watershed:
        interior = sigmoid(logit[-1])
        # Specks go in the same numbering pass; without_small_objects then finds none left,
        # unless split_by_class cuts an object into small pieces.
        min_area = area_at(prep.min_area, scale)
        instances = watershed_instances(
            mask > 0, interior, prep.seed_threshold, max(1, min_area), prep.seed_prominence
        )
        if len(prep.classes) > 2:
            instances = split_by_class(instances, mask)
    else:
        interior, instances = None, label_instances(mask)
    logits = semantic[0] if semantic.shape[0] == 1 else semantic
    centres = interior if prep.instances == "distance" else None
    prediction = Prediction(logits, probability, mask, instances, interior, centres)
    return without_small_objects(prediction, prep.min_area, scale)


def area_at(min_area: int, scale: float) -> int:
    """min_area, counted in pixels at the model's scale, in pixels of an image it saw resized
    by `scale`. A size-normalised model sees every image with its objects train.diameter
    across, so one min_area drops the same specks, relative to the objects, at any
    magnification: cells imaged at 0.6x lose no more to it than cells at full size."""
    return max(1, round(min_area / scale**2)) if min_area > 0 else 0


def without_small_objects(prediction: Prediction, min_area: int, scale: float = 1.0) -> Prediction:
    """The prediction with objects under `min_area` pixels (at the model's scale, see area_at)
    removed from its instances and mask."""
    min_area = area_at(min_area, scale)
    if min_area <= 0:
        return prediction
    instances = drop_small(prediction.instances, min_area)
    mask = prediction.mask * (instances > 0)  # uint8: class ids where an object is left
    return replace(prediction, instances=instances, mask=mask)


def semantic_mask(logit: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(K, H, W) class logits (K = 1 for two classes) -> P(foreground) and the class-id mask.

    A pixel is foreground when P(foreground) = 1 - P(background) exceeds the threshold; with
    more than two classes it then takes the most probable foreground class.

    Returns:
        (H, W) float32 probability and (H, W) uint8 class ids.
    """
    if logit.shape[0] == 1:
        probability = sigmoid(logit[0])
        return probability, (probability > threshold).astype(np.uint8)
    probabilities = softmax(logit)  # (K, H, W)
    foreground = (1.0 - probabilities[0]).astype(np.float32)
    classes = (np.argmax(probabilities[1:], axis=0) + 1).astype(np.uint8)
    return foreground, np.where(foreground > threshold, classes, 0).astype(np.uint8)


def softmax(logit: np.ndarray) -> np.ndarray:
    """Softmax over axis 0 of (K, H, W) logits, float32."""
    shifted = np.exp(logit - logit.max(axis=0, keepdims=True))
    return (shifted / shifted.sum(axis=0, keepdims=True)).astype(np.float32)


# Model passes at most per image whose object size is estimated (inference.diameter: auto).
# Most images settle after one or two; objects several times the trained size are measured a
# little larger each pass (a model sees them only in part), and three passes left the dsb
# subset's 96-pixel nuclei at half their size, cut in pieces; five brought them to three
# quarters, where the model sees them whole. An estimate that swings (neighbours merged at one
# size, apart at the next) spends all five and keeps the last; inference.diameter_choices is
# the check for that.
SIZE_PASSES = 5


class Segmenter:
    """Segments images with any backend that maps (N, C, H, W) -> (N, K, H, W) logits."""

    def __init__(
        self, run_batch: Callable[[np.ndarray], np.ndarray], prep: Preprocessing, batch_size: int = 8
    ):
        self._run_batch = run_batch
        self.prep = prep
        self.batch_size = batch_size
        # Size-normalised models enlarge images of small objects (up to 4x per side); the service
        # sets this to serve.max_pixels so no request grows past what it would accept.
        self.max_pixels = 0  # 0 = no limit

    @classmethod
    def from_onnx(
        cls, model_path: str | Path, prep: Preprocessing | str | Path, threads: int = 0
    ) -> Segmenter:
        """Open an ONNX model with ONNX Runtime on the CPU.

        Args:
            model_path: model.onnx.
            prep: a Preprocessing, or the path of its preprocessing.json.
            threads: intra-op threads; 0 lets ONNX Runtime decide.
        """
        import onnxruntime as ort

        if not isinstance(prep, Preprocessing):
            prep = Preprocessing.load(prep)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        # Idle worker threads sleep instead of spinning: the service decodes, post-processes
        # and answers requests on the same cores while the model runs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])

        def run(batch: np.ndarray) -> np.ndarray:
            return session.run([prep.output_name], {prep.input_name: batch})[0]

        return cls(run, prep)

    def logits(
        self, images: Sequence[np.ndarray], diameters: Sequence[float | None] | None = None
    ) -> list[np.ndarray]:
        """Raw images -> (channels, H, W) float32 logits each, at each image's own size
        (scaled_logits without the scales)."""
        return self.scaled_logits(images, diameters)[0]

    def scaled_logits(
        self, images: Sequence[np.ndarray], diameters: Sequence[float | None] | None = None
    ) -> tuple[list[np.ndarray], list[float]]:
        """Raw images -> (channels, H, W) float32 logits each, at each image's own size, and
        the factor each image was resized by for the model (1.0 at native scale).

        A model trained at one object size (prep.train_diameter) sees every image rescaled so
        its objects have that size: `diameters` gives each image's object diameter in pixels
        (None for an image: prep.diameter decides, a number or "auto", estimated by a first
        pass). The logits are resized back, so post-processing runs at the original size.

        Images larger than prep.tile_size run as overlapping tiles blended together, so memory
        stays bounded whatever the image size. Whole images of one padded shape, and tiles,
        share model calls up to batch_size. prep.tta averages flipped or rotated views.
        """
        prep = self.prep
        inputs = [normalize(image, prep) for image in images]
        if not prep.train_diameter:
            return self._model_logits(inputs), [1.0] * len(inputs)
        given = list(diameters) if diameters is not None else [None] * len(inputs)
        if len(given) != len(inputs):
            raise UserError(f"{len(given)} diameters for {len(inputs)} images; give one per image")
        bad = [d for d in given if d is not None and not 0 < d < float("inf")]
        if bad:
            raise UserError(f"diameter {bad[0]} is not a positive number of pixels (the objects' diameter)")
        given = [d if d is not None else _fixed_diameter(prep.diameter) for d in given]
        guess = scale_for(prep.data_diameter, prep.train_diameter)
        scales = [scale_for(d, prep.train_diameter) if d else guess for d in given]
        logits = self._scaled_logits(inputs, scales)
        unknown = [i for i, d in enumerate(given) if not d]
        if unknown:
            self._rerun_at_estimated_sizes(inputs, logits, scales, unknown)
            if len(prep.diameter_choices) > 1:
                self._choose_sizes(inputs, logits, scales, unknown)
        return logits, [self._applied_scale(x.shape[1:], s) for x, s in zip(inputs, scales, strict=True)]

    def _rerun_at_estimated_sizes(
        self, inputs: list[np.ndarray], logits: list[np.ndarray], scales: list[float], which: list[int]
    ) -> None:
        """Measure the objects of images `which` in their first-pass logits (run at the scale
        `guess`) and replace those logits by a run at the scale the measurement implies, where
        it differs from the last run's by more than 10%; measure again, up to SIZE_PASSES
        passes in all. A model sees objects far from its size poorly, so a first pass
        underestimates big objects (it splits them) and one correction can stop short; the
        measurement converges as the objects approach the trained size. Scales stay within 4x
        of `guess`, so a poor pass cannot blow an image up or shrink it away. `logits` and
        `scales` (each image's, the first pass's `guess` for those in `which`) are updated."""
        prep = self.prep
        guess = scale_for(prep.data_diameter, prep.train_diameter)
        pending = list(which)
        for _ in range(SIZE_PASSES - 1):
            wanted = {}
            for i in pending:
                applied = self._applied_scale(inputs[i].shape[1:], scales[i])
                found = median_diameter(to_prediction(logits[i], prep, applied).instances)
                scale = scale_for(found, prep.train_diameter) if found else scales[i]
                wanted[i] = float(np.clip(scale, guess / 4, guess * 4))
                log.debug("image %d: objects about %s px across, scale %.3f", i, found, wanted[i])
            # Within 10% another pass is not worth its cost: the scale augmentation in training
            # covers more than that.
            pending = [i for i in pending if abs(wanted[i] / scales[i] - 1) > 0.1]
            if not pending:
                return
            rerun = self._scaled_logits([inputs[i] for i in pending], [wanted[i] for i in pending])
            for i, logit in zip(pending, rerun, strict=True):
                logits[i], scales[i] = logit, wanted[i]

    def _choose_sizes(
        self, inputs: list[np.ndarray], logits: list[np.ndarray], scales: list[float], which: list[int]
    ) -> None:
        """Segment images `which` again as if their estimated diameter were each multiple in
        prep.diameter_choices, and keep the run whose objects are most solid (solid_fraction).

        The estimate is read off the model's own objects, so its errors feed themselves: a
        first pass that merges neighbours reads them as large, shrinks the image and merges
        more. A check from outside the estimate breaks that loop. One model pass per
        multiple besides 1.0; ties keep the estimate. `logits` and `scales` are updated in
        place."""
        prep = self.prep
        guess = scale_for(prep.data_diameter, prep.train_diameter)

        def solidity(i: int, logit: np.ndarray, scale: float) -> float:
            applied = self._applied_scale(inputs[i].shape[1:], scale)
            return solid_fraction(to_prediction(logit, prep, applied).instances)

        estimated = {i: scales[i] for i in which}
        best = {i: solidity(i, logits[i], scales[i]) for i in which}
        for multiple in prep.diameter_choices:
            if multiple == 1.0:
                continue
            # A diameter `multiple` times larger means objects need `multiple` times less enlarging.
            tried = [float(np.clip(estimated[i] / multiple, guess / 4, guess * 4)) for i in which]
            rerun = self._scaled_logits([inputs[i] for i in which], tried)
            for i, logit, scale in zip(which, rerun, tried, strict=True):
                score = solidity(i, logit, scale)
                if score > best[i]:
                    best[i], logits[i], scales[i] = score, logit, scale
        for i in which:
            log.debug(
                "image %d: scale %.3f chosen, %.0f%% of object pixels solid", i, scales[i], 100 * best[i]
            )

    def _scaled_logits(self, inputs: list[np.ndarray], scales: list[float]) -> list[np.ndarray]:
        """Model logits of (C, H, W) inputs each rescaled by its factor, resized back to its size."""
        scaled = [
            resize_planes(x, self._scaled_shape(x.shape[1:], s)) for x, s in zip(inputs, scales, strict=True)
        ]
        out = self._model_logits(scaled)
        return [resize_planes(y, x.shape[1:]) for x, y in zip(inputs, out, strict=True)]

    def _applied_scale(self, shape: tuple[int, int], scale: float) -> float:
        """The factor an image of `shape` is actually resized by for `scale` (area ratio, root)."""
        h, w = self._scaled_shape(shape, scale)
        return ((h * w) / (shape[0] * shape[1])) ** 0.5

    def _scaled_shape(self, shape: tuple[int, int], scale: float) -> tuple[int, int]:
        """scaled_shape, enlarging no further than max_pixels allows (shrinking is never limited)."""
        if self.max_pixels and scale > 1:
            scale = max(1.0, min(scale, (self.max_pixels / (shape[0] * shape[1])) ** 0.5))
        return scaled_shape(shape, scale)

    def _model_logits(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """(C, H, W) model inputs -> (K, H, W) logits: tiled, averaged over prep.tta's views."""
        prep = self.prep

        def run(batch: list[np.ndarray]) -> list[np.ndarray]:
            return tiled_logits(
                self._run_batch, batch, prep.tile_size, prep.tile_overlap, prep.pad_multiple, self.batch_size
            )

        return run(inputs) if prep.tta == "none" else averaged_logits(run, inputs, prep.tta)

    def predict(
        self,
        images: Sequence[np.ndarray],
        threshold: float | None = None,
        diameters: Sequence[float | None] | None = None,
    ) -> list[Prediction]:
        """Raw images -> Prediction (probability and thresholded class-id mask) each.

        A pixel is foreground when P(foreground) exceeds the threshold; with more than two
        classes it then takes the most probable foreground class. `diameters` as in logits().
        """
        prep = self.prep if threshold is None else replace(self.prep, threshold=threshold)
        logits, scales = self.scaled_logits(images, diameters)
        return [to_prediction(logit, prep, scale) for logit, scale in zip(logits, scales, strict=True)]

    def predict_one(self, image: np.ndarray, diameter: float | None = None) -> Prediction:
        return self.predict([image], diameters=[diameter])[0]


def _fixed_diameter(setting: float | str) -> float | None:
    """prep.diameter as a number of pixels, or None for "auto"."""
    if setting == "auto":
        return None
    try:
        value = float(setting)
    except (TypeError, ValueError):
        raise UserError(f"diameter {setting!r} must be auto or a number of pixels") from None
    if not value > 0:
        raise UserError(f"diameter {setting!r} must be a positive number of pixels, or auto")
    return value
