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

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from segflow.paths import repo_root

PARAMS_FILE = "params.yaml"


class ParamsError(ValueError):
    """params.yaml is missing, unreadable or invalid; the message names every bad key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Normalize(_Section):
    mean: float = 0.5
    std: float = Field(0.25, gt=0)


class BaseParams(_Section):
    seed: int = 42
    classes: list[str] = ["background", "cell"]
    in_channels: Literal[1, 3] = 1
    normalize: Normalize = Normalize()
    pad_multiple: int = Field(32, ge=1)

    @field_validator("classes")
    @classmethod
    def _binary_only(cls, classes: list[str]) -> list[str]:
        if len(classes) != 2:
            raise ValueError(
                f"got {len(classes)} classes {classes}; this release trains binary models only: "
                "use two names, background first, e.g. [background, cell]"
            )
        if len(set(classes)) != len(classes):
            raise ValueError(f"class names must be unique, got {classes}")
        return classes


class IngestParams(_Section):
    format: Literal["folder", "coco"] = "folder"
    source: str = "data"
    image_dir: str = "images"
    mask_dir: str = "masks"
    annotations: str | None = None
    on_error: Literal["fail", "skip"] = "fail"
    mask_kind: Literal["instance", "semantic"] = "instance"
    mask_values: list[int] | None = None
    min_images: int = Field(10, ge=1)

    @model_validator(mode="after")
    def _coco_needs_annotations(self) -> IngestParams:
        if self.format == "coco":
            if not self.annotations:
                raise ValueError("format 'coco' needs annotations: the JSON file, relative to source")
            if self.mask_kind != "instance":
                raise ValueError("format 'coco' yields instance masks; leave mask_kind as 'instance'")
        return self

    @model_validator(mode="after")
    def _values_match_kind(self) -> IngestParams:
        if self.mask_kind == "semantic" and not self.mask_values:
            raise ValueError(
                "mask_kind 'semantic' needs mask_values, the raw values allowed in masks "
                "(for example [0, 255])"
            )
        return self


class ConvertParams(_Section):
    foreground_values: list[int] | None = None


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


class Augment(_Section):
    hflip: float = Field(0.5, ge=0, le=1)
    vflip: float = Field(0.5, ge=0, le=1)
    rotate90: float = Field(0.5, ge=0, le=1)
    brightness_contrast: float = Field(0.5, ge=0, le=1)
    gauss_noise: float = Field(0.2, ge=0, le=1)


class TrainParams(_Section):
    architecture: str = "Unet"
    encoder: str = "resnet18"
    encoder_weights: str | None = None
    decoder_channels: list[int] = [128, 64, 32, 16, 16]
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(0.003, gt=0)
    weight_decay: float = Field(0.0001, ge=0)
    dice_weight: float = Field(0.5, ge=0, le=1)
    crop_size: int | None = Field(192, ge=32)
    threads: int = Field(2, ge=1)
    augment: Augment = Augment()

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

    @field_validator("architecture")
    @classmethod
    def _known_architecture(cls, name: str) -> str:
        from segflow.models import architecture_names

        choices = architecture_names()
        if name not in choices:
            raise ValueError(f"unknown architecture {name!r}; choose one of: {', '.join(choices)}")
        return name

    @field_validator("encoder")
    @classmethod
    def _known_encoder(cls, name: str) -> str:
        from segflow.models import encoder_names

        choices = encoder_names()
        if name not in choices:
            close = [c for c in choices if c.startswith(name[:4])][:12] or choices[:12]
            raise ValueError(
                f"unknown encoder {name!r}; for example: {', '.join(close)} "
                f"({len(choices)} in all, see segmentation_models_pytorch's encoder list)"
            )
        return name

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


class EvaluateParams(_Section):
    threshold: float = Field(0.5, gt=0, lt=1)
    overlays: int = Field(6, ge=0)


class ExportParams(_Section):
    opset: int = Field(18, ge=13, le=23)
    ir_version: int = Field(10, ge=7, le=11)
    parity_atol: float = Field(1e-4, gt=0)
    registered_model_name: str = Field("segflow-segmenter", min_length=1)


GATE_METRICS = ("dice", "iou", "precision", "recall", "dice_pooled")


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


UPLOAD_FORMATS = ("png", "jpeg", "tiff", "npy")
UPLOAD_DTYPES = ("uint8", "uint16", "float32", "float64")


class ServeParams(_Section):
    """The service's limits and bookkeeping (read by service.py; travels in the Bento)."""

    max_upload_bytes: int = Field(32 * 2**20, ge=1024)
    # Until tiled inference lands, a whole image goes through the network at once:
    # this bounds memory (a 2048x2048 image needs about 2 GB of activations).
    max_pixels: int = Field(2048 * 2048, ge=32 * 32)
    max_batch_images: int = Field(16, ge=1)
    formats: list[Literal["png", "jpeg", "tiff", "npy"]] = list(UPLOAD_FORMATS)
    dtypes: list[Literal["uint8", "uint16", "float32", "float64"]] = list(UPLOAD_DTYPES)
    model_batch_size: int = Field(4, ge=1)
    threads: int = Field(0, ge=0)
    request_log: str = "logs/requests.db"
    stats_window: int = Field(1000, ge=1)
    drift_min_images: int = Field(30, ge=2)


class Params(_Section):
    base: BaseParams = BaseParams()
    ingest: IngestParams = IngestParams()
    convert: ConvertParams = ConvertParams()
    split: SplitParams = SplitParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
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
    if not path.is_file():
        raise ParamsError(f"{path}: not found; run from the repository root or pass the path")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
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
