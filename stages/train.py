"""train: fit the segmentation model; keep the best checkpoint by validation Dice.

An interrupted run (kill, crash, Ctrl-C) leaves a resume state in artifacts/.resume/: the
next `dvc repro` continues from the last completed epoch if params, data and code match.
With train.distributed.nproc above 1 the stage runs itself under torchrun; rank 0 alone
logs and writes (segflow.train.distributed).
"""

from __future__ import annotations

import logging
from pathlib import Path

from segflow.artifacts import (
    CONVERTED,
    MODEL,
    PLOTS,
    SPLIT,
    data_hash,
    read_manifest,
    replace_dir,
    run_stage,
    write_csv,
    write_json,
)
from segflow.config import load_params
from segflow.data.samples import load_samples
from segflow.release import tracking
from segflow.runtime import set_threads
from segflow.train import distributed
from segflow.train.checkpoints import size_head_metrics
from segflow.train.epochs import curve_rows, run_summary, train_seconds, without_timings
from segflow.train.loop import train_model
from segflow.train.resume import discard

CURVES = PLOTS / "train_curves.csv"
# Outside artifacts/model: replace_dir rebuilds that folder from empty on every run.
RESUME = Path("artifacts/.resume/train.pt")


def main() -> None:
    params = load_params()
    nproc = params.train.distributed.nproc
    if nproc > 1 and not distributed.launched():
        distributed.relaunch("stages.train", nproc, params.train.threads)  # does not return
    with distributed.world(params.train.distributed.backend) as world:
        # The processes share the cores train.threads names.
        set_threads(max(1, params.train.threads // world.size))
        train = load_samples(read_manifest(SPLIT / "train.csv"), CONVERTED)
        val = load_samples(read_manifest(SPLIT / "val.csv"), CONVERTED)
        if world.is_main:
            _train_and_record(params, train, val, world)
        else:  # a replica: trains its share of each batch; rank 0 logs and writes
            logging.getLogger("segflow").setLevel(logging.WARNING)
            train_model(params, train, val, MODEL / "model.pt", resume_path=RESUME)


def _train_and_record(params, train, val, world: distributed.World) -> None:
    """Rank 0 (or the only process): train into artifacts/model with MLflow runs around it."""
    processes = f" in {world.size} processes" if world.size > 1 else ""
    tags = tracking.lineage_tags("train", params.digest(), data_hash(SPLIT))
    print(f"train: {len(train)} training and {len(val)} validation images{processes}")

    with replace_dir(MODEL) as out, tracking.model_stage_run("train", tags, out, new_model=True) as runs:
        parent_id, _ = runs
        summary, seconds = _fit_and_log(params, train, val, out, parent_id)
    discard(RESUME)  # the model is in place: nothing left to resume
    print(
        f"train: best val Dice {summary['best_val_dice']:.4f} at epoch {summary['best_epoch']} "
        f"({summary['epochs_run']} epochs, {seconds / 60:.1f} min)"
    )


def _fit_and_log(params, train, val, out, parent_id: str) -> tuple[dict, float]:
    """Train into `out`, logging params and per-epoch curves on the child and parent runs.

    Returns:
        The training summary (best epoch and val Dice, epochs run) and the seconds it took.
    """
    import mlflow

    logged = tracking.flatten("", params.model_dump(mode="json", exclude={"ingest", "convert"}))
    mlflow.log_params(logged)
    tracking.log_datasets(SPLIT, ("train", "val"))
    tracking.log_to_parent(parent_id, params=logged)
    on_epoch = tracking.epoch_logger(parent_id)
    history = train_model(params, train, val, out / "model.pt", on_epoch=on_epoch, resume_path=RESUME)
    tracking.tag_model_run(parent_id, out)
    head = size_head_metrics(out / "model.pt")  # beside training time on the model's row in `mlflow ui`
    tracking.log_to_parent(parent_id, metrics={"train_seconds": train_seconds(history)} | head)
    write_json(out / "history.json", without_timings(history))
    summary = run_summary(history, params.train.epochs) | head | {"data_hash": data_hash(SPLIT)}
    write_json(out / "summary.json", summary)
    write_csv(CURVES, curve_rows(history))
    mlflow.log_artifact(str(CURVES), "plots")
    return summary, train_seconds(history)


if __name__ == "__main__":
    run_stage(main)
