"""CPU time of the answers' COCO RLE (segflow.core.objects.coco_rle) on a large mask, beside
pycocotools' C encoder for the same mask.

    python bench/rle.py                      # 2048x2048, 1,500 objects of 12x12 pixels
    python bench/rle.py --size 1024 --objects 400

To compare with another checkout's coco_rle, put that checkout first on the path:
`PYTHONPATH=/path/to/other/checkout python bench/rle.py`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH: see above

import segflow
from segflow.core.objects import coco_rle


def median_cpu_ms(function, mask: np.ndarray, repeats: int) -> float:
    function(mask)  # warm
    times = []
    for _ in range(repeats):
        started = time.process_time()
        function(mask)
        times.append(1000 * (time.process_time() - started))
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--objects", type=int, default=1500)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    mask = np.zeros((args.size, args.size), bool)
    corners = np.random.default_rng(0).integers(0, args.size - 18, (args.objects, 2))
    for y, x in corners:
        mask[y : y + 12, x : x + 12] = True
    runs = np.count_nonzero(np.diff(mask.ravel(order="F").astype(np.int8)))
    print(f"segflow from {Path(segflow.__file__).parent}")
    print(f"{args.size}x{args.size} mask, {args.objects} objects, {runs} run boundaries")
    print(f"CPU ms, median of {args.repeats}:")
    print(f"  segflow coco_rle: {median_cpu_ms(coco_rle, mask, args.repeats):.1f}")
    try:
        from pycocotools import mask as coco
    except ImportError:
        return
    encode = lambda m: coco.encode(np.asfortranarray(m.astype(np.uint8)))  # noqa: E731
    print(f"  pycocotools encode: {median_cpu_ms(encode, mask, args.repeats):.1f}")


if __name__ == "__main__":
    main()
