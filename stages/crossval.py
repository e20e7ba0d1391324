"""crossval: group k-fold cross-validation of the training recipe (crossval.folds; 0 = off).

Every image (train, val and test alike) is held out once and scored by a model trained as
the train stage trains, on folds that do not hold it. Writes reports/crossval/summary.json
(every fold, mean ± spread, pooled and subset scores, per crossval.scales factor; with
crossval.seeds, every partition's folds and each one's means), folds.csv
and images.csv beside it, and a run in MLflow experiment segflow-crossval. The gate still
reads the test split of the model train produced.

Each fold's training keeps a resume state in artifacts/.resume/crossval/ (not a DVC output,
like train's): an interrupted run continues where it stopped, and unlike train's state it is
kept after the run, so a rerun that changes only what does not reach training (the
inference grids, crossval.scales, crossval.subsets) retrains nothing. Each finished fold's
result is kept beside it (segflow.evaluate.foldstore), so a rerun retunes and rescores only
the folds whose base, train or inference params, scales, images or code changed.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from segflow.artifacts import (
    CONVERTED,
    REPORTS,
    SPLIT,
    data_hash,
    read_manifest,
    replace_dir,
    run_stage,
    write_csv,
    write_json,
)
from segflow.config import PARAMS_FILE, ParamsError, load_params, parse_params
from segflow.paths import repo_root
from segflow.release import tracking
from segflow.runtime import set_threads

OUT = REPORTS / "crossval"  # summary.json (metrics), folds.csv, images.csv
RESUME = Path("artifacts/.resume/crossval")  # seed<s>/fold<i>.pt: each fold's resume state, kept


def main() -> None:
    if not _crossval_section().folds:
        _write_off()
        return
    params = load_params()
    cfg = params.crossval
    # Imported here: training pulls in torch, which an off stage (every default run) need not load.
    from segflow.evaluate.crossval import cross_validate, dataset_groups, describe, summarize_folds

    set_threads(params.train.threads)
    manifest = pd.concat([read_manifest(SPLIT / f"{name}.csv") for name in ("train", "val", "test")])
    samples, groups = dataset_groups(manifest, CONVERTED)
    started = time.perf_counter()
    results = cross_validate(params, samples, groups, RESUME)
    minutes = (time.perf_counter() - started) / 60
    summary = summarize_folds(results, cfg.scales, list(params.base.classes), cfg.subsets)
    _write(summary, results)
    print(describe(summary, cfg.scales))
    print(f"crossval: {len(results)} fold models in {minutes:.1f} min; their training took "
          f"{sum(r.train_seconds for r in results) / 60:.1f} min (where a fold's model came from "
          f"its resume state, in an earlier run; `rm -r {RESUME}` frees their disk space)")  # fmt: skip
    _log(params, summary, results, minutes)


def _write_off() -> None:
    """The files dvc.yaml declares, empty but for the summary: crossval.folds is 0."""
    with replace_dir(OUT) as out:
        write_json(out / "summary.json", {"folds": 0})
        write_csv(out / "folds.csv", [])
        write_csv(out / "images.csv", [])
    print("crossval: off (crossval.folds: 0); set it to 3 or more to cross-validate the recipe")


def _write(summary: dict, results) -> None:
    from segflow.evaluate.crossval import fold_table

    with replace_dir(OUT) as out:
        write_json(out / "summary.json", summary)
        write_csv(out / "folds.csv", fold_table(summary))
        write_csv(out / "images.csv", [row for r in results for row in r.rows])


def _crossval_section():
    """params.yaml's crossval section alone, validated with load_params' messages. Cheap where
    load_params is not (its train checks load torch): most runs have crossval off."""
    from segflow.serve.settings import read_params_file

    raw = read_params_file(repo_root() / PARAMS_FILE, ParamsError, "run from the repository root")
    return parse_params({"crossval": raw.get("crossval") or {}}).crossval


def _log(params, summary: dict, results, minutes: float) -> None:
    import mlflow

    tags = tracking.lineage_tags("crossval", params.digest(), data_hash(SPLIT))
    with tracking.stage_run("crossval", tags, tracking.CROSSVAL_EXPERIMENT):
        logged = params.model_dump(mode="json", include={"train", "inference", "crossval"})
        mlflow.log_params(tracking.flatten("", logged))
        tracking.log_crossval(summary, minutes, sum(r.train_seconds for r in results) / 60, OUT)


if __name__ == "__main__":
    run_stage(main)
