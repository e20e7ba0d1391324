"""Training speed by compute setting: float32 vs bfloat16 autocast, contiguous vs channels-last.

    python bench/train.py                          # the pipeline's split (dvc repro split first)
    python bench/train.py --epochs 20 --settings fp32 bf16 fp32+cl bf16+cl

Trains the model params.yaml describes on artifacts/split (the same data, seed and epochs as
the train stage) once per setting, in this process, and prints for each the median epoch time
(epochs 2 onwards: the first pays one-off start-up costs), its ratio to float32, and the best
validation Dice. A setting the CPU cannot run natively falls back to float32 and says so
(segflow.train.precision).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from segflow.artifacts import CONVERTED, SPLIT, read_manifest  # noqa: E402
from segflow.config import load_params  # noqa: E402
from segflow.data.samples import load_samples  # noqa: E402
from segflow.runtime import configure_logging, set_threads  # noqa: E402
from segflow.train.loop import train_model  # noqa: E402
from segflow.train.precision import Compute  # noqa: E402

SETTINGS = ("fp32", "bf16", "fp32+cl", "bf16+cl")  # +cl: channels-last


def run(params, setting: str, train, val) -> dict:
    precision, _, layout = setting.partition("+")
    cfg = params.train.model_copy(update={"precision": precision, "channels_last": layout == "cl"})
    params = params.model_copy(update={"train": cfg})
    resolved = Compute.resolve(precision, layout == "cl")
    with tempfile.TemporaryDirectory() as tmp:
        history = train_model(params, train, val, Path(tmp) / "model.pt")
    seconds = [r["seconds"] for r in history[1:]] or [history[0]["seconds"]]
    return {
        "setting": setting,
        "ran": resolved.describe(),
        "epochs": len(history),
        "median_epoch_s": round(float(np.median(seconds)), 2),
        "best_val_dice": round(max(r["val_dice"] for r in history), 4),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, help="epochs per run (default: train.epochs)")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    configure_logging()
    os.chdir(ROOT)  # the pipeline's paths are relative to the repository

    params = load_params(ROOT / "params.yaml")
    if args.epochs:
        params = params.model_copy(update={"train": params.train.model_copy(update={"epochs": args.epochs})})
    set_threads(params.train.threads)
    if not (SPLIT / "train.csv").is_file():
        raise SystemExit(f"{SPLIT}/train.csv: no split; run `dvc repro split` first")
    train = load_samples(read_manifest(SPLIT / "train.csv"), CONVERTED)
    val = load_samples(read_manifest(SPLIT / "val.csv"), CONVERTED)
    print(f"{len(train)} training and {len(val)} validation images, {params.train.epochs} epochs per setting")

    results = [run(params, setting, train, val) for setting in args.settings]
    base = next((r for r in results if r["setting"] == "fp32"), results[0])
    print(f"\n{'setting':<10} {'epoch s':>8} {'vs fp32':>8} {'val Dice':>9} {'dDice':>7}  ran as")
    for r in results:
        r["epoch_ratio"] = round(r["median_epoch_s"] / base["median_epoch_s"], 3)
        r["dice_change"] = round(r["best_val_dice"] - base["best_val_dice"], 4)
        print(
            f"{r['setting']:<10} {r['median_epoch_s']:8.2f} {r['epoch_ratio']:8.3f} "
            f"{r['best_val_dice']:9.4f} {r['dice_change']:+7.4f}  {r['ran']}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
