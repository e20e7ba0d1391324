"""The promotion step around the gate: gather numbers, decide, record, act.

`promote()` is what `dvc repro promote` and `segflow promote` run; `rollback()` is
`segflow rollback`. The decision itself is segflow.promotion.decide (pure).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from segflow import bento, tracking
from segflow.artifacts import (
    CONVERTED,
    EXPORT,
    MODEL,
    REPORTS,
    SPLIT,
    StageError,
    data_hash,
    read_json,
    read_manifest,
    write_json,
)
from segflow.config import GATE_METRICS, Params
from segflow.promotion import CHAMPION, decide, move_champion, roll_back_champion, version_with_alias

PROMOTION_REPORT = REPORTS / "promotion.json"


def promote(params: Params) -> dict:
    """Run the gate for the exported candidate and act on its decision.

    Returns:
        The report written to reports/promotion.json ("decision" holds promote/checks).
    """
    import mlflow

    tracking.configure()
    client = mlflow.tracking.MlflowClient()
    registration = read_json(EXPORT / "registration.json")
    name, version = registration["name"], str(registration["version"])
    _require_version(client, name, version)
    candidate = _gate_metrics(read_json(REPORTS / "metrics.json")["test"])
    test_hash = read_json(SPLIT / "summary.json")["test_hash"]

    holder = version_with_alias(client, name, CHAMPION)
    champion = None
    if holder is not None and str(holder.version) != version:
        champion = {"version": str(holder.version), **_champion_metrics(client, holder, test_hash, params)}
    cfg = params.promote
    decision = decide(candidate, champion and champion["metrics"], cfg.minimums, cfg.max_regression)
    report = {
        "decision": decision.to_dict(),
        "candidate": {"name": name, "version": version, "metrics": candidate},
        "champion": champion,
        "already_champion": holder is not None and str(holder.version) == version,
        "test_hash": test_hash,
    }
    status = "passed" if decision.promote else "failed"
    client.set_model_version_tag(name, version, "validation_status", status)
    client.set_model_version_tag(
        name, version, "validation_reasons", "; ".join(decision.reasons) or "all checks passed"
    )
    if decision.promote and not report["already_champion"]:
        report["previous_champion"] = move_champion(client, name, version)
        report["bento"] = package(client, name, version, EXPORT)
    elif decision.promote:
        # Nothing to move, but this step re-runs when the service code or its `serve`
        # limits change (promote's deps): rebuild the champion's Bento with them.
        report["bento"] = package(client, name, version, EXPORT, reuse_model=True)
    write_json(PROMOTION_REPORT, report)
    _log_run(params, report)
    return report


def _log_run(params: Params, report: dict) -> None:
    """A `promote` child run under the candidate's model run: the decision beside its metrics."""
    import mlflow

    tags = tracking.lineage_tags("promote", params.digest(), data_hash(SPLIT))
    tags["segflow.promotion"] = "passed" if report["decision"]["promote"] else "failed"
    with tracking.model_stage_run("promote", tags, MODEL):
        mlflow.log_metric("promoted", int(report["decision"]["promote"]))
        mlflow.log_dict(report, "promotion.json")


def rollback(params: Params) -> dict:
    """Move `champion` back to the previous champion and rebuild its Bento."""
    import mlflow

    tracking.configure()
    client = mlflow.tracking.MlflowClient()
    name = params.export.registered_model_name
    try:
        demoted, restored = roll_back_champion(client, name)
    except ValueError as exc:
        raise StageError(str(exc)) from None
    with tempfile.TemporaryDirectory() as tmp:
        folder = download_model(name, restored, Path(tmp))
        packaged = package(client, name, restored, folder)
    return {"demoted": demoted, "champion": restored, "bento": packaged}


def package(client, name: str, version: str, model_dir: Path, reuse_model: bool = False) -> dict:
    """Import a registry version's files into the BentoML store and build its Bento.

    With reuse_model, a model already imported for this registry version is used as is.
    """
    info = client.get_model_version(name, version)
    tags = info.tags
    labels = {
        "registry_name": name,
        "registry_version": str(version),
        "alias": "champion",  # the Bento is only ever built for the champion
        "git_commit": tags.get("segflow.git_commit", "unknown"),
        "data_hash": tags.get("segflow.data_hash", "unknown"),
    }
    metadata = {"test_metrics": {k[5:]: float(v) for k, v in tags.items() if k.startswith("test_")}}
    model_tag = (reuse_model and bento.find_model(name, version)) or bento.import_model(
        model_dir, labels, metadata
    )
    bento_tag, dockerfile = bento.build_bento(model_tag, labels)
    requirements = bento.bento_requirements(bento_tag)
    return {
        "model_tag": model_tag,
        "bento_tag": bento_tag,
        "dockerfile": str(dockerfile),
        "size_bytes": bento.bento_size(bento_tag),
        "requirements": requirements,
    }


def download_model(name: str, version: str, dest: Path) -> Path:
    """Fetch a registered version's model.onnx, preprocessing.json (and reference.json) into `dest`."""
    import shutil

    import mlflow

    from segflow.monitoring import REFERENCE_FILE

    local = Path(
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(dest))
    )
    for source in (local / "model.onnx", local / "extra_files" / "preprocessing.json"):
        if not source.is_file():
            raise StageError(f"registered {name} version {version} has no {source.name}; re-export it")
        if source.parent != dest:
            shutil.copyfile(source, dest / source.name)
    reference = local / "extra_files" / REFERENCE_FILE  # absent in versions exported before drift
    if reference.is_file() and reference.parent != dest:
        shutil.copyfile(reference, dest / REFERENCE_FILE)
    return dest


def _require_version(client, name: str, version: str) -> None:
    """Fail clearly when the exported candidate is not in this store (another machine's)."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_model_version(name, version)
    except MlflowException:
        raise StageError(
            f"{name} version {version} (from {EXPORT / 'registration.json'}) is not in the registry at "
            f"{tracking.tracking_uri()}; re-register it with `dvc repro -f export`"
        ) from None


def _gate_metrics(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if k in GATE_METRICS}


def _champion_metrics(client, holder, test_hash: str, params: Params) -> dict:
    """The champion's scores on the current test split: from its tags, or re-measured.

    Tags are used only when the champion was evaluated on exactly this test split; after a
    data or split change it is re-evaluated through segflow.inference.
    """
    tags = holder.tags
    if tags.get("segflow.test_hash") == test_hash:
        metrics = {
            k[5:]: float(v) for k, v in tags.items() if k.startswith("test_") and k[5:] in GATE_METRICS
        }
        return {"metrics": metrics, "source": "registry tags (same test split)"}
    return {
        "metrics": evaluate_version(holder.name, str(holder.version)),
        "source": "re-evaluated on the current test split",
    }


def evaluate_version(name: str, version: str) -> dict[str, float]:
    """Score a registered version on the current test split through segflow.inference."""
    from segflow.evaluation import score_split
    from segflow.inference import Segmenter
    from segflow.training import load_samples

    test = load_samples(read_manifest(SPLIT / "test.csv"), CONVERTED)
    with tempfile.TemporaryDirectory() as tmp:
        folder = download_model(name, version, Path(tmp))
        segmenter = Segmenter.from_onnx(folder / "model.onnx", folder / "preprocessing.json")
        summary = score_split(segmenter, test, "test").summary
    return _gate_metrics(summary)


def describe(report: dict) -> str:
    """A few lines for the terminal."""
    decision = report["decision"]
    candidate = report["candidate"]
    lines = [f"candidate {candidate['name']} version {candidate['version']}"]
    if report.get("champion"):
        lines.append(f"champion  version {report['champion']['version']} ({report['champion']['source']})")
    for check in decision["checks"]:
        lines.append(f"  [{'ok' if check['passed'] else 'FAIL'}] {check['detail']}")
    if report.get("already_champion"):
        lines.append(f"version {candidate['version']} is already the champion: nothing to move")
    elif decision["promote"]:
        lines.append(f"PROMOTED: version {candidate['version']} is now 'champion'")
    else:
        lines.append("REFUSED: the champion is unchanged")
    if decision["promote"] and report.get("bento"):
        tag = report["bento"]["bento_tag"]
        lines.append(f"bento: {tag} (serve it with `bentoml serve {tag}`)")
        lines.append(f"  size {report['bento']['size_bytes'] / 1e6:.1f} MB with its model")
        lines.append(f"  requirements: {', '.join(report['bento']['requirements'])}")
        lines.append(f"  Dockerfile: {report['bento']['dockerfile']}")
    return "\n".join(lines)
