"""The pipeline against a team tracking server: a real PostgreSQL and a real `mlflow server`
with proxied artifacts, on loopback (segflow.release.teamserver: what `make mlflow-server`
runs). Nothing in the pipeline changes but MLFLOW_TRACKING_URI."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from segflow.release.teamserver import server_command, start_postgres, stop_postgres
from tests.conftest import free_port, run

pytestmark = pytest.mark.slow
MODEL = "segflow-segmenter"


@pytest.fixture(scope="module")
def tracking_server():
    folder = Path(tempfile.mkdtemp(prefix="segflow-team-"))  # not pytest's root-only tmp: postgres owns it
    folder.chmod(0o755)
    database = start_postgres(folder, free_port())
    port = free_port()
    log = folder / "mlflow.log"
    process = subprocess.Popen(
        server_command(database, folder / "artifacts", "127.0.0.1", port),
        stdout=log.open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    yield url
    process.terminate()
    process.wait(30)
    stop_postgres(folder)
    shutil.rmtree(folder, ignore_errors=True)


def _champion(api: httpx.Client) -> dict:
    answer = api.get("/registered-models/alias", params={"name": MODEL, "alias": "champion"})
    assert answer.status_code == 200, answer.text
    return answer.json()["model_version"]


def _tags(entity: dict) -> dict:
    return {t["key"]: t["value"] for t in entity.get("tags", [])}


def test_pipeline_promotion_rollback_and_predict_run_unchanged_against_the_server(
    tracking_server, repo_copy, tmp_path
):
    # A built tiny copy: the model stages run again (-f from train on), now against the server.
    # The data stages log through the same code; re-running them would only cost time.
    repo = repo_copy
    (repo / "mlflow.db").unlink()
    env = {"MLFLOW_TRACKING_URI": tracking_server}
    run(["dvc", "repro", "-f", "--downstream", "train"], repo, env=env)
    assert not (repo / "mlflow.db").exists()  # every run went to the server

    api = httpx.Client(base_url=f"{tracking_server}/api/2.0/mlflow", timeout=30)
    champion = _champion(api)
    onnx = (repo / "artifacts/export/model.onnx").read_bytes()
    assert champion["version"] == "1"
    assert _tags(champion)["segflow.onnx_sha256"] == hashlib.sha256(onnx).hexdigest()
    assert champion["source"].startswith(("mlflow-artifacts:", "models:/"))  # proxied by the server

    # Lineage on the stage runs, read through the REST API.
    experiment = api.get("/experiments/get-by-name", params={"experiment_name": "segflow"}).json()[
        "experiment"
    ]
    found = api.post(
        "/runs/search",
        json={"experiment_ids": [experiment["experiment_id"]], "filter": "tags.`segflow.stage` = 'train'"},
    ).json()["runs"]
    assert len(found) == 1
    lineage = _tags(found[0]["data"])
    commit = run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    assert lineage["segflow.git_commit"] == commit and lineage["segflow.data_hash"] != "unknown"

    # Artifacts come back through the server: the registered model's file is the exported one.
    fetched = tmp_path / "fetched"
    code = (
        "import mlflow, sys; mlflow.set_tracking_uri(sys.argv[1]); "
        f"print(mlflow.artifacts.download_artifacts(artifact_uri='models:/{MODEL}/1', dst_path=sys.argv[2]))"
    )
    path = Path(run(["python", "-c", code, tracking_server, str(fetched)], repo, env=env).stdout.strip())
    assert (path / "model.onnx").read_bytes() == onnx

    # Parallel experiments: two queued runs under `dvc queue start -j 2` both land in the
    # server, each with its own parameters and metrics. The regression allowance is opened wide
    # (the gate's arithmetic has its own tests), so both promote, taking turns under the
    # promotion lock, and the champion's history through the server is 1, then one, then the other.
    wide = [f"promote.max_regression.{metric}=1.0" for metric in ("dice", "iou", "ap50")]
    for name, lr in (("lr-low", 0.002), ("lr-high", 0.004)):
        overrides = [arg for change in (f"train.lr={lr}", *wide) for arg in ("-S", change)]
        run(["dvc", "exp", "run", "--queue", *overrides, "-n", name], repo, env=env)
    run(["dvc", "queue", "start", "-j", "2"], repo, env=env)
    deadline = time.monotonic() + 900
    while True:
        status = run(["dvc", "queue", "status"], repo, env=env).stdout
        if status.count("Success") == 2 or "Failed" in status or time.monotonic() > deadline:
            break
        time.sleep(5)  # each `dvc queue status` costs a second of CPU the experiments need
    logs = run(["dvc", "queue", "logs", "lr-low"], repo, check=False).stdout
    assert status.count("Success") == 2, status + logs
    for name, lr in (("lr-low", 0.002), ("lr-high", 0.004)):
        runs = api.post(
            "/runs/search",
            json={
                "experiment_ids": [experiment["experiment_id"]],
                "filter": f"tags.`segflow.dvc_experiment` = '{name}'",
            },
        ).json()["runs"]
        by_stage = {_tags(r["data"])["segflow.stage"]: r["data"] for r in runs}
        assert {"model", "train", "evaluate", "export", "promote"} <= set(by_stage), sorted(by_stage)
        assert {p["key"]: p["value"] for p in by_stage["train"]["params"]}["train.lr"] == str(lr)
        metrics = {m["key"]: m["value"] for m in by_stage["model"]["metrics"]}
        assert 0 <= metrics["test_dice"] <= 1 and "test_ap50" in metrics

    # Rollback through the server's registry: back to the champion the second promotion replaced.
    champion = _champion(api)["version"]
    assert champion in {"2", "3"}
    previous = ({"2", "3"} - {champion}).pop()
    assert f"version {champion} -> version {previous}" in run(["segflow", "rollback"], repo, env=env).stdout
    assert _champion(api)["version"] == previous

    image = sorted((repo / "data/images").glob("*.png"))[0]
    out = run(["segflow", "predict", str(image), "--out", "predictions"], repo, env=env)
    assert "objects" in out.stdout and (repo / "predictions" / f"{image.stem}_labels.png").is_file()
