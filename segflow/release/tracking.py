"""MLflow: where runs go, how a model's runs are grouped, and the lineage every run carries.

Layout in the store:
- experiment `segflow-data`: one run per ingest / convert / split execution;
- experiment `segflow`: one parent run per trained model (params, per-epoch curves, test
  metrics, overlays, the ONNX model), with nested child runs `train`, `evaluate` and
  `export` holding what each stage did. `mlflow ui` thus shows one comparable row per model.
- experiment `segflow-crossval`: one run per cross-validation of the recipe (mean and spread
  per metric, each fold's scores as steps), comparable side by side across recipes.

Nothing run-specific is written into DVC-tracked outputs (two clones reproduce identical
files): evaluate and export find their model's parent run by the sha256 of the weights it
produced (tag `segflow.model_sha256`), and promote finds the registered version of the
exported file by its sha256 (tag `segflow.onnx_sha256`, registry.py). A model restored from DVC's cache
or a remote into another store simply starts a new parent run there.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

from segflow.paths import repo_root, store_root

MODEL_EXPERIMENT = "segflow"
DATA_EXPERIMENT = "segflow-data"
CROSSVAL_EXPERIMENT = "segflow-crossval"
MODEL_FILE = "model.pt"  # in artifacts/model: the weights whose hash names the parent run
MODEL_KEY_TAG = "segflow.model_sha256"  # on a model's parent run

log = logging.getLogger(__name__)


def default_uri() -> str:
    """The embedded store: sqlite:///<repository>/mlflow.db."""
    return f"sqlite:///{store_root() / 'mlflow.db'}"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set, else the embedded store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or default_uri()


_checked: set[str] = set()


def check_store() -> str:
    """Fail with one line (stores.StoreError) unless the tracking store, and the registry's
    when it is another, can take runs; once per store and process. Returns the tracking URI."""
    from segflow.release.stores import check_tracking_store

    uri = tracking_uri()
    for store in dict.fromkeys((uri, os.environ.get("MLFLOW_REGISTRY_URI") or uri)):
        if store not in _checked:
            check_tracking_store(store)
            _checked.add(store)
    return uri


def configure() -> str:
    """Point mlflow at the project's store (call once per process, before logging)."""
    import mlflow

    uri = check_store()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(os.environ.get("MLFLOW_REGISTRY_URI", uri))
    return uri


def use_experiment(name: str) -> str:
    """Select (creating when missing) an experiment; returns its id.

    With the embedded sqlite store, artifacts go to <repository>/mlartifacts/<name> so the
    store and its artifacts sit side by side whatever the working directory. A tracking
    server decides artifact locations itself.
    """
    import mlflow

    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        location = None
        # (mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, so compare, don't test the env.)
        if tracking_uri() == default_uri():
            location = (store_root() / "mlartifacts" / name).as_uri()
        experiment_id = _create_experiment(name, location)
    else:
        experiment_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def _create_experiment(name: str, location: str | None) -> str:
    """Create the experiment, or take the one another process created since we looked.

    Two queued experiments' first runs against a fresh store (`dvc queue start -j 2`) both
    find no experiment and both create it; the store's unique name refuses the second.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        log.info("experiment %r was created by another run meanwhile; using it", name)
        return mlflow.get_experiment_by_name(name).experiment_id


def lineage_tags(stage: str, params_hash: str, data_hash: str | None) -> dict[str, str]:
    """Tags that tie a run to the exact code, data and params that produced it."""
    root = repo_root()
    tags = {
        "segflow.stage": stage,
        "segflow.git_commit": _git(root, "rev-parse", "HEAD") or "unknown",
        "segflow.git_dirty": str(bool(_git(root, "status", "--porcelain", "--untracked-files=no"))).lower(),
        "segflow.params_hash": params_hash,
        "segflow.data_hash": data_hash or "unknown",
    }
    # Set by DVC for stages run by `dvc exp run` (workspace, --temp and queued alike).
    exp_name = os.environ.get("DVC_EXP_NAME")
    if exp_name:
        tags["segflow.dvc_experiment"] = exp_name
        tags["mlflow.runName"] = exp_name
    return tags


def _git(root: Path, *args: str) -> str:
    try:
        result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return result.stdout.strip() if result.returncode == 0 else ""


def log_crossval(summary: dict, minutes: float, train_minutes: float, folder: Path) -> None:
    """On the active crossval run: mean and spread per metric and scale, each fold's scores
    as steps (step = fold, continued by each further partition seed's folds), each seed's
    means, pooled and subset scores, the scores at known object sizes, the
    timings and the report folder."""
    import mlflow

    for key, block in summary.items():
        if not key.startswith("scale_"):
            continue
        for metric, stats in block.items():
            if metric == "per_seed":  # each partition's means (crossval.seeds)
                for row in stats:
                    mlflow.log_metrics(
                        {f"cv_{key}_seed{row['seed']}_{m}": v for m, v in row.items() if m != "seed"}
                    )
            elif metric == "pooled" or metric.startswith("subset_"):
                mlflow.log_metrics({f"cv_{key}_{metric}_{m}": v for m, v in stats.items() if m != "images"})
            elif metric == "known_diameter":  # the folds at each image's true object size
                mlflow.log_metrics(
                    {f"cv_{key}_{metric}_{m}_{k}": s[k] for m, s in stats.items() for k in ("mean", "std")}
                )
            elif metric != "per_fold":
                mlflow.log_metrics(
                    {f"cv_{key}_{metric}_mean": stats["mean"], f"cv_{key}_{metric}_std": stats["std"]}
                )
        for step, row in enumerate(block["per_fold"]):  # step = fold, then the next seed's folds
            scores = {f"fold_{key}_{m}": v for m, v in row.items() if m not in ("seed", "fold", "images")}
            mlflow.log_metrics(scores, step=step)
    mlflow.log_metrics({"cv_minutes": minutes, "cv_train_minutes": train_minutes})
    mlflow.log_artifacts(str(folder), "crossval")


@contextlib.contextmanager
def stage_run(stage: str, tags: dict[str, str], experiment: str = DATA_EXPERIMENT) -> Iterator[object]:
    """A standalone run in the data experiment (ingest, convert, split) or another one (crossval)."""
    import mlflow

    configure()
    use_experiment(experiment)
    with mlflow.start_run(run_name=stage, tags=tags) as run:
        yield run


@contextlib.contextmanager
def model_stage_run(stage: str, tags: dict[str, str], model_dir: Path, new_model: bool = False):
    """Open the model's parent run and a nested child run for `stage`.

    Args:
        stage: train, evaluate, export or promote.
        tags: lineage tags (set on the child; the parent gets them too when created).
        model_dir: artifacts/model; the hash of its model.pt names the parent run.
        new_model: train starts a new parent run (and tags it with tag_model_run once the
            weights exist).

    Yields:
        (parent_run_id, child_run).
    """
    import mlflow

    configure()
    use_experiment(MODEL_EXPERIMENT)
    parent_id = None if new_model else find_model_run(model_dir)
    if parent_id is None:
        run_name = tags.get("mlflow.runName") or f"model-{tags['segflow.params_hash'][:8]}"
        parent_tags = {**tags, "segflow.stage": "model", "mlflow.runName": run_name}
        if (model_dir / MODEL_FILE).is_file():
            parent_tags[MODEL_KEY_TAG] = file_sha256(model_dir / MODEL_FILE)
        with mlflow.start_run(run_name=run_name, tags=parent_tags) as parent:
            parent_id = parent.info.run_id
    with (
        mlflow.start_run(run_id=parent_id),
        mlflow.start_run(run_name=stage, nested=True, tags=tags) as child,
    ):
        yield parent_id, child


def log_datasets(split_dir: Path, splits: tuple[str, ...]) -> None:
    """On the active run: each split's manifest as an MLflow dataset input, so `mlflow ui`
    shows which images made (or scored) which model.

    The dataset is named after the split and logged with it as context; its digest is the
    manifest's hash (the manifest lists every image's and mask's content hash, so the digest
    changes when the data or the split does); the run's `segflow.data_hash` tag names the
    ingested dataset as a whole.
    """
    import warnings

    import mlflow
    import pandas as pd

    for split in splits:
        path = split_dir / f"{split}.csv"
        with warnings.catch_warnings():
            # MLflow registers its local-file source twice and warns that a path is ambiguous,
            # and it hints that integer columns cannot hold missing values (these never miss).
            warnings.filterwarnings("ignore", message=".*can be interpreted in multiple ways")
            warnings.filterwarnings("ignore", message=".*schema contains integer column")
            dataset = mlflow.data.from_pandas(
                pd.read_csv(path), source=path.as_posix(), name=split, digest=file_sha256(path)[:16]
            )
            # Infers the schema (the hint comes here); the store looks the (experiment, name,
            # digest) dataset up and inserts it when missing, a race between queued runs.
            once_more_if_raced(
                lambda dataset=dataset, split=split: mlflow.log_input(dataset, context=split),
                f"dataset {split!r}",
            )


def once_more_if_raced(write: Callable[[], object], what: str) -> None:
    """Run a store write; once more if its insert lost a race with another run's same insert.

    Several MLflow writes (a run's dataset input, a registered model's alias) look for a row and
    insert it when missing, without a lock: two queued experiments against one store (`dvc queue
    start -j 2`, a team server) can both miss it, and the store's unique key refuses the second
    insert. The refused write changed nothing; tried again it finds the row and links or
    updates it. Any other error, or a second refusal, is raised.
    """
    from mlflow.exceptions import MlflowException

    try:
        write()
    except MlflowException as exc:
        message = str(exc).lower()
        if "unique" not in message and "duplicate" not in message:
            raise
        log.info("%s was written by another run meanwhile; writing it once more", what)
        write()


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes (weights and ONNX files are a few MB)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tag_model_run(parent_id: str, model_dir: Path) -> None:
    """Record on the parent run which weights it produced (how later stages find it)."""
    from mlflow.tracking import MlflowClient

    MlflowClient().set_tag(parent_id, MODEL_KEY_TAG, file_sha256(model_dir / MODEL_FILE))


def find_model_run(model_dir: Path) -> str | None:
    """The newest parent run in this store that produced model_dir's weights, if any."""
    import mlflow

    path = model_dir / MODEL_FILE
    if not path.is_file():
        return None
    key = file_sha256(path)
    runs = mlflow.search_runs(
        experiment_names=[MODEL_EXPERIMENT],
        filter_string=f"tags.`{MODEL_KEY_TAG}` = '{key}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
    )
    if not runs:
        # The model came from DVC's cache or a remote, trained against another store (another
        # machine, or a deleted mlflow.db): log to a fresh parent run instead.
        log.info("model %s... has no run in %s; starting a new parent run", key[:12], tracking_uri())
        return None
    return runs[0].info.run_id


def epoch_logger(parent_id: str):
    """A training `on_epoch` callback: each epoch's record on the train run and the model's row."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient()

    def log_epoch(record: dict) -> None:
        metrics = {k: v for k, v in record.items() if k != "epoch"}
        mlflow.log_metrics(metrics, step=record["epoch"])  # the active (train) run
        for key, value in metrics.items():  # the model's row shows the curves too
            client.log_metric(parent_id, key, value, step=record["epoch"])

    return log_epoch


def log_to_parent(
    parent_id: str, metrics: dict[str, float] | None = None, params: dict | None = None
) -> None:
    """Log metrics/params on the parent run (what the runs table compares)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    for key, value in (metrics or {}).items():
        client.log_metric(parent_id, key, float(value))
    for key, value in (params or {}).items():
        client.log_param(parent_id, key, value)


def flatten(prefix: str, data: dict) -> dict[str, object]:
    """{"a": {"b": 1}} -> {"<prefix>a.b": 1}, for logging nested dicts as params/metrics."""
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(f"{name}.", value))
        else:
            flat[name] = value
    return flat
