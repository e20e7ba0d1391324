"""Which of a model's variants to run here: fp32, or the INT8 one export made and checked.

INT8 is only worth running where the CPU has integer dot-product instructions (AVX-512 VNNI,
AVX-VNNI, ARM dot products); elsewhere it can be slower than fp32. So `auto` times both on
a warm-up batch, on this machine, at start, and runs the faster one; INT8 is a candidate
only when export's accuracy check passed (int8.json beside the model). The choice and why
go to /metadata, /stats and the Prometheus metrics (service.py), and to `segflow predict`'s
log line.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from segflow.core.inference import Segmenter
from segflow.errors import UserError

log = logging.getLogger(__name__)

FP32_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
MODEL_FILES = {"fp32": FP32_FILE, "int8": INT8_FILE}
INT8_REPORT = "int8.json"  # export's accuracy check: {"passed", "reason", dice/ap50 fp32, int8, drop}
PRECISIONS = ("auto", "fp32", "int8")
# A variant must be this much faster to be chosen over fp32: timing noise on a busy machine
# must not flip the choice between two equally fast models.
MIN_SPEEDUP = 1.05


@dataclass
class Choice:
    """The precision that runs, and why (what /metadata reports)."""

    precision: str
    setting: str
    reason: str
    ms_per_image: dict[str, float] = field(default_factory=dict)  # measured at start (auto)
    check: dict | None = None  # export's INT8 accuracy check, when the model has one

    def to_dict(self) -> dict:
        return {
            "precision": self.precision,
            "setting": self.setting,
            "reason": self.reason,
            "ms_per_image": self.ms_per_image,
            "int8_check": self.check,
        }


def int8_check(folder: Path) -> dict | None:
    """Export's accuracy check of the INT8 variant in `folder`, or None when there is none."""
    report = folder / INT8_REPORT
    if not report.is_file():
        return None
    return json.loads(report.read_text())


def usable_int8(folder: Path) -> tuple[bool, str]:
    """Whether `folder` holds an INT8 variant that passed export's check, and why not."""
    check = int8_check(folder)
    if check is None:
        return False, "the model has no INT8 variant (exported without export.int8, or before it existed)"
    if not check.get("passed"):
        return False, f"its INT8 variant failed export's accuracy check: {check.get('reason')}"
    if not (folder / INT8_FILE).is_file():
        return False, f"{INT8_FILE} is missing beside {INT8_REPORT}"
    return True, ""


def choose(
    folder: Path,
    setting: str,
    open_model: Callable[[Path], Segmenter],
    warmup: list[np.ndarray],
    repeats: int = 3,
) -> tuple[Segmenter, Choice]:
    """The segmenter to serve from `folder` for `setting` (auto, fp32 or int8), and why.

    Args:
        open_model: opens one ONNX file as a Segmenter (with the service's threads).
        warmup: images to time both variants on (auto only); also warms the chosen one.

    Raises:
        UserError: `setting` is int8 but the model has no usable INT8 variant, or unknown.
    """
    if setting not in PRECISIONS:
        raise UserError(f"precision {setting!r} is not one of {', '.join(PRECISIONS)}")
    check = int8_check(folder)
    ok, why_not = usable_int8(folder)
    if setting == "fp32":
        return open_model(folder / FP32_FILE), Choice(
            "fp32", setting, "asked for (precision: fp32)", check=check
        )
    if setting == "int8":
        if not ok:
            raise UserError(f"precision int8 was asked for, but {why_not}; use auto or fp32")
        return open_model(folder / INT8_FILE), Choice(
            "int8", setting, "asked for (precision: int8)", check=check
        )
    if not ok:
        return open_model(folder / FP32_FILE), Choice("fp32", setting, why_not, check=check)
    candidates = {"fp32": open_model(folder / FP32_FILE), "int8": open_model(folder / INT8_FILE)}
    timings = {name: _ms_per_image(seg, warmup, repeats) for name, seg in candidates.items()}
    precision, reason = decide(timings)
    log.info("precision %s: %s", precision, reason)
    return candidates[precision], Choice(precision, setting, reason, timings, check)


def decide(ms_per_image: dict[str, float]) -> tuple[str, str]:
    """int8 when it is at least MIN_SPEEDUP times faster than fp32 here, else fp32."""
    fp32, int8 = ms_per_image["fp32"], ms_per_image["int8"]
    speedup = fp32 / int8 if int8 > 0 else float("inf")
    measured = f"{int8:.1f} ms per image in INT8 against {fp32:.1f} in fp32 on the warm-up batch"
    if speedup >= MIN_SPEEDUP:
        return "int8", f"{speedup:.2f}x faster than fp32 on this CPU ({measured})"
    return "fp32", f"INT8 is not faster on this CPU ({speedup:.2f}x: {measured})"


def warmup_images(prep, count: int, size: int = 256) -> list[np.ndarray]:
    """Images to time the variants on: noise at a typical tile size (a model's time does not
    depend on what the pixels show), `count` of them, as a batch would bring."""
    rng = np.random.default_rng(0)
    shape = (size, size) if prep.in_channels == 1 else (size, size, 3)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(max(1, count))]


def _ms_per_image(segmenter: Segmenter, images: list[np.ndarray], repeats: int) -> float:
    """Best of `repeats` timed passes over `images` (after one untimed pass), per image."""
    segmenter.logits(images)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        segmenter.logits(images)
        best = min(best, time.perf_counter() - started)
    return round(1000 * best / max(1, len(images)), 2)
