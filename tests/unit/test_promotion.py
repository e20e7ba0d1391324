"""The gate's decision table, and alias moves on a real (temporary) MLflow registry."""

from __future__ import annotations

import math

import pytest

from segflow.release.gate import decide

MINIMUMS = {"dice": 0.85, "iou": 0.75}
REGRESSION = {"dice": 0.005, "iou": 0.01}


def test_first_champion_needs_only_the_thresholds():
    decision = decide({"dice": 0.90, "iou": 0.80}, None, MINIMUMS, REGRESSION)
    assert decision.promote
    assert [c.name for c in decision.checks] == ["minimum dice", "minimum iou"]
    assert decision.reasons == []


def test_below_a_minimum_fails_and_names_the_metric():
    decision = decide({"dice": 0.84, "iou": 0.80}, None, MINIMUMS, REGRESSION)
    assert not decision.promote
    assert decision.reasons == ["dice 0.8400 < minimum 0.8500"]
    failed = [c for c in decision.checks if not c.passed]
    assert failed[0].value == 0.84 and failed[0].threshold == 0.85


def test_better_than_champion_passes():
    decision = decide({"dice": 0.95, "iou": 0.90}, {"dice": 0.93, "iou": 0.88}, MINIMUMS, REGRESSION)
    assert decision.promote
    assert len(decision.checks) == 4


def test_within_allowed_regression_passes():
    decision = decide({"dice": 0.926, "iou": 0.871}, {"dice": 0.93, "iou": 0.88}, MINIMUMS, REGRESSION)
    assert decision.promote


def test_regression_beyond_allowance_fails_even_above_minimums():
    decision = decide({"dice": 0.90, "iou": 0.86}, {"dice": 0.93, "iou": 0.88}, MINIMUMS, REGRESSION)
    assert not decision.promote
    assert decision.reasons == [
        "dice 0.9000 vs champion 0.9300 (beyond allowed regression 0.0050)",
        "iou 0.8600 vs champion 0.8800 (beyond allowed regression 0.0100)",
    ]
    check = next(c for c in decision.checks if c.name == "no regression in dice")
    assert check.threshold == pytest.approx(0.925)


def test_missing_candidate_metric_fails():
    decision = decide({"iou": 0.9}, None, MINIMUMS, REGRESSION)
    assert not decision.promote
    assert "dice: candidate has no value" in decision.reasons


def test_metric_the_champion_never_had_is_not_compared():
    decision = decide({"dice": 0.95, "iou": 0.9}, {"dice": 0.94}, MINIMUMS, REGRESSION)
    assert decision.promote
    check = next(c for c in decision.checks if c.name == "no regression in iou")
    assert check.passed and math.isnan(check.threshold)


def test_decision_serialises_every_check():
    data = decide({"dice": 0.5, "iou": 0.5}, {"dice": 0.9, "iou": 0.8}, MINIMUMS, REGRESSION).to_dict()
    assert data["promote"] is False
    assert len(data["checks"]) == 4 and len(data["reasons"]) == 4
    assert set(data["checks"][0]) == {"name", "metric", "value", "threshold", "passed", "detail"}


# --- alias moves on a real, temporary MLflow registry ---------------------------------


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """A sqlite MLflow store holding three registered versions of a tiny ONNX model."""
    import mlflow
    import onnx
    from onnx import TensorProto, helper

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["image"], ["logits"])],
        "identity",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 1, "h", "w"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 1, "h", "w"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    # An explicit artifact location: the default (./mlruns) would write into the checkout.
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("t", (tmp_path / "art").as_uri()))
    for _ in range(3):
        with mlflow.start_run():
            mlflow.onnx.log_model(onnx.load(str(path)), name="m", registered_model_name="seg")
    yield mlflow.tracking.MlflowClient()
    mlflow.set_tracking_uri(None)


def test_move_champion_and_roll_back(registry):
    from segflow.release.gate import CHAMPION, move_champion, roll_back_champion, version_with_alias

    assert version_with_alias(registry, "seg", CHAMPION) is None
    assert move_champion(registry, "seg", "1") is None
    assert move_champion(registry, "seg", "3") == "1"
    assert str(version_with_alias(registry, "seg", CHAMPION).version) == "3"

    assert roll_back_champion(registry, "seg") == ("3", "1")
    assert str(version_with_alias(registry, "seg", CHAMPION).version) == "1"
    assert registry.get_model_version("seg", "3").tags["validation_status"] == "rolled_back"
    with pytest.raises(ValueError, match="no earlier champion"):
        roll_back_champion(registry, "seg")


def test_roll_back_without_champion_is_refused(registry):
    from segflow.release.gate import roll_back_champion

    with pytest.raises(ValueError, match="has no champion"):
        roll_back_champion(registry, "seg")


def test_a_bento_build_that_fails_leaves_the_champion_where_it_was(registry, monkeypatch):
    # A real registry; the build failure is injected, standing in for a full disk or a broken
    # BentoML store while building.
    from segflow.release import promote
    from segflow.release.gate import CHAMPION, Decision, champion_history, move_champion, version_with_alias

    move_champion(registry, "seg", "1")

    def failing_build(*args, **kwargs):
        raise RuntimeError("bento build failed")

    monkeypatch.setattr(promote, "package", failing_build)
    report = {"candidate": {"name": "seg", "version": "2"}, "already_champion": False}
    with pytest.raises(RuntimeError, match="bento build failed"):
        promote._act(registry, report, Decision(promote=True, checks=[]))
    assert str(version_with_alias(registry, "seg", CHAMPION).version) == "1"
    assert champion_history(registry, "seg") == ["1"]
