"""Store checks: an unusable tracking or BentoML store fails first, in one line that names it.

Real stores throughout: SQLite files, a real HTTP server on loopback, a closed port. The
read-only cases run the check as user `nobody` when the tests run as root (root may write
any file, so permissions alone would not stop it).
"""

from __future__ import annotations

import http.server
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from segflow.release import stores
from segflow.release.stores import StoreError, check_bentoml_store, check_tracking_store

ROOT = Path(__file__).resolve().parents[2]
NOBODY = 65534


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once it is closed


def make_store(path: Path) -> Path:
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE runs (id TEXT)")
    return path


def as_unprivileged(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `code` in this venv's Python as `nobody` (as root) or as ourselves (otherwise)."""
    cmd = [sys.executable, "-c", code]
    if os.geteuid() == 0:
        cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *cmd]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=full_env, cwd="/")


@pytest.fixture
def open_dir():
    """A folder `nobody` can reach (pytest's tmp_path sits under a root-only folder)."""
    path = Path(tempfile.mkdtemp(prefix="segflow-store-"))
    path.chmod(0o777)
    yield path
    for sub in path.rglob("*"):
        sub.chmod(0o777)
    shutil.rmtree(path)


def test_a_writable_store_and_a_new_one_pass(tmp_path):
    check_tracking_store(f"sqlite:///{make_store(tmp_path / 'mlflow.db')}")
    check_tracking_store(f"sqlite:///{tmp_path / 'new.db'}")  # MLflow creates it
    assert not (tmp_path / "new.db").exists()  # the check only looks


def test_a_read_only_store_is_named_with_the_cause_and_the_fix(open_dir):
    store = make_store(open_dir / "mlflow.db")
    store.chmod(0o444)  # the folder stays writable: only the file is read-only
    code = (
        "from segflow.release.stores import check_tracking_store, StoreError\n"
        f"try:\n    check_tracking_store('sqlite:///{store}')\nexcept StoreError as e:\n    print(e)"
    )
    message = as_unprivileged(code).stdout.strip()
    assert message.startswith(f"MLflow store {store}: not writable (attempt to write a readonly database)")
    assert f"chmod u+w {store}" in message and "MLFLOW_TRACKING_URI" in message
    assert "\n" not in message


def test_a_missing_folder_is_named(tmp_path):
    with pytest.raises(StoreError, match=r"folder .*nowhere does not exist; create it \(mkdir -p"):
        check_tracking_store(f"sqlite:///{tmp_path / 'nowhere' / 'mlflow.db'}")


def test_a_locked_store_is_named_after_waiting(tmp_path, monkeypatch):
    store = make_store(tmp_path / "mlflow.db")
    holder = sqlite3.connect(store)
    holder.execute("BEGIN IMMEDIATE")  # another process mid-write
    monkeypatch.setattr(stores, "TIMEOUT_SECONDS", 0.2)
    try:
        with pytest.raises(StoreError, match=r"mlflow\.db: locked by another process"):
            check_tracking_store(f"sqlite:///{store}")
    finally:
        holder.rollback()
        holder.close()
    check_tracking_store(f"sqlite:///{store}")  # free again


def test_a_file_that_is_not_a_database_is_named(tmp_path):
    store = tmp_path / "mlflow.db"
    store.write_bytes(b"these are not the runs you are looking for" * 100)
    with pytest.raises(StoreError, match=r"not a usable SQLite database .*move it aside"):
        check_tracking_store(f"sqlite:///{store}")


def test_an_unreachable_server_is_named_at_once():
    uri = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(StoreError) as caught:
        check_tracking_store(uri)
    assert str(caught.value).startswith(f"cannot reach the MLflow tracking server at {uri} (")
    assert "refused" in str(caught.value) and "unset it" in str(caught.value)


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # http.server calls it by this name
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args):
        pass


@pytest.mark.parametrize(("status", "fails"), [(200, False), (401, False), (503, True)])
def test_a_server_that_answers_passes_unless_it_answers_an_error(status, fails):
    handler = type("Handler", (_Health,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}/"
        if fails:
            with pytest.raises(StoreError, match="answered HTTP 503 at /health"):
                check_tracking_store(uri)
        else:
            check_tracking_store(uri)
    finally:
        server.shutdown()
        server.server_close()


def test_a_database_password_never_appears_in_the_message():
    with pytest.raises(StoreError) as caught:
        check_tracking_store(f"postgresql://segflow:s3cret@127.0.0.1:{closed_port()}/mlflow")
    assert "s3cret" not in str(caught.value) and "segflow:***@127.0.0.1" in str(caught.value)


def test_an_unwritable_bentoml_store_is_named(open_dir):
    home = open_dir / "locked" / "bentoml"
    home.parent.mkdir()
    home.parent.chmod(0o555)
    code = "from segflow.release.stores import check_bentoml_store, StoreError\n" + (
        "try:\n    check_bentoml_store()\nexcept StoreError as e:\n    print(e)"
    )
    message = as_unprivileged(code, {"BENTOML_HOME": str(home)}).stdout.strip()
    assert message.startswith(f"BentoML store {home} is not writable") and "set BENTOML_HOME" in message
    assert check_bentoml_store() is not None  # the test's own store is fine


def test_a_stage_fails_in_one_line_before_any_work(tmp_path):
    # A real stage, run as DVC runs it, against a server that is not there: it stops before
    # reading its inputs (there are none here), with the check's one line and nothing else.
    uri = f"http://127.0.0.1:{closed_port()}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(ROOT)}
    env.pop("DVC_STAGE", None)
    cmd = [sys.executable, "-m", "stages.split"]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: cannot reach the MLflow tracking server at {uri} ([Errno 111] Connection refused): "
        "start it (mlflow server ...), fix MLFLOW_TRACKING_URI, "
        "or unset it to log to the repository's mlflow.db"
    ]


def test_a_store_locked_too_long_mid_run_ends_the_stage_in_one_line_with_what_to_do(tmp_path):
    # MLflow itself waits 20 s for SQLite's write lock (busy_timeout); a holder that keeps it longer
    # (here: this test, mid-stage) fails the stage with the lock named and the way out.
    store = tmp_path / "mlflow.db"
    code = f"""
import sqlite3, mlflow
from segflow.artifacts import run_stage

def main():
    mlflow.set_experiment("locked")  # creates the store's tables while it is free
    holder = sqlite3.connect({str(store)!r})
    holder.execute("BEGIN IMMEDIATE")  # another writer that does not let go
    mlflow.set_experiment("another")

run_stage(main)
"""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", code]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: the MLflow store sqlite:///{store} failed: ")
    assert "database is locked" in last and "make mlflow-server" in last
