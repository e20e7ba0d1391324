"""How runs and versions are found by content, so DVC's outputs hold no run ids or versions.

A real MLflow store (SQLite in tmp_path), no mocks.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from segflow.release import registry, tracking
from segflow.release.promote import reproducible


@pytest.fixture
def store(tmp_path: Path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    tracking.configure()
    yield mlflow.tracking.MlflowClient(tracking_uri=uri, registry_uri=uri)
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


def _weights(folder: Path, content: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / tracking.MODEL_FILE).write_bytes(content)
    return folder


def test_later_stages_find_the_run_that_made_these_weights(store, tmp_path: Path):
    tags = {"segflow.params_hash": "p" * 64}
    first = _weights(tmp_path / "first", b"weights A")
    with tracking.model_stage_run("train", tags, first, new_model=True) as (run_a, _):
        pass
    tracking.tag_model_run(run_a, first)
    other = _weights(tmp_path / "other", b"weights B")
    with tracking.model_stage_run("train", tags, other, new_model=True) as (run_b, _):
        pass
    tracking.tag_model_run(run_b, other)

    assert tracking.find_model_run(first) == run_a
    assert tracking.find_model_run(other) == run_b
    with tracking.model_stage_run("evaluate", tags, first) as (parent, child):
        assert parent == run_a and child.info.run_id != run_a
    # Weights this store never saw (restored from a DVC remote): a new parent run.
    unseen = _weights(tmp_path / "unseen", b"weights C")
    assert tracking.find_model_run(unseen) is None
    with tracking.model_stage_run("evaluate", tags, unseen) as (parent, _):
        assert parent not in (run_a, run_b)
    assert tracking.find_model_run(unseen) == parent  # and it is tagged for the next stage


def test_promote_finds_the_version_holding_exactly_this_file(store, tmp_path: Path):
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"onnx bytes")
    store.create_registered_model("m")
    for content in (b"older", b"onnx bytes", b"newer"):
        version = store.create_model_version("m", source=str(tmp_path))
        digest = hashlib.sha256(content).hexdigest()
        store.set_model_version_tag("m", version.version, registry.ONNX_KEY_TAG, digest)
    assert registry.find_registered_version(store, "m", onnx) == "2"
    # The same network exported again with other post-processing: matched by both files.
    prep = tmp_path / "preprocessing.json"
    prep.write_text('{"threshold": 0.45}')
    store.set_model_version_tag(
        "m", "2", registry.PREP_KEY_TAG, hashlib.sha256(b'{"threshold": 0.5}').hexdigest()
    )
    version = store.create_model_version("m", source=str(tmp_path)).version
    store.set_model_version_tag(
        "m", version, registry.ONNX_KEY_TAG, hashlib.sha256(b"onnx bytes").hexdigest()
    )
    store.set_model_version_tag("m", version, registry.PREP_KEY_TAG, tracking.file_sha256(prep))
    assert registry.find_registered_version(store, "m", onnx, prep) == "4"
    prep.write_text('{"threshold": 0.5}')
    assert registry.find_registered_version(store, "m", onnx, prep) == "2"
    onnx.write_bytes(b"never registered")
    assert registry.find_registered_version(store, "m", onnx) is None


def test_the_tracked_report_drops_what_differs_between_stores():
    report = {
        "decision": {"promote": True, "checks": []},
        "candidate": {"name": "m", "version": "7", "onnx_sha256": "a" * 64, "metrics": {"dice": 0.9}},
        "champion": {"version": "6", "onnx_sha256": "b" * 64, "metrics": {"dice": 0.8}, "source": "tags"},
        "already_champion": False,
        "test_hash": "t",
        "previous_champion": "6",
        "bento": {"bento_tag": "segflow:abc"},
        "serving": {"bento_tag": "segflow:abc"},
    }
    tracked = reproducible(report)
    assert not {"bento", "serving", "previous_champion", "already_champion"} & set(tracked)
    assert "version" not in tracked["candidate"] and "version" not in tracked["champion"]
    assert tracked["candidate"]["onnx_sha256"] == "a" * 64 and tracked["decision"] == report["decision"]
    assert report["candidate"]["version"] == "7"  # the full report is left as it was


def test_an_experiment_another_run_created_meanwhile_is_used_not_an_error(store, monkeypatch):
    """Two queued experiments' first runs on a fresh store both look, find nothing and create;
    the second create is refused (measured: 2 of 5 such races on SQLite). Here the other run
    creates it between this run's look and its create."""
    import mlflow

    other = store.create_experiment("segflow-race")
    look = mlflow.get_experiment_by_name
    looks = []

    def before_the_other_run_created_it(name):
        looks.append(name)
        return None if len(looks) == 1 else look(name)

    monkeypatch.setattr(mlflow, "get_experiment_by_name", before_the_other_run_created_it)
    assert tracking.use_experiment("segflow-race") == other
    assert mlflow.get_experiment(other).name == "segflow-race"


def test_a_write_refused_by_a_unique_key_is_tried_once_more_and_other_errors_are_not():
    """The store's refusal of a lost get-or-create race (as PostgreSQL words it, measured in
    test_team_server: a dataset input and the challenger alias) costs one more try; any other
    error, or a second refusal, reaches the user. The race itself needs two processes against
    a server: tests/pipeline/test_team_server.py runs it for real."""
    from mlflow.exceptions import MlflowException

    refusal = 'duplicate key value violates unique constraint "registered_model_alias_pk"'
    tries = []

    def lost_the_race_once():
        tries.append(1)
        if len(tries) == 1:
            raise MlflowException(refusal)

    tracking.once_more_if_raced(lost_the_race_once, "alias challenger")
    assert len(tries) == 2

    def refused_always():
        tries.append(1)
        raise MlflowException(refusal)

    tries.clear()
    with pytest.raises(MlflowException, match="unique constraint"):
        tracking.once_more_if_raced(refused_always, "alias challenger")
    assert len(tries) == 2

    def broken():
        tries.append(1)
        raise MlflowException("RESOURCE_DOES_NOT_EXIST: Registered Model with name=x not found")

    tries.clear()
    with pytest.raises(MlflowException, match="not found"):
        tracking.once_more_if_raced(broken, "alias challenger")
    assert len(tries) == 1
