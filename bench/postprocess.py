"""CPU time of what the service does per image besides the model: post-processing (logits ->
mask and objects, segflow.core.postprocessing.to_prediction) and the JSON answer
(segflow.serve.answers.answer), on the champion's own logits for the sample images.

    python bench/postprocess.py                  # data/images, the champion in the BentoML store
    python bench/postprocess.py --images data/shifted/images

To compare with another checkout, put that checkout first on the path:
`PYTHONPATH=/path/to/other/checkout python bench/postprocess.py` (the model and images
still come from this one).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # after PYTHONPATH: see above

import segflow  # noqa: E402
from segflow.core.images import read_image  # noqa: E402
from segflow.core.inference import Segmenter  # noqa: E402
from segflow.core.postprocessing import sigmoid, to_prediction  # noqa: E402
from segflow.serve.answers import answer  # noqa: E402
from segflow.serve.settings import champion_model_tag  # noqa: E402


def cpu_ms_per_call(function, count: int, repeats: int) -> float:
    """CPU milliseconds per call of function(i) for i in 0..count-1, best of 3 rounds of `repeats`."""
    for i in range(count):
        function(i)  # warm
    best = float("inf")
    for _ in range(3):
        started = time.process_time()
        for i in range(repeats):
            function(i % count)
        best = min(best, (time.process_time() - started) / repeats)
    return 1000 * best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=Path, default=ROOT / "data" / "images")
    parser.add_argument("--count", type=int, default=16, help="distinct images")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()

    import bentoml
    import cv2

    cv2.setNumThreads(1)  # as the service runs it (service.py)
    folder = Path(bentoml.models.get(os.environ.get("SEGFLOW_MODEL_TAG") or champion_model_tag(ROOT)).path)
    segmenter = Segmenter.from_onnx(folder / "model.onnx", folder / "preprocessing.json")
    prep = segmenter.prep
    paths = sorted(args.images.glob("*.png"))[: args.count]
    if not paths:
        raise SystemExit(f"{args.images}: no PNG images; run `make data` or pass --images")
    images = [read_image(p) for p in paths]
    logits = [segmenter.logits([image])[0] for image in images]
    predictions = [to_prediction(logit, prep) for logit in logits]
    model = {"name": "segflow-segmenter", "version": "1", "alias": "champion", "tag": "bench"}
    count = len(images)
    objects = [int(p.instances.max()) for p in predictions]
    print(f"segflow from {Path(segflow.__file__).parent}")
    print(f"{count} images {images[0].shape}, {prep.instances}, {np.mean(objects):.1f} objects per image")
    timings = {
        "sigmoid of one logit plane": cpu_ms_per_call(lambda i: sigmoid(logits[i][0]), count, args.repeats),
        "post-processing (to_prediction)": cpu_ms_per_call(
            lambda i: to_prediction(logits[i], prep), count, args.repeats
        ),
        "answer (objects, polygons, RLE)": cpu_ms_per_call(
            lambda i: answer(images[i], predictions[i], list(prep.classes), model), count, args.repeats
        ),
    }
    for name, ms in timings.items():
        print(f"{name:<34} {ms:7.3f} ms CPU per image")


if __name__ == "__main__":
    main()
