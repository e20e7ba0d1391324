"""The reliability drills in bench/ (fuzz and soak), bounded, against a real `bentoml serve`
with two workers (serve.workers: 2).

The full runs, whose figures the README reports, are the same scripts with their defaults.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT
from tests.service.conftest import start_server, stop_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(built_repo: Path, tmp_path_factory):
    """A server of its own, with two workers: the drills' thousands of odd images must not reach
    the request log (and drift statistics) the other service tests read, and they load both."""
    srv = start_server(built_repo, tmp_path_factory.mktemp("serve-drills"), serve={"workers": 2})
    yield srv
    stop_server(srv)


def _bench(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "bench" / script), *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)


def test_bounded_fuzz_finds_no_server_error_and_no_undocumented_status(server, built_repo: Path):
    result = _bench(
        "fuzz.py", "--url", server.url, "--max-examples", "5", "--mutations", "120",
        "--images", str(built_repo / "data" / "images"), cwd=built_repo,
    )  # fmt: skip
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    found = re.search(
        r"fuzz: schema cases (\d+) \(failures 0\), mutated files 120: 5xx 0, .* server up", summary
    )
    assert found and int(found.group(1)) >= 50, summary
    assert server.alive()


def test_short_soak_has_no_errors_and_flat_memory(server, built_repo: Path):
    result = _bench(
        "soak.py", "--url", server.url, "--pid", str(server.process.pid), "--concurrency", "4",
        "--minutes", "0.25", "--warmup", "3", "--images", str(built_repo / "data" / "images"), cwd=built_repo,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    summary = result.stdout.strip().splitlines()[-1]
    found = re.search(r"soak: (\d+) requests .* errors 0, .* server RSS (\d+) -> (\d+) MB", summary)
    assert found and int(found.group(1)) > 20 and int(found.group(2)) > 50, summary


def test_two_workers_each_serve_the_model_on_their_share_of_the_cores(server):
    cores = len(os.sched_getaffinity(0))
    metadata = httpx.get(f"{server.url}/metadata", timeout=30).json()
    threads = max(1, cores // 2)
    lanes = 2 if threads >= 2 else 1  # each worker's batches side by side under load, given 2 threads or more
    assert metadata["runtime"] == {"workers": 2, "onnx_threads": threads, "lanes": lanes}
    # Each worker process opened the model and said so once. /readyz answers as soon as one
    # worker is up: the other may still be timing its precisions on a loaded machine.
    deadline = time.monotonic() + 60
    while True:
        started = [line for line in server.log.read_text().splitlines() if "worker(s)" in line]
        if len(started) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(started) == 2, "\n".join(started)
    assert all(f"2 worker(s), {max(1, cores // 2)} ONNX Runtime thread(s) each" in line for line in started)
