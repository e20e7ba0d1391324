"""The built Bento, served where it ships: a fresh virtual environment holding only the
Bento's own env/python/requirements.txt (what its container installs), started from a
folder outside the checkout. No editable install, no torch, no access to the repository.

This is the test that would have caught a Bento whose service imports the training side:
every other served Bento in the suite runs inside the development venv.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import BIN, free_port, run

pytestmark = pytest.mark.slow


def _bento_dir(repo: Path) -> Path:
    tag = json.loads((repo / "logs/release.json").read_text())["serving"]["bento_tag"]
    name, version = tag.split(":")
    return repo / ".bentoml" / "bentos" / name / version


@pytest.fixture(scope="module")
def shipped(built_repo: Path, tmp_path_factory) -> dict:
    """A venv with only the Bento's requirements, and a `bentoml serve` of the Bento from it."""
    bento = _bento_dir(built_repo)
    requirements = bento / "env" / "python" / "requirements.txt"
    assert requirements.is_file(), f"the Bento has no {requirements}"
    home = tmp_path_factory.mktemp("shipped")
    venv = home / "venv"
    # uv, from the dev tools, only creates and fills the venv; nothing of the dev venv is in it.
    subprocess.run([str(BIN / "uv"), "venv", "-q", "--python", sys.executable, str(venv)], check=True)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [str(BIN / "uv"), "pip", "install", "-q", "--python", str(python), "-r", str(requirements)],
        capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-4000:]

    outside = home / "elsewhere"  # neither the checkout nor anything that contains it
    outside.mkdir()
    port = free_port()
    env = {
        "PATH": f"{venv / 'bin'}{os.pathsep}/usr/bin:/bin",
        "HOME": str(home),
        "BENTOML_HOME": str(built_repo / ".bentoml"),
        "BENTOML_DO_NOT_TRACK": "True",
        "SEGFLOW_REQUEST_LOG": str(home / "requests.db"),
    }
    log = home / "serve.log"
    process = subprocess.Popen(
        [str(venv / "bin" / "bentoml"), "serve", str(bento), "--port", str(port), "--host", "127.0.0.1"],
        cwd=outside, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise AssertionError(
                    f"the shipped Bento exited {process.returncode}:\n{log.read_text()[-4000:]}"
                )
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"the shipped Bento was not ready in 120 s:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        yield {"url": url, "python": python, "bento": bento, "log": log, "env": env, "cwd": outside}
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()


def test_the_shipped_environment_has_no_training_side(shipped: dict):
    for module in ("torch", "segmentation_models_pytorch", "mlflow", "dvc", "segflow"):
        probe = subprocess.run(
            [str(shipped["python"]), "-c", f"import {module}"],
            cwd=shipped["cwd"], env=shipped["env"], capture_output=True, text=True,
        )  # fmt: skip
        assert probe.returncode != 0, f"{module} is importable in the Bento's own environment"
        assert "ModuleNotFoundError" in probe.stderr


def test_the_shipped_bento_answers_like_segflow_predict(shipped: dict, built_repo: Path, tmp_path: Path):
    image = sorted((built_repo / "data" / "images").glob("*.png"))[0]
    with image.open("rb") as handle:
        response = httpx.post(f"{shipped['url']}/segment", files={"image": handle}, timeout=60)
    assert response.status_code == 200, response.text
    served = response.json()

    # The same model through the CLI (the development install, as a user runs it), in the
    # precision the service runs: `auto` times fp32 against INT8 in each process, and on a CPU
    # where they are close the two processes may choose differently.
    precision = httpx.get(f"{shipped['url']}/metadata", timeout=10).json()["precision"]["precision"]
    out = tmp_path / "predictions"
    predict = ["segflow", "predict", str(image), "--model", "artifacts/export", "--out", str(out)]
    run([*predict, "--precision", precision], built_repo)
    local = json.loads((out / f"{image.stem}.json").read_text())
    assert served["object_count"] == local["object_count"] > 0
    key = ("class", "area", "bbox", "polygon")
    assert [{k: o[k] for k in key} for o in served["objects"]] == [
        {k: o[k] for k in key} for o in local["objects"]
    ]


def test_the_shipped_bento_serves_overlay_and_metadata(shipped: dict, built_repo: Path):
    image = sorted((built_repo / "data" / "images").glob("*.png"))[0]
    with image.open("rb") as handle:
        overlay = httpx.post(f"{shipped['url']}/segment_overlay", files={"image": handle}, timeout=60)
    assert overlay.status_code == 200 and overlay.headers["content-type"] == "image/png"
    picture = np.asarray(Image.open(io.BytesIO(overlay.content)))
    assert picture.shape[:2] == np.asarray(Image.open(image)).shape[:2]

    metadata = httpx.get(f"{shipped['url']}/metadata", timeout=10)
    assert metadata.status_code == 200
    info = metadata.json()
    assert info["model"]["alias"] == "champion" and info["output"]["classes"] == ["background", "cell"]


def test_the_generated_dockerfile_installs_the_same_requirements(shipped: dict):
    bento = shipped["bento"]
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    # BentoML's Dockerfile installs env/python/requirements.txt, the file the venv above was built from.
    assert "requirements.txt" in dockerfile or "install.sh" in dockerfile
    installer = bento / "env" / "python" / "install.sh"
    if "install.sh" in dockerfile:
        assert "requirements.txt" in installer.read_text()
    requirements = (bento / "env" / "python" / "requirements.txt").read_text().lower()
    assert "onnxruntime" in requirements and "torch" not in requirements
