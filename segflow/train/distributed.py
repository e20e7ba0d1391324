"""Data-parallel training under PyTorch's own launcher, torchrun (train.distributed).

With train.distributed.nproc above 1 the train stage starts itself again under
`torchrun --standalone --nproc_per_node N` (one machine). Across machines, run torchrun
yourself on each (README: "Distributed training"); the stage sees the WORLD_SIZE and RANK
torchrun sets and joins. Every process trains a DistributedDataParallel replica on its share
of each batch (train.batch_size / processes) with gradients averaged, so the optimisation is
that of the 1-process run with the same global batch; batch-norm statistics are per process.
Rank 0 alone validates (and tells the others the result), logs, writes checkpoints and the
resume state, and writes the stage's outputs; it alone reads the resume state and hands it
to the others, so ranks on other machines need no copy of it. The loop trains on the CPU,
with gloo (train.distributed.backend: auto).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from segflow.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (rank 0 of 1 when not distributed)."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """Whether torchrun (or another launcher setting its variables) started this process."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def check_batch(batch_size: int, processes: int) -> int:
    """Each process's share of train.batch_size.

    Raises:
        UserError: the batch does not split evenly over the processes.
    """
    if batch_size % processes:
        raise UserError(
            f"train.batch_size {batch_size} does not split evenly over {processes} training processes; "
            f"make it a multiple of {processes} (each process takes an equal share of every batch)"
        )
    return batch_size // processes


def relaunch(module: str, nproc: int, threads: int) -> None:
    """Become `torchrun --standalone --nproc_per_node nproc -m module` (this process is
    replaced, so DVC's or the shell's SIGTERM and Ctrl-C reach torchrun, which stops every
    training process, and its exit status is the stage's). The processes share `threads`
    cores."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={nproc}", "-m", module,
    ]  # fmt: skip
    log.info("train.distributed.nproc is %d: %s", nproc, " ".join(cmd[1:]))
    # torchrun would otherwise set 1 and print a banner saying so.
    env = {"OMP_NUM_THREADS": str(max(1, threads // nproc))} | dict(os.environ)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, cmd, env)


@contextlib.contextmanager
def world(backend: str = "auto") -> Iterator[World]:
    """Join the process group torchrun set up (and leave it on exit); World() when not launched."""
    if not launched():
        yield World()
        return
    import torch.distributed as dist

    dist.init_process_group(backend="gloo" if backend == "auto" else backend)
    try:
        yield World(dist.get_rank(), dist.get_world_size())
    finally:
        dist.destroy_process_group()


def current() -> World:
    """The world the training loop runs in (joined by `world`)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def share_from_main(values: list, world: World) -> list:
    """Rank 0's `values` on every rank (e.g. its validation result)."""
    if world.size == 1:
        return values
    import torch.distributed as dist

    box = [values]
    dist.broadcast_object_list(box, src=0)
    return box[0]
