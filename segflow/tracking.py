"""MLflow: where runs go, how a model's runs are grouped, and the lineage every run carries.

Layout in the store:
- experiment `segflow-data`: one run per ingest / convert / split execution;
- experiment `segflow`: one parent run per trained model (params, per-epoch curves, test
  metrics, overlays, the ONNX model), with nested child runs `train`, `evaluate` and
  `export` holding what each stage did. `mlflow ui` thus shows one comparable row per model.

The parent run id travels from train to evaluate and export in artifacts/model/run.json.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from segflow.paths import repo_root, store_root

MODEL_EXPERIMENT = "segflow"
DATA_EXPERIMENT = "segflow-data"
RUN_FILE = "run.json"


def default_uri() -> str:
    """The embedded store: sqlite:///<repository>/mlflow.db."""
    return f"sqlite:///{store_root() / 'mlflow.db'}"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set, else the embedded store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or default_uri()


def configure() -> str:
    """Point mlflow at the project's store (call once per process, before logging)."""
    import mlflow

    uri = tracking_uri()
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
        experiment_id = mlflow.create_experiment(name, artifact_location=location)
    else:
        experiment_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


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


@contextlib.contextmanager
def stage_run(stage: str, tags: dict[str, str]) -> Iterator[object]:
    """A standalone run in the data experiment (ingest, convert, split)."""
    import mlflow

    configure()
    use_experiment(DATA_EXPERIMENT)
    with mlflow.start_run(run_name=stage, tags=tags) as run:
        yield run


@contextlib.contextmanager
def model_stage_run(stage: str, tags: dict[str, str], model_dir: Path, new_model: bool = False):
    """Open the model's parent run and a nested child run for `stage`.

    Args:
        stage: train, evaluate or export.
        tags: lineage tags (set on the child; the parent gets them too when created).
        model_dir: artifacts/model; its run.json names the parent run.
        new_model: train starts a new parent run and writes run.json.

    Yields:
        (parent_run_id, child_run).
    """
    import mlflow

    configure()
    use_experiment(MODEL_EXPERIMENT)
    parent_id = None if new_model else _existing_parent(model_dir)
    if parent_id is None:
        run_name = tags.get("mlflow.runName") or f"model-{tags['segflow.params_hash'][:8]}"
        parent_tags = {**tags, "segflow.stage": "model", "mlflow.runName": run_name}
        with mlflow.start_run(run_name=run_name, tags=parent_tags) as parent:
            parent_id = parent.info.run_id
        (model_dir / RUN_FILE).parent.mkdir(parents=True, exist_ok=True)
        (model_dir / RUN_FILE).write_text(json.dumps({"run_id": parent_id}) + "\n")
    with (
        mlflow.start_run(run_id=parent_id),
        mlflow.start_run(run_name=stage, nested=True, tags=tags) as child,
    ):
        yield parent_id, child


def _existing_parent(model_dir: Path) -> str | None:
    """The parent run id from run.json, if that run exists in the current store."""
    import mlflow
    from mlflow.exceptions import MlflowException

    path = model_dir / RUN_FILE
    if not path.is_file():
        return None
    run_id = json.loads(path.read_text()).get("run_id")
    try:
        mlflow.get_run(run_id)
    except MlflowException:
        # The model came from DVC's cache but its runs were logged to another store
        # (another machine, or a deleted mlflow.db): log to a fresh parent instead.
        print(f"note: model run {run_id} is not in {tracking_uri()}; starting a new parent run")
        return None
    return run_id


def parent_run_id(model_dir: Path) -> str | None:
    """The parent run id recorded by train (None before training)."""
    path = model_dir / RUN_FILE
    return json.loads(path.read_text()).get("run_id") if path.is_file() else None


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


def register_onnx(
    parent_id: str,
    onnx_path: Path,
    preprocessing_path: Path,
    input_example,
    registered_name: str,
    version_tags: dict[str, str],
    extra_files: tuple[Path, ...] = (),
) -> dict:
    """Log the ONNX model on the model's parent run and register it as `challenger`.

    The model carries preprocessing.json (plus `extra_files`, e.g. the drift reference)
    as extra files and the preprocessing in its metadata, so a registered version alone
    is enough to serve it.

    Returns:
        {"name", "version", "alias", "model_uri", "run_id"}.
    """
    import mlflow
    import numpy as np
    import onnx
    from mlflow.models import ModelSignature
    from mlflow.tracking import MlflowClient
    from mlflow.types import Schema, TensorSpec

    prep = json.loads(preprocessing_path.read_text())
    channels_out = 1 if len(prep["classes"]) == 2 else len(prep["classes"])  # binary: one logit
    signature = ModelSignature(
        inputs=Schema(
            [TensorSpec(np.dtype("float32"), (-1, prep["in_channels"], -1, -1), prep["input_name"])]
        ),
        outputs=Schema([TensorSpec(np.dtype("float32"), (-1, channels_out, -1, -1), prep["output_name"])]),
    )
    with mlflow.start_run(run_id=parent_id):
        info = mlflow.onnx.log_model(
            onnx_model=onnx.load(str(onnx_path)),
            name="model",
            registered_model_name=registered_name,
            signature=signature,
            input_example=input_example,
            extra_files=[str(preprocessing_path), *map(str, extra_files)],
            metadata={"preprocessing": prep},
            save_as_external_data=False,
            onnx_execution_providers=["CPUExecutionProvider"],
        )
    version = str(info.registered_model_version)
    client = MlflowClient()
    client.set_registered_model_alias(registered_name, "challenger", version)
    for key, value in version_tags.items():
        client.set_model_version_tag(registered_name, version, key, str(value))
    return {
        "name": registered_name,
        "version": version,
        "alias": "challenger",
        "model_uri": f"models:/{registered_name}/{version}",
        "run_id": parent_id,
    }
