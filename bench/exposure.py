"""How exposure changes move a model's Dice: intensity scaling `range` against `percentile`.

    python bench/exposure.py artifacts/export                  # the current export
    python bench/exposure.py MODEL_DIR [MODEL_DIR ...] --gains 1 0.5 0.25 1.2

Each MODEL_DIR holds model.onnx and preprocessing.json (artifacts/export, or a registered
version's folder under mlartifacts/). The val and test images of artifacts/split are
multiplied by each gain (clipped to the dtype's range, as a camera would) and segmented
through segflow.core.inference; the table gives foreground Dice per model and gain. Run from the
repository root after `dvc repro`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from segflow.core.images import read_image
from segflow.core.inference import Segmenter
from segflow.evaluate.metrics import confusion, summarize

CONVERTED, SPLIT = Path("artifacts/converted"), Path("artifacts/split")


def load_split() -> tuple[list[np.ndarray], list[np.ndarray]]:
    rows = pd.concat([pd.read_csv(SPLIT / f"{name}.csv") for name in ("val", "test")])
    images = [read_image(CONVERTED / r.image) for r in rows.itertuples()]
    masks = [read_image(CONVERTED / r.mask) for r in rows.itertuples()]
    return images, masks


def with_gain(image: np.ndarray, gain: float) -> np.ndarray:
    """The image as if exposed `gain` times as long, saturating like a sensor."""
    if not np.issubdtype(image.dtype, np.integer):
        return np.clip(image * gain, 0.0, 1.0).astype(image.dtype)
    top = np.iinfo(image.dtype).max
    return np.clip(np.rint(image.astype(np.float64) * gain), 0, top).astype(image.dtype)


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--gains", nargs="+", type=float, default=[1.0, 0.5, 0.25, 1.2])
    args = parser.parse_args()
    images, masks = load_split()
    print(f"{len(images)} val+test images; foreground Dice at each gain")
    print("model".ljust(48) + "scaling".ljust(12) + "".join(f"x{g:<9g}" for g in args.gains))
    for folder in args.models:
        onnx = next(folder.rglob("model.onnx"), None) or next(folder.rglob("*.onnx"))
        prep = next(folder.rglob("preprocessing.json"))
        segmenter = Segmenter.from_onnx(onnx, prep)
        cells = []
        for gain in args.gains:
            predictions = segmenter.predict([with_gain(image, gain) for image in images])
            counts = [confusion(p.mask, m) for p, m in zip(predictions, masks, strict=True)]
            cells.append(f"{summarize(counts)['dice']:<10.4f}")
        scaling = json.loads(prep.read_text()).get("scaling", "range")
        print(str(folder)[-47:].ljust(48) + scaling.ljust(12) + "".join(cells))


if __name__ == "__main__":
    main()
