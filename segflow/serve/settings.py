"""The service's settings: the `serve` section of params.yaml, and nothing else.

A built Bento carries params.yaml but none of the training side, so the service validates
only its own section here (pydantic, `extra="forbid"`, like segflow.config, which reuses
this model for the whole file).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from segflow.errors import UserError


class SettingsError(UserError):
    """The serve section of params.yaml is missing, unreadable or invalid."""


UPLOAD_FORMATS = ("png", "jpeg", "tiff", "npy")
UPLOAD_DTYPES = ("uint8", "uint16", "float32", "float64")


class ServeParams(BaseModel):
    """The service's limits and bookkeeping (read by service.py; travels in the Bento)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_upload_bytes: int = Field(32 * 2**20, ge=1024)
    # The network sees tiles of inference.tile_size, so its memory is bounded anyway; this
    # bounds what decoding, probabilities and post-processing hold for one image.
    max_pixels: int = Field(2048 * 2048, ge=32 * 32)
    max_batch_images: int = Field(16, ge=1)
    formats: list[Literal["png", "jpeg", "tiff", "npy"]] = list(UPLOAD_FORMATS)
    dtypes: list[Literal["uint8", "uint16", "float32", "float64"]] = list(UPLOAD_DTYPES)
    model_batch_size: int = Field(4, ge=1)
    workers: int = Field(1, ge=1, le=64)  # BentoML worker processes, each with its own model session
    threads: int = Field(0, ge=0)  # ONNX Runtime intra-op threads per worker; 0 = cores / workers
    precision: Literal["auto", "fp32", "int8"] = "auto"  # see segflow.serve.precision
    request_log: str = "logs/requests.db"
    stats_window: int = Field(1000, ge=1)
    drift_min_images: int = Field(30, ge=2)
    # Slow clients: a request's headers, and an API request's body, must arrive within these.
    header_timeout_s: float = Field(10.0, gt=0, le=600)
    body_timeout_s: float = Field(30.0, gt=0, le=600)


CGROUP_V2_MAX = Path("/sys/fs/cgroup/cpu.max")  # "<quota> <period>" or "max <period>"
CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")  # -1 = no limit
CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def available_cores() -> int:
    """The cores this process may use: its CPU set, capped by a container's CPU quota.

    A Kubernetes pod limited to 2 CPUs still sees every core of its node in its CPU set;
    sizing ONNX Runtime's threads from that would start dozens of threads fighting for 2
    cores' worth of time. The quota (cgroup v2 cpu.max, or v1 cfs_quota/period) says 2.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return max(1, min(cores, int(quota))) if quota else cores


def cgroup_cpu_quota(
    v2: Path = CGROUP_V2_MAX, v1: tuple[Path, Path] = (CGROUP_V1_QUOTA, CGROUP_V1_PERIOD)
) -> float:
    """CPUs' worth of time the container may use (quota / period), 0 when unlimited or unknown."""
    try:
        quota, period = v2.read_text().split()[:2]
        return 0.0 if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota, period = (int(path.read_text()) for path in v1)
        return quota / period if quota > 0 and period > 0 else 0.0
    except (OSError, ValueError):
        return 0.0


def onnx_threads(params: ServeParams, cores: int | None = None) -> int:
    """ONNX Runtime intra-op threads for one worker: serve.threads when set, else the cores
    shared out between the workers (each worker's session would otherwise start one thread per
    core, and N workers would fight over the cores with N times as many threads)."""
    if params.threads:
        return params.threads
    return max(1, (cores or available_cores()) // params.workers)


def read_params_file(path: Path, error: type[Exception], missing_hint: str) -> dict:
    """A params.yaml as a mapping of sections (the pipeline's config and the service share this).

    Raises:
        `error`, naming the file: absent (with `missing_hint`), not YAML, or not a mapping.
    """
    if not path.is_file():
        raise error(f"{path}: not found; {missing_hint}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise error(f"{path}: expected a YAML mapping of sections, got {type(raw).__name__}")
    return raw


def load_serve_params(path: str | Path) -> ServeParams:
    """Read and validate only the `serve` section of a params.yaml.

    Args:
        path: the params file (the repository's, or the copy inside a Bento).

    Returns:
        The validated settings; defaults for every key the section leaves out.

    Raises:
        SettingsError: naming the file, each bad key (serve.<key>) and what is allowed.
    """
    path = Path(path)
    hint = "set SEGFLOW_PARAMS to the params.yaml the service should read"
    raw = read_params_file(path, SettingsError, hint)
    section = raw.get("serve") or {}
    if not isinstance(section, dict):
        raise SettingsError(f"{path}: `serve` must be a mapping of settings, got {type(section).__name__}")
    try:
        return ServeParams.model_validate(section)
    except ValidationError as exc:
        problems = [_describe(err) for err in exc.errors()]
        raise SettingsError(f"{path} is invalid:\n" + "\n".join(f"  - {p}" for p in problems)) from None


def _describe(err: dict) -> str:
    key = "serve." + ".".join(str(part) for part in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"{key}: unknown key; allowed keys here: {', '.join(ServeParams.model_fields)}"
    return f"{key}: {err['msg']} (got {err.get('input')!r})"


RELEASE_RECORD = Path("logs") / "release.json"  # written by promote and rollback in a checkout


def champion_model_tag(checkout: Path) -> str:
    """The BentoML model a checkout serves by default.

    The champion's model as its last promotion or rollback recorded it (logs/release.json,
    `serving`; a refused candidate leaves it as it was), so that several
    checkouts sharing one BentoML store each serve their own champion; else the newest
    imported model. A built Bento pins its model at build time and never asks.
    """
    try:
        return str(json.loads((checkout / RELEASE_RECORD).read_text())["serving"]["model_tag"])
    except (OSError, ValueError, KeyError, TypeError):
        return "segflow-segmenter:latest"
