"""Trains the unit tests' tiny dataset under torchrun (tests/pipeline/test_distributed.py).

    python -m torch.distributed.run --standalone --nproc_per_node 2 distributed_run.py OUT [die-after-1]

Writes OUT/model.pt (rank 0) and OUT/history-<rank>.json; with `die-after-1`, rank 0 raises
after epoch 1 (after its resume state is saved), as a killed run would stop.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from segflow.runtime import configure_logging
from segflow.train import distributed
from segflow.train.loop import train_model
from tests.unit.test_training import _params, _samples


class Killed(Exception):
    pass


def main() -> None:
    out = Path(sys.argv[1])
    die = sys.argv[2:] == ["die-after-1"]
    configure_logging()
    torch.set_num_threads(1)
    params = _params(epochs=3, schedule="cosine", batch_size=4, distributed={"nproc": 2})
    with distributed.world("gloo") as world:

        def on_epoch(record: dict) -> None:
            if die and record["epoch"] == 1:
                raise Killed

        history = train_model(
            params, _samples(8, 0), _samples(3, 1), out / "model.pt", on_epoch, out / "resume.pt"
        )
        (out / f"history-{world.rank}.json").write_text(json.dumps(history))


if __name__ == "__main__":
    main()
