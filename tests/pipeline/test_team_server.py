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


def test_queued_experiments_promote_roll_back_and_predict_unchanged_against_the_server(
    tracking_server, repo_copy, tmp_path
):
    # A built tiny copy whose runs now go to the server. Two queued experiments under
    # `dvc queue start -j 2` (what a team runs; a plain `dvc repro` is the same stage code) both
    # land there, each with its own parameters, metrics and lineage. The regression allowance is
    # opened wide (the gate's arithmetic has its own tests), so both promote, taking turns under
    # the promotion lock, and the champion's history through the server is one, then the other.
    repo = repo_copy
    (repo / "mlflow.db").unlink()
    env = {"MLFLOW_TRACKING_URI": tracking_server}
    wide = [f"promote.max_regression.{metric}=1.0" for metric in ("dice", "iou", "ap50")]
    learning_rates = {"lr-low": 0.002, "lr-high": 0.004}
    for name, lr in learning_rates.items():
        overrides = [arg for change in (f"train.lr={lr}", *wide) for arg in ("-S", change)]
        run(["dvc", "exp", "run", "--queue", *overrides, "-n", name], repo, env=env)
    run(["dvc", "queue", "start", "-j", "2"], repo, env=env)
    deadline = time.monotonic() + 900
    while True:
        status = run(["dvc", "queue", "status"], repo, env=env).stdout
        if status.count("Success") == 2 or "Failed" in status or time.monotonic() > deadline:
            break
        time.sleep(5)  # each `dvc queue status` costs a second of CPU the experiments need
    # On failure, the log of each task that did not succeed (its end says why it stopped).
    rows = [line.split() for line in status.splitlines()]
    unfinished = [row[1] for row in rows if row[1:2] and row[1] in learning_rates and "Success" not in row]
    shown = {name: run(["dvc", "queue", "logs", name], repo, check=False).stdout for name in unfinished}
    assert status.count("Success") == 2, status + "".join(
        f"\n--- {n}\n{log[-6000:]}" for n, log in shown.items()
    )
    assert not (repo / "mlflow.db").exists()  # no run fell back to the repository's own store

    api = httpx.Client(base_url=f"{tracking_server}/api/2.0/mlflow", timeout=30)
    experiment = api.get("/experiments/get-by-name", params={"experiment_name": "segflow"}).json()[
        "experiment"
    ]
    commit = run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    for name, lr in learning_rates.items():
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
        lineage = _tags(by_stage["train"])  # the experiment's baseline commit and its data
        assert lineage["segflow.git_commit"] == commit and lineage["segflow.data_hash"] != "unknown"

    # Artifacts go and come back through the server: the champion's file is the one its
    # export checked, proxied (no path on this machine in its source).
    champion = _champion(api)
    assert champion["version"] in {"1", "2"}
    assert champion["source"].startswith(("mlflow-artifacts:", "models:/"))
    fetched = tmp_path / "fetched"
    code = (
        "import mlflow, sys; mlflow.set_tracking_uri(sys.argv[1]); "
        "print(mlflow.artifacts.download_artifacts(artifact_uri=sys.argv[3], dst_path=sys.argv[2]))"
    )
    uri = f"models:/{MODEL}/{champion['version']}"
    path = Path(run(["python", "-c", code, tracking_server, str(fetched), uri], repo, env=env).stdout.strip())
    onnx = (path / "model.onnx").read_bytes()
    assert _tags(champion)["segflow.onnx_sha256"] == hashlib.sha256(onnx).hexdigest()

    # Rollback through the server's registry: back to the champion the second promotion replaced.
    previous = ({"1", "2"} - {champion["version"]}).pop()
    rolled = run(["segflow", "rollback"], repo, env=env).stdout
    assert f"version {champion['version']} -> version {previous}" in rolled
    assert _champion(api)["version"] == previous

    image = sorted((repo / "data/images").glob("*.png"))[0]
    out = run(["segflow", "predict", str(image), "--out", "predictions"], repo, env=env)
    assert "objects" in out.stdout and (repo / "predictions" / f"{image.stem}_labels.png").is_file()
