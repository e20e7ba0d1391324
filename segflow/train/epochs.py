"""What happens between epochs: the learning-rate schedule, early stopping, per-epoch seeds
and deterministic kernels.

Every random stream an epoch uses is re-seeded from (seed, epoch) when the epoch starts, so
epoch e draws the same crops, flips, noise and batch order whether epochs 1..e-1 ran in this
process or in one that was killed: a resumed run needs no saved RNG state to end where an
uninterrupted one does.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np

from segflow.errors import UserError

SCHEDULES = ("onecycle", "cosine", "constant")


def build_scheduler(optimizer, schedule: str, lr: float, total_steps: int):
    """The learning-rate scheduler, stepped once per batch.

    Args:
        optimizer: a torch optimizer whose groups start at `lr`.
        schedule: onecycle (warm up to `lr`, then anneal), cosine (anneal from `lr` to 0) or
            constant.
        lr: the peak (onecycle) or starting (cosine, constant) learning rate.
        total_steps: batches over the whole run (epochs x batches per epoch).

    Returns:
        A torch LR scheduler; its state_dict resumes it exactly.
    """
    from torch.optim import lr_scheduler

    total_steps = max(1, total_steps)
    if schedule == "onecycle":
        return lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total_steps)
    if schedule == "cosine":
        return lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    if schedule == "constant":
        return lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    raise UserError(f"train.schedule: unknown schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}")


def best_epoch(history: list[dict]) -> dict | None:
    """The record with the highest val_dice (the earliest one on ties), or None."""
    scored = [r for r in history if r["val_dice"] == r["val_dice"]]  # NaN never wins
    return max(scored, key=lambda r: (r["val_dice"], -r["epoch"])) if scored else None


def should_stop(history: list[dict], patience: int) -> bool:
    """Early stopping: True once `patience` epochs in a row brought no better val Dice.

    A pure function of the history, so a resumed run decides exactly as an uninterrupted
    one would. patience 0 never stops.
    """
    if patience <= 0 or not history:
        return False
    best = best_epoch(history)
    best_at = best["epoch"] if best else 0
    return history[-1]["epoch"] - best_at >= patience


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A well-mixed 32-bit seed for one epoch, derived from the run's seed (and, for the other
    processes of a distributed run, their rank, so their augmentations differ from rank 0's)."""
    entropy = [seed, epoch] + ([rank] if rank else [])
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def seed_epoch(seed: int, epoch: int, generator, augment, rank: int = 0) -> None:
    """Re-seed everything random in one epoch: torch's global RNG, the DataLoader's shuffle
    generator and the albumentations pipeline.

    The transforms of `augment` share one numpy and one Python generator: albumentations'
    own `Compose.set_random_seed` gives every transform an identically seeded generator
    of its own, which makes transforms with equal probability fire together (every
    horizontal flip is also a vertical flip). In a distributed run the shuffle is the
    DistributedSampler's (seeded by the run's seed and the epoch, the same on every rank).
    """
    import torch

    s = epoch_seed(seed, epoch, rank)
    torch.manual_seed(s)
    generator.manual_seed(s)
    augment.set_random_state(np.random.default_rng(s), random.Random(s))


@contextlib.contextmanager
def deterministic_mode(enabled: bool) -> Iterator[None]:
    """Deterministic kernels while training (restores the previous setting afterwards).

    On CPU, with the same torch build, thread count and machine type, a run repeats to the
    bit and a resumed run ends exactly where an uninterrupted one does. Not guaranteed:
    equality across thread counts, CPU instruction sets (AVX2 vs AVX-512 kernels) or torch
    versions, where float sums are ordered differently; results then agree only to rounding.
    Ops without a deterministic implementation warn instead of failing (warn_only). On GPU
    this also pins cuDNN to deterministic algorithms without autotuning.
    """
    import os

    import torch

    if not enabled:
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS determinism (GPU only)
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn


def run_summary(history: list[dict], planned_epochs: int) -> dict:
    """What a finished training run amounts to (artifacts/model/summary.json, without data_hash).

    Timings stay out (see without_timings): DVC tracks this file, and the same data, params
    and code must give the same bytes.
    """
    best = best_epoch(history)  # the epoch whose weights model.pt holds
    return {
        "best_epoch": best["epoch"],
        "best_val_dice": best["val_dice"],
        "epochs_run": len(history),
        "stopped_early": len(history) < planned_epochs,
    }


def train_seconds(history: list[dict]) -> float:
    """Seconds spent in epochs and validation (for MLflow and the terminal, not for DVC)."""
    return round(sum(r["seconds"] for r in history), 1)


def without_timings(history: list[dict]) -> list[dict]:
    """Epoch records as DVC tracks them (artifacts/model/history.json): no wall-clock times."""
    return [{k: v for k, v in record.items() if k != "seconds"} for record in history]


def curve_rows(history: list[dict]) -> list[dict]:
    """The learning curves DVC plots (train_curves.csv): one row per epoch, rounded."""
    columns = ("epoch", "train_loss", "val_loss", "val_dice", "lr")
    return [{k: round(r[k], 6) if isinstance(r[k], float) else r[k] for k in columns} for r in history]
