"""One typed view of params.yaml.

Every stage calls `load_params()` first, so a typo or an impossible value fails before any
work runs, with the key's path and what is allowed (pydantic models, `extra="forbid"`).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from segflow.errors import UserError
from segflow.paths import repo_root
from segflow.serve.settings import ServeParams, read_params_file

PARAMS_FILE = "params.yaml"


class ParamsError(UserError):
    """params.yaml is missing, unreadable or invalid; the message names every bad key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Normalize(_Section):
    mean: float = 0.5
    std: float = Field(0.25, gt=0)


class Intensity(_Section):
    """How raw intensities become [0, 1] before `normalize` (saved in preprocessing.json)."""

    # range: divide by the dtype's maximum (255, 65535). percentile: per image, map the
    # `low` and `high` percentiles to 0 and 1, which suits 16-bit microscopy whose signal
    # fills a small part of the range. auto: range for 8-bit images, percentile otherwise.
    scaling: Literal["auto", "range", "percentile"] = "auto"
    low: float = Field(1.0, ge=0, lt=50)
    high: float = Field(99.8, gt=50, le=100)


class BaseParams(_Section):
    seed: int = 42
    classes: list[str] = ["background", "cell"]
    in_channels: Literal[1, 3] = 1
    intensity: Intensity = Intensity()
    normalize: Normalize = Normalize()
    pad_multiple: int = Field(32, ge=1)

    @field_validator("classes")
    @classmethod
    def _background_and_more(cls, classes: list[str]) -> list[str]:
        if len(classes) < 2:
            raise ValueError(
                f"got {len(classes)} class(es) {classes}; name the background first and at least "
                "one foreground class, e.g. [background, cell]"
            )
        if len(set(classes)) != len(classes):
            raise ValueError(f"class names must be unique, got {classes}")
        if len(classes) > 255:
            raise ValueError(f"at most 255 classes are supported (masks are 8-bit), got {len(classes)}")
        return classes


INGEST_FORMATS = ("folder", "coco", "cvat", "numpy")


class IngestParams(_Section):
    format: Literal["folder", "coco", "cvat", "numpy"] = "folder"
    source: str = "data"
    image_dir: str = "images"
    mask_dir: str = "masks"
    image_glob: str = "*"  # folder, cvat: which files in image_dir are images (e.g. "*_img.tif")
    mask_glob: str = "*"  # ... and in mask_dir are masks
    image_stem_suffix: str = ""  # folder, cvat: removed from image names before pairing ("_img")
    mask_stem_suffix: str = ""  # folder, cvat: removed from mask names before pairing ("_masks")
    annotations: str | None = None
    labelmap: str | None = None  # cvat: CVAT's labelmap.txt, relative to source
    palette: dict[str, list[int]] | None = None  # cvat: or class name -> [r, g, b] here
    arrays: str | None = None  # numpy: an .npz with `images` and `masks`, relative to source
    on_error: Literal["fail", "skip"] = "fail"
    # folder, numpy: what mask pixels hold; coco (instances) and cvat (class colours) decide it themselves
    mask_kind: Literal["instance", "semantic"] = "instance"
    mask_values: list[int] | None = None
    min_images: int = Field(10, ge=1)

    @field_validator("format", mode="before")
    @classmethod
    def _known_format(cls, value):
        if value not in INGEST_FORMATS:
            raise ValueError(f"unknown format {value!r}; choose one of: {', '.join(INGEST_FORMATS)}")
        return value

    @field_validator("palette")
    @classmethod
    def _rgb_colours(cls, palette: dict[str, list[int]] | None) -> dict[str, list[int]] | None:
        for name, colour in (palette or {}).items():
            if len(colour) != 3 or not all(0 <= c <= 255 for c in colour):
                raise ValueError(f"{name}: {colour} is not an RGB colour; use [r, g, b] with values 0-255")
        colours = [tuple(c) for c in (palette or {}).values()]
        if len(set(colours)) != len(colours):
            raise ValueError("two classes share one colour; each class needs its own")
        return palette

    @model_validator(mode="after")
    def _format_needs(self) -> IngestParams:
        if self.format == "coco":
            if not self.annotations:
                raise ValueError("format 'coco' needs annotations: the JSON file, relative to source")
            if self.mask_kind != "instance":
                raise ValueError("format 'coco' yields instance masks; leave mask_kind as 'instance'")
        if self.format == "cvat":
            if self.labelmap and self.palette:
                raise ValueError("format 'cvat': set labelmap or palette, not both")
            if self.mask_values is not None:
                raise ValueError("format 'cvat': masks are colours mapped by the palette; remove mask_values")
        if self.format == "numpy" and not self.arrays:
            raise ValueError(
                "format 'numpy' needs arrays: an .npz holding `images` (N, H, W[, C]) and `masks` "
                "(N, H, W), relative to source (for one .npy file per image use format 'folder')"
            )
        return self

    @model_validator(mode="after")
    def _values_match_kind(self) -> IngestParams:
        if self.mask_kind == "semantic" and not self.mask_values and self.format != "cvat":
            raise ValueError(
                "mask_kind 'semantic' needs mask_values, the raw values allowed in masks "
                "(for example [0, 255])"
            )
        return self


class ConvertParams(_Section):
    foreground_values: list[int] | None = None  # two classes: raw values meaning the foreground class
    class_values: dict[str, list[int]] | None = None  # more classes: class name -> its raw values


class SplitParams(_Section):
    train: float = Field(0.7, gt=0, lt=1)
    val: float = Field(0.2, gt=0, lt=1)
    test: float = Field(0.1, gt=0, lt=1)
    group_regex: str | None = None
    group_column: str | None = None
    stratify: bool = False
    split_file: str | None = None

    @field_validator("group_regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return value

    @model_validator(mode="after")
    def _one_grouping(self) -> SplitParams:
        if self.group_regex is not None and self.group_column is not None:
            raise ValueError("set group_regex or group_column, not both")
        if self.split_file is not None and self.stratify:
            raise ValueError("stratify does not apply with split_file (the file decides every split)")
        return self

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitParams:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(
                f"train + val + test must sum to 1, got {self.train} + {self.val} + {self.test} = {total:g}"
            )
        return self


class Distributed(_Section):
    """Data-parallel training under torchrun (segflow.train.distributed)."""

    nproc: int = Field(1, ge=1, le=256)  # processes on this machine; above 1 the stage runs under torchrun
    # The loop trains on the CPU, so gloo; nccl would need the model and batches on GPUs.
    backend: Literal["auto", "gloo"] = "auto"


class Augment(_Section):
    hflip: float = Field(0.5, ge=0, le=1)
    vflip: float = Field(0.5, ge=0, le=1)
    rotate90: float = Field(0.5, ge=0, le=1)
    brightness_contrast: float = Field(0.5, ge=0, le=1)
    gauss_noise: float = Field(0.2, ge=0, le=1)
    scale: float = Field(0.0, ge=0, lt=1)  # random rescale by a factor in [1 - scale, 1 + scale]; 0 = off
    downscale: float = Field(0.0, ge=0, le=1)  # probability of shrinking an image and enlarging it back


class TrainParams(_Section):
    architecture: str = "Unet"
    encoder: str = "resnet18"
    encoder_weights: str | None = None
    decoder_channels: list[int] = [128, 64, 32, 16, 16]
    members: int = Field(1, ge=1, le=8)  # a seed ensemble: networks averaged (segflow.train.ensemble)
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(0.003, gt=0)
    weight_decay: float = Field(0.0001, ge=0)
    dice_weight: float = Field(0.5, ge=0, le=1)
    crop_size: int | None = Field(192, ge=32)
    crops_per_image: int = Field(1, ge=1)  # random crops per training image per epoch (large images: more)
    # How an epoch's crops are dealt over the images (segflow.train.dataset.crop_order): "uniform",
    # crops_per_image from each; "contacts", one from each and the rest in proportion to each
    # image's pixels where two objects touch, since that is where instance models merge neighbours.
    crop_sampling: Literal["uniform", "contacts"] = "uniform"
    threads: int = Field(2, ge=1)
    # How the loop computes (segflow.train.precision): bfloat16 autocast where the CPU has it.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    channels_last: bool = True
    distributed: Distributed = Distributed()
    augment: Augment = Augment()
    # What happens between epochs.
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    early_stopping: int = Field(0, ge=0)  # epochs without a better val Dice before stopping; 0 = never
    deterministic: bool = True  # seeded, deterministic kernels: a resumed run ends like an uninterrupted one
    interior_margin: int = Field(2, ge=1)  # watershed target: pixels this close to an edge are not interior
    # Watershed and distance models: pixels within interior_margin of two objects (where touching
    # neighbours meet, or the narrow gap between them) weigh 1 + border_weight in the pixel loss.
    border_weight: float = Field(0.0, ge=0)
    # An exponential moving average of the weights, updated every step (segflow.train.averaging);
    # validation, checkpoints and export use it. 0 = off; 0.95-0.999 usual (steps per epoch:
    # training images x crops_per_image / batch_size).
    ema_decay: float = Field(0.0, ge=0, lt=1)
    # Size normalisation: every training image is rescaled so its median object is this many
    # pixels across, and inference rescales to match (inference.diameter); null = native scale.
    diameter: float | None = Field(None, gt=0)
    # With diameter: after training, fit a size head (segflow.train.sizehead), a second start
    # for inference.diameter auto's size estimate.
    size_head: bool = True

    @model_validator(mode="after")
    def _rescaling_needs_crops(self) -> TrainParams:
        # Rescaled images differ in size and are no multiple of 32: only crops batch them.
        if self.crop_size is None and (self.diameter or self.augment.scale):
            raise ValueError(
                "train.diameter and train.augment.scale rescale images to sizes that do not stack "
                "into batches; set train.crop_size (e.g. 256) or turn both off"
            )
        return self

    @model_validator(mode="after")
    def _batch_splits_over_processes(self) -> TrainParams:
        nproc = self.distributed.nproc
        if self.batch_size % nproc:
            raise ValueError(
                f"batch_size {self.batch_size} does not split evenly over distributed.nproc {nproc} "
                f"processes; make it a multiple of {nproc} (each process takes an equal share of every batch)"
            )
        return self

    @field_validator("decoder_channels")
    @classmethod
    def _five_decoder_stages(cls, channels: list[int]) -> list[int]:
        if len(channels) != 5 or min(channels) < 1:
            raise ValueError(f"need 5 positive channel counts, one per decoder stage, got {channels}")
        return channels

    @field_validator("crop_size")
    @classmethod
    def _crop_fits_the_network(cls, crop: int | None) -> int | None:
        if crop is not None and crop % 32:
            raise ValueError(
                f"{crop} is not a multiple of 32 (the encoder halves it 5 times); try {crop // 32 * 32 or 32}"
            )
        return crop

    @field_validator("encoder_weights")
    @classmethod
    def _weights_are_local(cls, value: str | None) -> str | None:
        # Named weights ("imagenet") download at run time, which this project never does
        # by default: the user must point at a file they fetched themselves.
        if value is not None and not value.endswith((".pth", ".pt", ".safetensors")):
            raise ValueError(
                f"{value!r} would be downloaded; use null (random init) or the path of a "
                "weights file you downloaded yourself (.pth, .pt or .safetensors)"
            )
        return value


def _diameter_multipliers(choices: list[float]) -> list[float]:
    """Sorted, distinct multipliers of an estimated diameter (1.0: the estimate itself)."""
    if not choices or not all(0.25 <= m <= 4 for m in choices):
        raise ValueError(
            f"need one or more multipliers of the estimated diameter between 0.25 and 4, e.g. [1.0] "
            f"(the estimate), [0.85] or [0.7, 0.85, 1.0, 1.2]; got {choices}"
        )
    return sorted(set(choices))


def extra_size_passes(choices: list[float]) -> int:
    """Model passes diameter_choices adds to the estimate's own: one per multiple but 1.0."""
    return len([m for m in choices if m != 1.0])


class InferenceParams(_Section):
    """Probability maps -> objects, saved in preprocessing.json: evaluate, CLI and service agree."""

    # watershed: the network also predicts object interiors, which seed a watershed that
    # splits touching objects; components: connected components of the mask; auto:
    # watershed when the dataset has instance ids (instance masks, COCO), else components.
    # distance: like watershed, but the extra output is each pixel's distance to its object's
    # edge (relative to the object's deepest point), which seeds and floods the watershed.
    instances: Literal["auto", "watershed", "distance", "components"] = "auto"
    threshold: float = Field(0.5, gt=0, lt=1)  # P(foreground) above which a pixel belongs to an object
    seed_threshold: float = Field(
        0.5, gt=0, lt=1
    )  # watershed, distance: seed channel value above which pixels seed objects
    # watershed, distance: 0 = every connected region above seed_threshold is one seed; above
    # 0 = every peak of the seed channel (above seed_threshold) rising at least this far above
    # the pass to a higher peak is one (h-maxima): touching objects whose seed regions join
    # still get one seed each. Costs about 60 ms per 512x512 image.
    seed_prominence: float = Field(0.0, ge=0, lt=1)
    min_area: int = Field(0, ge=0)  # objects smaller than this many pixels (at the model's scale) are dropped
    tile_size: int = Field(512, ge=0)  # larger images run as overlapping tiles of this size; 0 = whole images
    tile_overlap: int = Field(64, ge=0)
    # Models trained with train.diameter: the objects' diameter in the images to segment, in
    # pixels, or auto (estimated per image by a first pass). Ignored at native scale.
    diameter: Literal["auto"] | float = "auto"
    # With diameter auto: multipliers of each image's estimated diameter it is segmented at.
    # One: that size ([0.85]: as if objects were 0.85x the estimate; the estimate reads the
    # model's outlines, which run a little wide). Several: the one whose objects are most
    # convex wins (segflow.core.sizes.solid_fraction); for convex objects (nuclei) a wrong
    # size merges neighbours or cuts objects, both concave. [1.0]: the estimate as it is;
    # each multiplier but 1.0 costs one model pass.
    diameter_choices: list[float] = [1.0]
    # What tune tries on val (then diameter_choices is unused).
    diameter_choices_grid: list[list[float]] = [[1.0]]
    tta: Literal["none", "flips", "d4"] = "none"  # test-time augmentation (used as is when tune is false)
    tta_grid: list[Literal["none", "flips", "d4"]] = ["none"]  # what tune tries on val (then tta is unused)
    tune: bool = True  # evaluate picks threshold, seed_threshold and min_area on the validation split
    threshold_grid: list[float] = [0.4, 0.5, 0.6]
    seed_threshold_grid: list[float] = [0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
    seed_prominence_grid: list[float] = [0.0]  # e.g. [0, 0.1, 0.2]: 0 compares threshold seeds
    min_area_grid: list[int] = [0, 16, 32, 64]
    tune_metric: Literal["ap", "ap50", "dice"] = "ap"  # ap = COCO mask AP50:95
    # Distance models, with tune: after the thresholds are chosen, fit a logistic regression on
    # the validation objects (matched to an annotated one at IoU 0.5 or not) over features the
    # maps give (segflow.core.objects.SCORE_FEATURES) and rank objects by it: AP pools objects
    # over images, so a confident false object anywhere costs. false: the distance rule.
    learned_score: bool = False

    @field_validator("threshold_grid", "seed_threshold_grid")
    @classmethod
    def _probabilities(cls, grid: list[float]) -> list[float]:
        if not grid or not all(0 < v < 1 for v in grid):
            raise ValueError(f"need at least one probability strictly between 0 and 1, got {grid}")
        return sorted(set(grid))

    @field_validator("seed_prominence_grid")
    @classmethod
    def _prominences(cls, grid: list[float]) -> list[float]:
        if not grid or not all(0 <= v < 1 for v in grid):
            raise ValueError(f"need at least one value in [0, 1) (0 = threshold seeds), got {grid}")
        return sorted(set(grid))

    @field_validator("tta_grid")
    @classmethod
    def _cheapest_first(cls, grid: list[str]) -> list[str]:
        # Tuning breaks ties toward the earlier mode: order by cost (views), not by how it was written.
        if not grid:
            raise ValueError("need at least one mode, e.g. [none] or [none, flips]")
        return sorted(set(grid), key=["none", "flips", "d4"].index)

    @field_validator("diameter_choices")
    @classmethod
    def _multipliers(cls, choices: list[float]) -> list[float]:
        return _diameter_multipliers(choices)

    @field_validator("diameter_choices_grid")
    @classmethod
    def _fewest_first(cls, grid: list[list[float]]) -> list[list[float]]:
        # Tuning breaks ties toward the earlier entry: order by cost (model passes).
        if not grid:
            raise ValueError(
                "need at least one list of multipliers, e.g. [[1.0]] or [[1.0], [0.7, 0.85, 1.0, 1.2]]"
            )
        unique = {tuple(_diameter_multipliers(choices)): None for choices in grid}
        return sorted((list(c) for c in unique), key=extra_size_passes)

    @field_validator("diameter")
    @classmethod
    def _positive_diameter(cls, value: str | float) -> str | float:
        if value != "auto" and not value > 0:
            raise ValueError(f"need auto or a positive number of pixels, got {value}")
        return value

    @field_validator("min_area_grid")
    @classmethod
    def _areas(cls, grid: list[int]) -> list[int]:
        if not grid or min(grid) < 0:
            raise ValueError(f"need at least one area >= 0 (pixels), got {grid}")
        return sorted(set(grid))

    @model_validator(mode="after")
    def _learned_score_needs_distance(self) -> InferenceParams:
        if self.learned_score and self.instances != "distance":
            raise ValueError(
                f"learned_score weighs features of the distance map; it needs instances: distance "
                f"(here {self.instances}), or set learned_score: false"
            )
        if self.learned_score and not self.tune:
            raise ValueError("learned_score is fitted on validation while tuning; it needs tune: true")
        return self

    @model_validator(mode="after")
    def _tiles_fit(self) -> InferenceParams:
        if self.tile_size and (self.tile_size % 32 or self.tile_overlap * 2 >= self.tile_size):
            raise ValueError(
                f"tile_size {self.tile_size} must be a multiple of 32 and more than twice tile_overlap "
                f"({self.tile_overlap}); e.g. tile_size 512, tile_overlap 64 (or tile_size 0: no tiling)"
            )
        return self


class ExtraSet(_Section):
    """A further labelled dataset evaluated on its own (another microscope, clinic or stain)."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    source: str  # folder holding image_dir and mask_dir, relative to the repository
    image_dir: str = "images"
    mask_dir: str = "masks"
    mask_kind: Literal["instance", "semantic"] = "instance"  # semantic: no instance metrics


class EvaluateParams(_Section):
    overlays: int = Field(6, ge=0)
    extra_sets: list[ExtraSet] = []

    @field_validator("extra_sets")
    @classmethod
    def _unique_names(cls, sets: list[ExtraSet]) -> list[ExtraSet]:
        names = [s.name for s in sets]
        if len(set(names)) != len(names) or {"val", "test"} & set(names):
            raise ValueError(f"extra set names must be unique and not 'val' or 'test', got {names}")
        return sets


class CrossvalParams(_Section):
    """Group k-fold cross-validation over every image (the crossval stage)."""

    # 0 = off. Otherwise every image is held out once: fold i is scored by a model trained on
    # the other folds but fold i + 1, which picks its post-processing (as val does).
    folds: int = Field(0, ge=0)
    scales: list[float] = [1.0]  # held-out images are also scored rescaled by these factors
    subsets: dict[str, list[str]] = {}  # named groups of image ids also scored on their own (e.g. thin cells)
    # Repeated cross-validation: each seed deals the images into folds anew and seeds the fold
    # models' training (as base.seed does); the summary spreads over every seed's folds.
    # [] = base.seed alone. Folds differ more between partitions than most changes screened.
    seeds: list[int] = []

    @field_validator("folds")
    @classmethod
    def _enough_folds(cls, folds: int) -> int:
        if folds in (1, 2):
            raise ValueError(
                f"need 0 (off) or at least 3 folds (held out, validation, training), got {folds}"
            )
        return folds

    @field_validator("scales")
    @classmethod
    def _positive_scales(cls, scales: list[float]) -> list[float]:
        if not scales or min(scales) <= 0 or max(scales) > 4:
            raise ValueError(f"need one or more factors in (0, 4], e.g. [1.0, 0.6], got {scales}")
        return list(dict.fromkeys(scales))

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
            raise ValueError(f"need distinct seeds of 0 or more, e.g. [42, 7], got {seeds}")
        return seeds


class Int8Params(_Section):
    """The INT8 variant export writes beside the fp32 model (segflow.release.quantize)."""

    enabled: bool = True
    calibration_images: int = Field(16, ge=1)  # training images that calibrate activation ranges
    calibration_size: int = Field(256, ge=32)  # each contributes a centre crop this large
    max_dice_drop: float = Field(0.005, ge=0)  # on the validation split, against fp32
    max_ap50_drop: float = Field(0.01, ge=0)


class ExportParams(_Section):
    opset: int = Field(18, ge=13, le=23)
    ir_version: int = Field(10, ge=7, le=11)
    parity_atol: float = Field(1e-4, gt=0)
    registered_model_name: str = Field("segflow-segmenter", min_length=1)
    int8: Int8Params = Int8Params()


GATE_METRICS = ("dice", "iou", "precision", "recall", "dice_pooled", "ap", "ap50", "ap75")


class PromoteParams(_Section):
    minimums: dict[str, float] = {"dice": 0.85, "iou": 0.75}
    max_regression: dict[str, float] = {"dice": 0.005, "iou": 0.01}

    @field_validator("minimums", "max_regression")
    @classmethod
    def _known_metrics(cls, values: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(values) - set(GATE_METRICS))
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; the gate knows: {', '.join(GATE_METRICS)}")
        negative = sorted(k for k, v in values.items() if v < 0)
        if negative:
            raise ValueError(f"{negative} must not be negative")
        return values


class Params(_Section):
    base: BaseParams = BaseParams()
    ingest: IngestParams = IngestParams()
    convert: ConvertParams = ConvertParams()
    split: SplitParams = SplitParams()
    train: TrainParams = TrainParams()
    inference: InferenceParams = InferenceParams()
    evaluate: EvaluateParams = EvaluateParams()
    crossval: CrossvalParams = CrossvalParams()
    export: ExportParams = ExportParams()
    promote: PromoteParams = PromoteParams()
    serve: ServeParams = ServeParams()

    @model_validator(mode="after")
    def _foreground_is_a_mask_value(self) -> Params:
        fg, allowed = self.convert.foreground_values, self.ingest.mask_values
        if self.ingest.mask_kind == "semantic" and fg is not None and not set(fg) <= set(allowed or []):
            raise ValueError(
                f"convert.foreground_values {fg} must be among ingest.mask_values {allowed}; "
                "otherwise every mask would be empty"
            )
        return self

    @model_validator(mode="after")
    def _classes_reachable(self) -> Params:
        """Every way of reading masks must be able to produce each class of base.classes."""
        classes, ingest, convert = self.base.classes, self.ingest, self.convert
        if convert.foreground_values is not None and convert.class_values is not None:
            raise ValueError("set convert.foreground_values (two classes) or convert.class_values, not both")
        if convert.foreground_values is not None and len(classes) > 2:
            raise ValueError(
                f"convert.foreground_values is for two classes; with {len(classes)} classes map each "
                "class's raw values in convert.class_values, e.g. {nucleus: [1], cytoplasm: [2]}"
            )
        if convert.class_values is not None:
            unknown = sorted(set(convert.class_values) - set(classes[1:]))
            if unknown:
                raise ValueError(
                    f"convert.class_values names {unknown}, which are not foreground classes in "
                    f"base.classes {classes[1:]}"
                )
        multi = len(classes) > 2
        if multi and ingest.format in ("folder", "numpy") and ingest.mask_kind == "instance":
            raise ValueError(
                f"base.classes has {len(classes)} classes but instance masks carry no class; use "
                "semantic masks (ingest.mask_kind: semantic), CVAT colour masks or COCO categories"
            )
        if (
            multi
            and ingest.mask_kind == "semantic"
            and convert.class_values is None
            and ingest.format != "cvat"
        ):
            beyond = sorted(v for v in ingest.mask_values or [] if not 0 <= v < len(classes))
            if beyond:
                raise ValueError(
                    f"ingest.mask_values {beyond} are not class ids 0-{len(classes) - 1}; map raw values "
                    "to classes with convert.class_values, e.g. {" + f"{classes[1]}: [{beyond[0]}]" + "}"
                )
        return self

    @model_validator(mode="after")
    def _watershed_needs_instances(self) -> Params:
        ingest = self.ingest
        if self.inference.instances in ("watershed", "distance") and not self.has_instance_ids():
            raise ValueError(
                f"inference.instances: {self.inference.instances} learns from instance ids, but "
                f"ingest.format {ingest.format} with mask_kind {ingest.mask_kind} gives class masks only; "
                "set inference.instances: components (objects = connected regions of the mask) or auto"
            )
        if self.train.border_weight and self.instance_method() == "components":
            raise ValueError(
                f"train.border_weight {self.train.border_weight} weighs borders between touching objects, "
                "which only watershed and distance models learn from instance ids (these params give a "
                "components model); set inference.instances: distance (or watershed) with instance masks, "
                "or train.border_weight: 0"
            )
        if self.train.crop_sampling == "contacts" and not self.has_instance_ids():
            raise ValueError(
                "train.crop_sampling contacts deals crops by where objects touch, which needs instance "
                f"ids, but ingest.format {ingest.format} with mask_kind {ingest.mask_kind} gives class "
                "masks only; set train.crop_sampling: uniform"
            )
        if self.train.diameter and not self.has_instance_ids():
            raise ValueError(
                "train.diameter measures object sizes from instance ids, but "
                f"ingest.format {ingest.format} with mask_kind {ingest.mask_kind} gives class masks only; "
                "set train.diameter: null"
            )
        return self

    def has_instance_ids(self) -> bool:
        """Whether the ingested dataset tells objects apart (instance masks or COCO)."""
        ingest = self.ingest
        return ingest.format == "coco" or (
            ingest.format in ("folder", "numpy") and ingest.mask_kind == "instance"
        )

    def instance_method(self) -> str:
        """inference.instances with auto resolved: watershed when instance ids exist, else components."""
        if self.inference.instances != "auto":
            return self.inference.instances
        return "watershed" if self.has_instance_ids() else "components"

    def digest(self) -> str:
        """Stable sha256 of the validated values (the `params_hash` lineage tag)."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


def load_params(path: str | Path | None = None) -> Params:
    """Read and validate params.yaml.

    Args:
        path: the file; default `params.yaml` at the repository root.

    Returns:
        The validated parameters.

    Raises:
        ParamsError: naming each bad key path, the problem and the allowed values.
    """
    path = Path(path) if path is not None else repo_root() / PARAMS_FILE
    raw = read_params_file(path, ParamsError, "run from the repository root or pass the path")
    return parse_params(raw, source=str(path))


def parse_params(raw: dict, source: str = PARAMS_FILE) -> Params:
    """Validate an already-loaded mapping (used by load_params and by tests)."""
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(err) for err in exc.errors()]
        raise ParamsError(f"{source} is invalid:\n" + "\n".join(f"  - {line}" for line in lines)) from None


def _describe(err: dict) -> str:
    loc = [str(part) for part in err["loc"]]
    key = ".".join(loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(err["loc"][:-1])
        return f"{key}: unknown key; allowed keys here: {', '.join(allowed)}"
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] not in {"value_error", "assertion_error"} and "input" in err:
        message += f" (got {err['input']!r})"
    return f"{key}: {message}"


def _allowed_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] = Params
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)
