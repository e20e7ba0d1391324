"""A DVC remote over SSH: a real OpenSSH server (Debian's openssh-server) on loopback.

`dvc push` sends the data and every stage output; a fresh `git clone` with `dvc pull` then
has the whole pipeline up to date: `dvc status` is clean and `dvc repro` runs nothing. Its
own registry and BentoML store start empty: re-registering the pulled export and `segflow
promote` give it a model to serve (what the README and the service's error say to do).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import free_port, run

pytestmark = pytest.mark.slow
SSHD = Path("/usr/sbin/sshd")
UP_TO_DATE = "Data and pipelines are up to date."


@pytest.fixture(scope="module")
def ssh_server():
    """sshd on 127.0.0.1 accepting one fresh key for this user; yields (port, key, folder)."""
    if not SSHD.is_file():
        pytest.fail(f"{SSHD} is missing: install Debian's openssh-server (.ci/run does)")
    folder = Path(tempfile.mkdtemp(prefix="segflow-sshd-"))
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / name)], check=True)
    shutil.copy(folder / "client_key.pub", folder / "authorized_keys")
    port = free_port()
    config = folder / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {folder / 'host_key'}\n"
        f"AuthorizedKeysFile {folder / 'authorized_keys'}\nPidFile {folder / 'sshd.pid'}\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
        "PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n"
        "Subsystem sftp internal-sftp\n"
    )
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation folder
    cmd = [str(SSHD), "-D", "-e", "-f", str(config)]  # foreground, log to stderr
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while True:
        assert process.poll() is None, process.stdout.read()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "sshd did not listen"
            time.sleep(0.2)
    yield port, folder / "client_key", folder
    process.terminate()
    process.wait(10)
    shutil.rmtree(folder, ignore_errors=True)


def _use_remote(repo: Path, url: str, key: Path) -> None:
    """The remote goes in the committed config; the key path only in the clone's local config."""
    run(["dvc", "remote", "add", "--force", "-d", "storage", url], repo)
    run(["dvc", "remote", "modify", "--local", "storage", "keyfile", str(key)], repo)


def test_push_then_a_fresh_clone_pulls_a_pipeline_with_nothing_to_run(ssh_server, repo_copy, tmp_path):
    port, key, folder = ssh_server
    user = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
    store = folder / "store"
    url = f"ssh://{user}@127.0.0.1:{port}{store}"
    _use_remote(repo_copy, url, key)
    run(["git", "add", "-A"], repo_copy)
    run(["git", "commit", "-qm", "pipeline run, remote configured"], repo_copy)

    pushed = run(["dvc", "push"], repo_copy).stdout
    assert "pushed" in pushed, pushed
    # Every output dvc.lock and data.dvc record is on the remote (by content hash).
    assert "Cache and remote 'storage' are in sync." in run(["dvc", "status", "--cloud"], repo_copy).stdout
    assert any(p.is_file() for p in store.rglob("*"))

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo_copy), str(clone)], tmp_path)
    assert not (clone / "artifacts").exists() and not (clone / "data").exists()
    _use_remote(clone, url, key)
    run(["dvc", "pull"], clone)
    assert (clone / "artifacts/export/model.onnx").read_bytes() == (
        repo_copy / "artifacts/export/model.onnx"
    ).read_bytes()
    assert UP_TO_DATE in run(["dvc", "status"], clone).stdout
    repro = run(["dvc", "repro"], clone).stdout
    assert "Running stage" not in repro and UP_TO_DATE in repro, repro

    # The clone's own stores are empty: the README's way to serve from it registers the pulled
    # model there (the same files again: dvc.lock unchanged) and runs the gate.
    run(["dvc", "repro", "--force", "--single-item", "export"], clone)
    assert run(["git", "status", "--porcelain", "dvc.lock"], clone).stdout == ""
    run(["segflow", "promote"], clone)
    tag = json.loads((clone / "logs/release.json").read_text())["serving"]["model_tag"]
    run(["bentoml", "models", "get", tag], clone)
