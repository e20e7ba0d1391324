"""Concurrent writers on one MLflow SQLite store: do they hit "database is locked"?

    python bench/store_writers.py --writers 8 --runs 60      # a new store in a temporary folder
    python bench/store_writers.py --store /tmp/s.db --writers 2

Each writer process does, per run, what a stage does to the store: create a run, log five
metrics, a parameter and a tag, search runs, end the run. Prints one line:

    writers 8 x runs 60: ok 480, 'database is locked' 0, other errors 0, 14 s
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

EXPERIMENT = "store-writers"


def writer(uri: str, runs: int, results) -> None:
    import mlflow

    logging.getLogger("mlflow").setLevel(logging.ERROR)
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    ok = locked = other = 0
    for i in range(runs):
        try:
            run_id = client.create_run(experiment).info.run_id
            for step in range(5):
                client.log_metric(run_id, "loss", 1.0 / (step + 1), step=step)
            client.log_param(run_id, "index", i)
            client.set_tag(run_id, "writer", "bench")
            client.search_runs([experiment], max_results=5)
            client.set_terminated(run_id)
            ok += 1
        except Exception as exc:  # count what failed, and how
            if "database is locked" in str(exc):
                locked += 1
            else:
                other += 1
                print(f"{type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr)
    results.put((ok, locked, other))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument("--runs", type=int, default=100, help="runs per writer")
    parser.add_argument("--store", type=Path, help="SQLite file to create (default: a temporary one)")
    args = parser.parse_args()

    import mlflow

    folder = tempfile.TemporaryDirectory()
    store = args.store or Path(folder.name) / "mlflow.db"
    if store.exists():
        raise SystemExit(f"{store} exists; name a new file (the benchmark starts from an empty store)")
    uri = f"sqlite:///{store.resolve()}"
    mlflow.MlflowClient(uri).create_experiment(EXPERIMENT)
    results = multiprocessing.Queue()
    processes = [
        multiprocessing.Process(target=writer, args=(uri, args.runs, results)) for _ in range(args.writers)
    ]
    started = time.perf_counter()
    for process in processes:
        process.start()
    counts = [results.get() for _ in processes]
    for process in processes:
        process.join()
    ok, locked, other = (sum(c[i] for c in counts) for i in range(3))
    print(
        f"writers {args.writers} x runs {args.runs}: ok {ok}, 'database is locked' {locked}, "
        f"other errors {other}, {time.perf_counter() - started:.0f} s"
    )
    folder.cleanup()
    return 0 if locked == other == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
