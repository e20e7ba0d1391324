"""Data-parallel training under a real torchrun with 2 processes (gloo on the CPU).

The tiny dataset of the unit tests trains in seconds; the stage-level run goes through
`dvc repro train` on the tiny pipeline copy, where the stage starts torchrun itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import ROOT, run

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).with_name("distributed_run.py")


def _torchrun(out: Path, *args: str) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(SCRIPT), str(out), *args]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def _weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["state_dict"]


def test_two_processes_train_in_step_and_a_killed_run_resumes_exactly(tmp_path: Path):
    whole = _torchrun(tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-4000:]
    histories = [json.loads((tmp_path / "whole" / f"history-{r}.json").read_text()) for r in (0, 1)]
    # Every rank saw rank 0's validation (so early stopping would stop them together).
    assert [h["val_dice"] for h in histories[0]] == [h["val_dice"] for h in histories[1]]
    assert len(histories[0]) == 3

    killed = _torchrun(tmp_path / "killed", "die-after-1")
    assert killed.returncode != 0  # torchrun stops both processes when rank 0 fails
    assert torch.load(tmp_path / "killed" / "resume.pt", weights_only=True)["epoch"] == 1
    resumed = _torchrun(tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resuming from epoch 2/3" in resumed.stdout + resumed.stderr
    again = json.loads((tmp_path / "killed" / "history-0.json").read_text())
    assert [round(r["val_dice"], 6) for r in again] == [round(r["val_dice"], 6) for r in histories[0]]
    expected = _weights(tmp_path / "whole" / "model.pt")
    for key, tensor in _weights(tmp_path / "killed" / "model.pt").items():
        torch.testing.assert_close(tensor, expected[key], rtol=0, atol=1e-5)


def test_the_train_stage_runs_itself_under_torchrun_and_rank_0_alone_records(repo_copy: Path):
    import mlflow

    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    params["train"]["distributed"] = {"nproc": 2, "backend": "auto"}
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params))
    single = json.loads((repo_copy / "artifacts/model/summary.json").read_text())
    client = mlflow.MlflowClient(f"sqlite:///{repo_copy / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("segflow")
    before = client.search_runs([experiment.experiment_id], "tags.`segflow.stage` = 'train'")

    result = run(["dvc", "repro", "train"], repo_copy)
    out = result.stdout + result.stderr
    assert "torch.distributed.run --standalone --nproc_per_node=2 -m stages.train" in out
    assert "validation images in 2 processes" in out
    epochs = params["train"]["epochs"]
    for epoch in range(1, epochs + 1):  # rank 0 alone logs each epoch
        assert out.count(f"epoch {epoch:3d}/{epochs} ") == 1, out[-3000:]
    summary = json.loads((repo_copy / "artifacts/model/summary.json").read_text())
    assert summary["epochs_run"] == epochs
    # The same global batch and epochs: within a tiny model's run-to-run spread of the 1-process run.
    assert abs(summary["best_val_dice"] - single["best_val_dice"]) < 0.15, (summary, single)
    after = client.search_runs([experiment.experiment_id], "tags.`segflow.stage` = 'train'")
    new = [r for r in after if r.info.run_id not in {b.info.run_id for b in before}]
    assert len(new) == 1 and new[0].data.params["train.distributed.nproc"] == "2"
    assert not (repo_copy / "artifacts/.resume").exists()
    assert "train" not in run(["dvc", "status", "train"], repo_copy).stdout
