"""The promotion step around the gate: gather numbers, decide, record, act.

`promote()` is what `dvc repro promote` and `segflow promote` run; `rollback()` is
`segflow rollback`. The decision itself is segflow.release.gate.decide (pure).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

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
from segflow.release import bento, kubernetes, registry, stores, tracking
from segflow.release.gate import (
    CHAMPION,
    Decision,
    decide,
    move_champion,
    roll_back_champion,
    rollback_target,
    version_with_alias,
)
from segflow.serve.precision import INT8_FILE
from segflow.serve.settings import RELEASE_RECORD

log = logging.getLogger(__name__)

PROMOTION_REPORT = REPORTS / "promotion.json"
KUBERNETES_FILE = RELEASE_RECORD.parent / "kubernetes.yaml"  # the champion's Bento, deployed
# Registry versions and Bento tags are run-specific, so they go to RELEASE_RECORD
# (logs/release.json, outside DVC's outputs; a checkout's service reads its model tag there).
# Run-specific entries of the full report, left out of PROMOTION_REPORT.
_RUN_SPECIFIC = ("already_champion", "previous_champion", "bento", "serving")


def promote(params: Params) -> dict:
    """Run the gate for the exported candidate and act on its decision.

    Deciding and acting (tags, the alias, the Bento, the reports) happen under the store's
    promotion lock, so concurrent promotions (parallel experiments, several checkouts) take
    turns and each decides against the champion the previous one left. A champion moved
    between reading and acting by someone outside the lock (a promotion on another machine
    against a server) makes this one change nothing and fail, so the report, the alias and
    the Bento never disagree.

    Returns:
        The full report: what reports/promotion.json holds (decision, checks, the candidate's
        and champion's metrics and ONNX hashes) plus the registry versions and the Bento,
        which go to logs/release.json. Given the same data, code and registry state (a fresh
        clone has none), reports/promotion.json has the same bytes.
    """
    import mlflow

    tracking.configure()
    stores.check_bentoml_store()  # before anything moves: the alias must not get ahead of the Bento
    client = mlflow.tracking.MlflowClient()
    name = params.export.registered_model_name
    with promotion_lock(name):
        holder = version_with_alias(client, name, CHAMPION)
        report, decision = _decide(client, params, holder)
        _check_champion_unmoved(client, name, holder)
        _act(client, report, decision)
        write_json(PROMOTION_REPORT, reproducible(report))
        write_json(RELEASE_RECORD, report)
    _log_run(params, report)
    return report


def _decide(client, params: Params, holder) -> tuple[dict, Decision]:
    """The gate's decision for the exported candidate against `holder` (the champion's
    version, or None), and the report describing it."""
    name = params.export.registered_model_name
    version = _candidate_version(client, name)
    candidate = _gate_metrics(read_json(REPORTS / "metrics.json")["test"])
    test_hash = read_json(SPLIT / "summary.json")["test_hash"]
    same_files = registry.file_tags(EXPORT / "model.onnx", EXPORT / "preprocessing.json", EXPORT / INT8_FILE)
    onnx_sha256 = same_files[registry.ONNX_KEY_TAG]
    if holder is not None and all(holder.tags.get(k) == v for k, v in same_files.items()):
        # Deterministic training re-exports the same file as a new version after a code edit
        # that changes nothing: the champion already holds this model, so nothing moves.
        version = str(holder.version)
    champion = None
    if holder is not None and str(holder.version) != version:
        champion = {
            "version": str(holder.version),
            "onnx_sha256": holder.tags.get(registry.ONNX_KEY_TAG),
            **_champion_metrics(client, holder, test_hash, params),
        }
    cfg = params.promote
    decision = decide(candidate, champion and champion["metrics"], cfg.minimums, cfg.max_regression)
    report = {
        "decision": decision.to_dict(),
        "candidate": {
            "name": name,
            "version": version,
            "onnx_sha256": onnx_sha256,
            "metrics": candidate,
        },
        "champion": champion,
        "already_champion": holder is not None and str(holder.version) == version,
        "test_hash": test_hash,
    }
    return report, decision


def _act(client, report: dict, decision: Decision) -> None:
    """Record the decision on the candidate's version; if it passed, build the Bento and move
    the alias. Fills report's previous_champion, bento and serving."""
    name, version = report["candidate"]["name"], report["candidate"]["version"]
    status = "passed" if decision.promote else "failed"
    client.set_model_version_tag(name, version, "validation_status", status)
    client.set_model_version_tag(
        name, version, "validation_reasons", "; ".join(decision.reasons) or "all checks passed"
    )
    if decision.promote and not report["already_champion"]:
        # The Bento first: a build that fails leaves the alias (and what it serves) unmoved.
        report["bento"] = package(client, name, version, EXPORT)
        report["previous_champion"] = move_champion(client, name, version)
    elif decision.promote:
        # Nothing to move, but this step re-runs when the service code or its `serve`
        # limits change (promote's deps): rebuild the champion's Bento with them.
        report["bento"] = package(client, name, version, EXPORT, reuse_model=True)
    # What the champion's Bento is now: this one, or (refused) the one served before.
    report["serving"] = report.get("bento") or _served_before()


@contextlib.contextmanager
def promotion_lock(name: str) -> Iterator[None]:
    """One promotion at a time per tracking store on this machine: an exclusive lock on a file
    beside the SQLite store (shared by every checkout that logs to it), or, for a server, in
    the temporary folder. Promotions on other machines against a server are kept apart by
    _check_champion_unmoved alone: MLflow's registry has no compare-and-set of its own.
    Deciding under the lock may evaluate the champion on the test split (when its recorded
    metrics are not comparable); others wait meanwhile, and say so."""
    uri = tracking.tracking_uri()
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///")).with_suffix(".promote.lock")
    else:
        path = (
            Path(tempfile.gettempdir())
            / f"segflow-promote-{hashlib.sha256(uri.encode()).hexdigest()[:16]}.lock"
        )
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another promotion of %s is acting (lock %s); waiting for it", name, path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _check_champion_unmoved(client, name: str, read) -> None:
    """Raise StageError if `champion` has left the version (or absence) the decision was made
    against: something outside this machine's promotion lock moved it meanwhile."""
    now = version_with_alias(client, name, CHAMPION)
    before = None if read is None else str(read.version)
    after = None if now is None else str(now.version)
    if before != after:
        raise StageError(
            f"{name}'s champion moved from {before or 'none'} to version {after or 'none'} while this "
            "promotion was deciding against it (a promotion or rollback on another machine acted "
            "first); nothing was changed: run promote again to decide against the new champion"
        )


def _served_before() -> dict | None:
    """The `serving` entry of the last release record, if any (kept when the gate refuses)."""
    try:
        return json.loads(RELEASE_RECORD.read_text()).get("serving")
    except (OSError, ValueError, AttributeError):
        return None


def reproducible(report: dict) -> dict:
    """The report without registry versions and Bento tags (which differ from store to store)."""
    out = {k: v for k, v in report.items() if k not in _RUN_SPECIFIC}
    out["candidate"] = {k: v for k, v in report["candidate"].items() if k != "version"}
    if report.get("champion"):
        out["champion"] = {k: v for k, v in report["champion"].items() if k != "version"}
    return out


def _candidate_version(client, name: str) -> str:
    """The registered version holding artifacts/export/model.onnx, found by the file's hash."""
    version = registry.find_registered_version(
        client, name, EXPORT / "model.onnx", EXPORT / "preprocessing.json"
    )
    if version is None:
        raise StageError(
            f"{EXPORT / 'model.onnx'} is not registered as a version of {name} in "
            f"{tracking.tracking_uri()} (it came from DVC's cache or a remote, not from an export "
            "into this store); register it with `dvc repro --force --single-item export`"
        )
    return version


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
    stores.check_bentoml_store()
    client = mlflow.tracking.MlflowClient()
    name = params.export.registered_model_name
    with promotion_lock(name), tempfile.TemporaryDirectory() as tmp:
        _, restored = rollback_target(client, name)  # UserError when there is nothing to restore
        folder = download_model(name, restored, Path(tmp))
        packaged = package(client, name, restored, folder)  # before the alias moves, as in _act
        demoted, restored = roll_back_champion(client, name)
        record = {
            "rollback": True,
            "demoted": demoted,
            "champion": restored,
            "bento": packaged,
            "serving": packaged,
        }
        write_json(RELEASE_RECORD, record)  # what is served now, as after a promotion
    return record


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
    deploy = kubernetes.write_manifests(KUBERNETES_FILE, kubernetes.manifests(bento_tag, labels))
    return {
        "model_tag": model_tag,
        "bento_tag": bento_tag,
        "dockerfile": str(dockerfile),
        "kubernetes": str(deploy),
        "size_bytes": bento.bento_size(bento_tag),
        "requirements": requirements,
    }


def download_model(name: str, version: str, dest: Path) -> Path:
    """Fetch a registered version's model.onnx, preprocessing.json (and the optional files:
    the drift reference, the INT8 variant and its check) into `dest`."""
    import shutil

    import mlflow

    local = Path(
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(dest))
    )
    for source in (local / "model.onnx", local / "extra_files" / "preprocessing.json"):
        if not source.is_file():
            raise StageError(f"registered {name} version {version} has no {source.name}; re-export it")
        if source.parent != dest:
            shutil.copyfile(source, dest / source.name)
    for name in bento.OPTIONAL_MODEL_FILES:  # absent in versions exported before them
        extra = local / "extra_files" / name
        if extra.is_file() and extra.parent != dest:
            shutil.copyfile(extra, dest / name)
    return dest


def _gate_metrics(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if k in GATE_METRICS}


def _champion_metrics(client, holder, test_hash: str, params: Params) -> dict:
    """The champion's scores on the current test split: from its tags, or re-measured.

    Tags are used only when the champion was evaluated on exactly this test split; after a
    data or split change it is re-evaluated through segflow.core.inference.
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
    """Score a registered version on the current test split through segflow.core.inference."""
    from segflow.core.inference import Segmenter
    from segflow.data.samples import load_samples
    from segflow.evaluate.scoring import score_split

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
