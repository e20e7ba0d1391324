"""How the training loop computes on the CPU: float32 or bfloat16 autocast, and the memory
format of its tensors (train.precision, train.channels_last).

bfloat16 halves the bytes every convolution moves and, on CPUs with native bfloat16
instructions (AVX-512 BF16, AMX), runs the convolutions on them; elsewhere oneDNN emulates
it and it is slower than float32. So `auto` uses it only where the CPU has the instructions,
and an explicit `bf16` on a CPU without them falls back to float32 with a warning rather
than training slowly. Only the forward pass is autocast; the loss, the gradients the
optimizer applies and the saved weights stay float32, so checkpoints, ONNX export and
inference are the same whichever was used. `python bench/train.py` measures both here.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")


def native_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions (AVX-512 BF16 or AMX) for oneDNN to use.

    oneDNN's own `_is_mkldnn_bf16_supported` also answers yes on AVX-512 CPUs without them
    (Skylake to Ice Lake), where it emulates bfloat16 and is slower than float32; torch's
    CPU feature checks name the instructions themselves.
    """
    import torch

    try:
        has_instructions = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return bool(torch.backends.mkldnn.is_available() and has_instructions)
    except (AttributeError, RuntimeError):  # a torch build without the checks
        return False


@dataclass(frozen=True)
class Compute:
    """The resolved settings one training run uses, and why."""

    precision: str  # fp32 or bf16
    channels_last: bool
    reason: str

    @classmethod
    def resolve(cls, setting: str, channels_last: bool, native: bool | None = None) -> Compute:
        """train.precision (auto, fp32 or bf16) on this CPU -> what runs.

        Args:
            native: whether the CPU has native bfloat16 (None: ask it).
        """
        if setting not in PRECISIONS:
            raise ValueError(f"train.precision {setting!r} is not one of {', '.join(PRECISIONS)}")
        if setting == "fp32":
            return cls("fp32", channels_last, "asked for (train.precision: fp32)")
        native = native_bf16() if native is None else native
        if native:
            return cls("bf16", channels_last, f"this CPU has native bfloat16 (train.precision: {setting})")
        reason = "this CPU has no native bfloat16 (AVX-512 BF16 or AMX), where it is slower than float32"
        if setting == "bf16":
            log.warning("train.precision is bf16 but %s: training in float32", reason)
        return cls("fp32", channels_last, reason)

    def prepare(self, model):
        """The model in the memory format its inputs will have."""
        import torch

        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def inputs(self, x):
        import torch

        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def autocast(self):
        """A context for the forward pass: bfloat16 autocast, or nothing."""
        import torch

        if self.precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def describe(self) -> str:
        layout = ", channels-last" if self.channels_last else ""
        return f"{self.precision}{layout} ({self.reason})"
