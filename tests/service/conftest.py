"""A real `bentoml serve service:svc` process on the champion of the tiny pipeline copy.

The copy (tests/conftest.py: built_repo) ran the whole `dvc repro`, promotion included,
so its BentoML store holds the champion exactly as a user's would after `make run`.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import BIN, free_port

TOKEN = "test-token-1234"
SLOW_CLIENT_DEADLINES = {"header_timeout_s": 2.0, "body_timeout_s": 2.0}


class Server:
    def __init__(self, url: str, process: subprocess.Popen, log: Path, request_log: Path):
        self.url, self.process, self.log, self.request_log = url, process, log, request_log

    def alive(self) -> bool:
        return self.process.poll() is None


def start_server(repo: Path, tmp: Path, token: str | None = None, serve: dict | None = None) -> Server:
    """`bentoml serve` in `repo`; `serve` overrides params.yaml's serve section (SEGFLOW_PARAMS)."""
    port = free_port()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    if serve:
        params = yaml.safe_load((repo / "params.yaml").read_text())
        params["serve"] |= serve
        (tmp / "params.yaml").write_text(yaml.safe_dump(params))
        env["SEGFLOW_PARAMS"] = str(tmp / "params.yaml")
    env |= {"BENTOML_HOME": str(repo / ".bentoml"), "BENTOML_DO_NOT_TRACK": "True"}
    env["SEGFLOW_REQUEST_LOG"] = str(tmp / "requests.db")
    env.pop("SEGFLOW_API_TOKEN", None)
    if token:
        env["SEGFLOW_API_TOKEN"] = token
    log = tmp / "serve.log"
    process = subprocess.Popen(
        [str(BIN / "bentoml"), "serve", "service:svc", "--port", str(port)],
        cwd=repo, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"bentoml serve exited {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return Server(url, process, log, tmp / "requests.db")
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    process.kill()
    raise AssertionError(f"bentoml serve not ready after 90 s:\n{log.read_text()[-4000:]}")


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(20)
    except subprocess.TimeoutExpired:
        server.process.kill()


@pytest.fixture(scope="session")
def server(built_repo: Path, tmp_path_factory) -> Server:
    """The service without a token (every endpoint open)."""
    srv = start_server(built_repo, tmp_path_factory.mktemp("serve"))
    yield srv
    stop_server(srv)


@pytest.fixture(scope="session")
def locked_server(built_repo: Path, tmp_path_factory) -> Server:
    """The service with SEGFLOW_API_TOKEN set, and short deadlines for slow clients."""
    srv = start_server(
        built_repo, tmp_path_factory.mktemp("serve-locked"), token=TOKEN, serve=SLOW_CLIENT_DEADLINES
    )
    yield srv
    stop_server(srv)


@pytest.fixture(scope="session")
def sample_images(built_repo: Path) -> list[Path]:
    return sorted((built_repo / "data" / "images").glob("*.png"))
