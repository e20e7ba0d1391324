"""What train.ema_decay costs per optimizer step: one update of the weight average.

    python bench/averaging.py                                    # the dsb recipe's network
    python bench/averaging.py --members 1 --decoder 128 64 32 16 16

Builds the network the given train settings describe (distance seeds: one extra output),
in channels-last as training holds it, and prints its parameter count and the median time
of WeightAverage.update over --repeats updates on --threads threads. Compare it with an
epoch's time divided by its steps (training images x crops_per_image / batch_size).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from segflow.config import parse_params  # noqa: E402
from segflow.train.averaging import WeightAverage  # noqa: E402
from segflow.train.models import build_model, model_spec  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=2)
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--decoder", type=int, nargs=5, default=[256, 128, 64, 32, 16])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    train = {"members": args.members, "encoder": args.encoder, "decoder_channels": args.decoder}
    params = parse_params({"train": train, "inference": {"instances": "distance"}})
    network = build_model(model_spec(params.base, params.train, interior=True))
    network = network.to(memory_format=torch.channels_last)
    average = WeightAverage(network, decay=0.98)
    average.update(network)  # the first update copies
    times = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        average.update(network)
        times.append(time.perf_counter() - started)
    count = sum(p.numel() for p in network.parameters()) / 1e6
    print(
        f"{args.members} member(s), {args.encoder}, decoder {args.decoder}: {count:.1f} M parameters; "
        f"one EMA update {statistics.median(times) * 1000:.1f} ms (median of {args.repeats}, "
        f"{args.threads} thread(s))"
    )


if __name__ == "__main__":
    main()
