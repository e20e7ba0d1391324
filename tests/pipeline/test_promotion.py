"""The promotion gate end to end: real dvc stages, MLflow registry and BentoML store.

The built Bento served from its own environment, outside the checkout, is
tests/service/test_shipped_bento.py.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from segflow.release.bento import FORBIDDEN_REQUIREMENTS
from tests.conftest import BIN, run

pytestmark = pytest.mark.slow


def _client(repo: Path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{repo / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _champion(repo: Path) -> str:
    return str(_client(repo).get_model_version_by_alias("segflow-segmenter", "champion").version)


def _set_params(repo: Path, **changes: dict) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in changes.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))


def _report(repo: Path) -> dict:
    """The full record of the last promotion: the decision plus registry versions and Bento."""
    return json.loads((repo / "logs/release.json").read_text())


def _decision(repo: Path) -> dict:
    """What DVC tracks: reports/promotion.json, free of anything store-specific."""
    return json.loads((repo / "reports/promotion.json").read_text())


def test_first_model_becomes_champion_with_a_slim_labelled_bento(built_repo: Path):
    report = _report(built_repo)
    assert report["decision"]["promote"] and report["champion"] is None
    assert sorted(c["name"] for c in report["decision"]["checks"]) == [
        "minimum ap50",
        "minimum dice",
        "minimum iou",
    ]
    assert _champion(built_repo) == "1"
    tracked = _decision(built_repo)
    assert tracked["decision"] == report["decision"] and "bento" not in tracked
    assert "version" not in tracked["candidate"]
    onnx = (built_repo / "artifacts/export/model.onnx").read_bytes()
    assert tracked["candidate"]["onnx_sha256"] == hashlib.sha256(onnx).hexdigest()

    packaged = report["bento"]
    requirements = " ".join(packaged["requirements"]).lower()
    assert "onnxruntime" in requirements
    for name in FORBIDDEN_REQUIREMENTS:
        assert not any(r.lower().startswith(name) for r in packaged["requirements"]), name
    assert Path(packaged["dockerfile"]).is_file()
    deploy = list(yaml.safe_load_all(Path(built_repo / packaged["kubernetes"]).read_text()))
    assert deploy[0]["spec"]["template"]["spec"]["containers"][0]["image"] == packaged["bento_tag"]

    bento = json.loads(run(["bentoml", "get", packaged["bento_tag"], "-o", "json"], built_repo).stdout)
    labels = bento["labels"]
    commit = run(["git", "rev-parse", "HEAD"], built_repo).stdout.strip()
    data_hash = json.loads((built_repo / "artifacts/ingested/summary.json").read_text())["data_hash"]
    assert labels["registry_name"] == "segflow-segmenter" and labels["registry_version"] == "1"
    assert labels["git_commit"] == commit and labels["data_hash"] == data_hash
    version = _client(built_repo).get_model_version("segflow-segmenter", "1")
    assert version.tags["validation_status"] == "passed"


def test_worse_model_on_changed_data_is_refused(repo_copy: Path):
    serving = _report(repo_copy)["serving"]
    # New data (so the champion must be re-evaluated on the new test split) and a model
    # that predicts almost nothing (threshold 0.999, not tuned away on val).
    run(["segflow", "sample", "--out", "data", "--count", "16", "--size", "64", "--seed", "7"], repo_copy)
    _set_params(repo_copy, inference={"threshold": 0.999, "tune": False})
    run(["dvc", "repro"], repo_copy)

    report = _report(repo_copy)
    assert not report["decision"]["promote"]
    assert report["champion"]["version"] == "1"
    assert report["champion"]["source"] == "re-evaluated on the current test split"
    failed = {c["name"] for c in report["decision"]["checks"] if not c["passed"]}
    assert "no regression in dice" in failed
    assert _champion(repo_copy) == "1"
    assert "bento" not in report
    assert report["serving"] == serving  # the champion's Bento is still what a checkout serves
    version = _client(repo_copy).get_model_version("segflow-segmenter", report["candidate"]["version"])
    assert version.tags["validation_status"] == "failed"

    strict = run(["segflow", "promote", "--strict"], repo_copy, check=False)
    assert strict.returncode == 1, strict.stdout + strict.stderr
    assert "REFUSED" in strict.stdout
    assert run(["segflow", "promote"], repo_copy).returncode == 0  # refusal is not an error without --strict


def test_new_champion_then_rollback_restores_the_previous_one(repo_copy: Path):
    # The regression allowance is opened wide: this test is about the moves, the gate's
    # arithmetic is covered by the decision-table tests. The candidate is the same network with
    # other post-processing (evaluate and export re-run, training does not): another version.
    _set_params(
        repo_copy,
        inference={"tune": False, "threshold": 0.45},
        promote={"max_regression": {"dice": 1.0, "iou": 1.0, "ap50": 1.0}},
    )
    run(["dvc", "repro"], repo_copy)
    report = _report(repo_copy)
    assert report["decision"]["promote"] and report["previous_champion"] == "1"
    assert _champion(repo_copy) == "2"

    result = run(["segflow", "rollback"], repo_copy)
    assert "version 2 -> version 1" in result.stdout
    assert _champion(repo_copy) == "1"
    bento_tag = result.stdout.strip().splitlines()[-1].split("bento: ")[1]
    bento = json.loads(run(["bentoml", "get", bento_tag, "-o", "json"], repo_copy).stdout)
    assert bento["labels"]["registry_version"] == "1"
    assert _report(repo_copy)["bento"]["bento_tag"] == bento_tag  # the release record follows


def test_service_limit_change_rebuilds_the_bento_on_the_same_model(repo_copy: Path):
    """`serve` limits travel in the Bento: changing one re-runs only promote, which keeps
    the champion and its stored model but builds a new Bento carrying the new limits."""
    before = _report(repo_copy)["bento"]
    _set_params(repo_copy, serve={"max_pixels": 1_000_000})
    result = run(["dvc", "repro"], repo_copy)
    assert "Running stage 'promote'" in result.stdout
    for stage in ("train", "evaluate", "export"):
        assert f"Running stage '{stage}'" not in result.stdout
    report = _report(repo_copy)
    assert report["already_champion"] and _champion(repo_copy) == "1"
    assert report["bento"]["model_tag"] == before["model_tag"]  # no second copy of the model
    assert report["bento"]["bento_tag"] != before["bento_tag"]
    name, version = report["bento"]["bento_tag"].split(":")
    shipped = (
        repo_copy / ".bentoml" / "bentos" / name / version / "src" / "params.yaml"
    )  # BENTOML_HOME's layout
    assert yaml.safe_load(shipped.read_text())["serve"]["max_pixels"] == 1_000_000


def test_concurrent_promotions_take_turns_and_agree_with_their_records(repo_copy: Path, tmp_path: Path):
    """Two checkouts with different candidates promote at once into one MLflow store and one
    BentoML store (as parallel experiments do). They take turns: the first decides against
    version 1 and moves `champion`; the second decides against the champion the first left.
    Each record, the alias and the Bentos agree."""
    shared = {
        "MLFLOW_TRACKING_URI": f"sqlite:///{repo_copy / 'mlflow.db'}",
        "BENTOML_HOME": str(repo_copy / ".bentoml"),
    }
    checkouts = []
    # Two candidates without training: the same network with other post-processing (evaluate
    # and export re-run) is another registered version.
    for name, threshold in (("b", 0.45), ("c", 0.55)):
        checkout = tmp_path / name
        shutil.copytree(repo_copy, checkout, symlinks=True)
        _set_params(
            checkout,
            inference={"tune": False, "threshold": threshold},
            promote={"max_regression": {"dice": 1.0, "iou": 1.0, "ap50": 1.0}},
        )
        run(["dvc", "repro", "export"], checkout, env=shared)  # registers version 2, then 3
        checkouts.append(checkout)
    bentos_before = len(json.loads(run(["bentoml", "list", "-o", "json"], repo_copy, env=shared).stdout))

    # Hold the store's promotion lock until both wait for it, so they truly arrive together.
    with (repo_copy / "mlflow.promote.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        env = {**os.environ, **shared, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
        procs = [
            subprocess.Popen([BIN / "segflow", "promote"], cwd=c, env=env, text=True,
                             stdout=(c / "promote.out").open("w"), stderr=subprocess.STDOUT)
            for c in checkouts
        ]  # fmt: skip
        deadline = time.monotonic() + 300
        while not all("waiting for it" in (c / "promote.out").read_text() for c in checkouts):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [
                (c / "promote.out").read_text() for c in checkouts
            ]
            time.sleep(0.5)
        fcntl.flock(lock, fcntl.LOCK_UN)
    codes = [p.wait(timeout=600) for p in procs]
    outputs = [(c / "promote.out").read_text() for c in checkouts]

    assert codes == [0, 0], outputs
    reports = [_report(c) for c in checkouts]
    first = 0 if reports[0]["previous_champion"] == "1" else 1  # the one that took the lock first
    second = 1 - first
    # Both passed (regressions allowed here): the champion moved twice, each time from where it was.
    assert reports[second]["champion"]["version"] == reports[first]["candidate"]["version"]
    assert reports[second]["previous_champion"] == reports[first]["candidate"]["version"]
    assert _champion(repo_copy) == reports[second]["candidate"]["version"]
    for checkout, report in zip(checkouts, reports, strict=True):
        assert _decision(checkout)["candidate"]["onnx_sha256"] == report["candidate"]["onnx_sha256"]
        built = json.loads(
            run(["bentoml", "get", report["bento"]["bento_tag"], "-o", "json"], repo_copy, env=shared).stdout
        )
        assert built["labels"]["registry_version"] == report["candidate"]["version"]
    bentos = json.loads(run(["bentoml", "list", "-o", "json"], repo_copy, env=shared).stdout)
    assert len(bentos) == bentos_before + 2  # one Bento per decision that promoted


def test_a_champion_moved_outside_the_lock_stops_the_promotion_before_it_acts(built_repo: Path):
    # Another machine promoting against a shared server is not held by this machine's lock:
    # the alias is compared again just before acting, and a moved champion stops it.
    from segflow.errors import UserError
    from segflow.release.gate import version_with_alias
    from segflow.release.promote import _check_champion_unmoved

    client = _client(built_repo)
    now = version_with_alias(client, "segflow-segmenter", "champion")
    _check_champion_unmoved(client, "segflow-segmenter", now)  # unmoved: nothing to say
    with pytest.raises(UserError, match=r"champion moved from none to version 1 .* run promote again"):
        _check_champion_unmoved(client, "segflow-segmenter", None)  # read before there was one
