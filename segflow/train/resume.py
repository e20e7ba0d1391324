"""Resume states: what training needs to continue after an interruption.

The train stage builds its output in a temporary folder that the next run wipes, so the
state lives elsewhere (artifacts/.resume/train.pt): saved atomically after every completed
epoch, deleted once the model is in place. A fingerprint of everything that decides what
the epochs compute (params, training data, code, library versions) travels with it; a state
whose fingerprint differs is ignored with a message, never silently reused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from segflow.codebase import closure_files, source_root
from segflow.config import Params

log = logging.getLogger(__name__)

RESUME_FORMAT = 1

# The code that decides what an epoch computes: the training loop and everything it imports
# (computed from the source by segflow.codebase, never listed by hand). Editing any of it
# invalidates a resume state.
TRAINING_MODULE = "segflow.train.loop"
LIBRARIES = ("torch", "segmentation-models-pytorch", "albumentations", "numpy")
# Train params that do not change what the epochs compute: threads only reorders float
# sums (rounding), early_stopping only decides when to stop and is re-applied on resume,
# size_head is fitted after the last epoch.
NEUTRAL_TRAIN_PARAMS = {"threads", "early_stopping", "size_head"}


def fingerprint(params: Params, preprocessing: dict, samples: dict[str, Iterable]) -> dict[str, str]:
    """Hashes of what a resume state must match, by part (so a mismatch can be named).

    Args:
        params: validated params; base and train (but NEUTRAL_TRAIN_PARAMS) count.
        preprocessing: the inference contract (validation runs through it).
        samples: {"train": [...], "val": [...]} as load_samples returns them; every
            field is hashed, pixels included, in order.

    Returns:
        {"params": sha256, "data": sha256, "code": sha256}.
    """
    settings = {
        "base": params.base.model_dump(mode="json"),
        "train": params.train.model_dump(mode="json", exclude=NEUTRAL_TRAIN_PARAMS),
        "preprocessing": preprocessing,
    }
    return {
        "params": _sha256(json.dumps(settings, sort_keys=True).encode()),
        "data": _samples_hash(samples),
        "code": _code_hash(),
    }


@dataclass
class ResumeFile:
    """One stage's resume state on disk, bound to the fingerprint of the current run."""

    path: Path
    fingerprint: dict[str, str]

    def load(self) -> dict | None:
        """The saved state if it belongs to this run; None (saying why) otherwise."""
        import torch

        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated by a full disk, written by another torch, ...
            self.reject(f"it cannot be read ({type(exc).__name__}: {exc})")
            return None
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        if found != RESUME_FORMAT:
            self.reject(f"format {found} is not {RESUME_FORMAT}")
            return None
        saved = state.get("fingerprint") or {}
        changed = [part for part, digest in self.fingerprint.items() if saved.get(part) != digest]
        if changed:
            self.reject(f"it was saved for different {', '.join(changed)}")
            return None
        return state

    def save(self, state: dict) -> None:
        """Write atomically (temporary file, fsync, rename): a kill leaves the old state or the new."""
        import torch

        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("wb") as handle:
            torch.save({**state, "format": RESUME_FORMAT, "fingerprint": self.fingerprint}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(self.path)

    def reject(self, why: str) -> None:
        """Say why the saved state is not used."""
        log.warning("resume: ignoring %s: %s; training starts from epoch 1", self.path, why)


def discard(path: Path) -> None:
    """Delete a resume state (and a half-written one): nothing is left to resume."""
    for stale in (path, path.with_name(path.name + ".tmp")):
        stale.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        path.parent.rmdir()  # only when empty


def _samples_hash(samples: dict[str, Iterable]) -> str:
    digest = hashlib.sha256()
    for split, items in samples.items():
        digest.update(split.encode())
        for item in items:
            for name, value in vars(item).items():
                digest.update(name.encode())
                if isinstance(value, np.ndarray):
                    digest.update(f"{value.dtype}{value.shape}".encode())
                    digest.update(np.ascontiguousarray(value).tobytes())
                else:
                    digest.update(repr(value).encode())
    return digest.hexdigest()


def code_files() -> list[str]:
    """The source files whose content the resume fingerprint covers (the training closure)."""
    return closure_files(TRAINING_MODULE)


def _code_hash() -> str:
    digest = hashlib.sha256()
    root = source_root()
    for name in code_files():
        digest.update(name.encode())
        digest.update((root / name).read_bytes())
    for library in LIBRARIES:
        digest.update(f"{library}=={_version(library)}".encode())
    return digest.hexdigest()


def _version(library: str) -> str:
    try:
        return metadata.version(library)
    except metadata.PackageNotFoundError:
        return "absent"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
