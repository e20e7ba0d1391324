"""A temporary copy of the repository with a tiny dataset and tiny params.

The copy holds the project's git-tracked files as they are in the working tree (so
uncommitted changes are tested too), its own git history, its own DVC cache and its own
MLflow store. Nothing is mocked: the stages run under the real `dvc`.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Small enough for about a minute of `dvc repro` on 2 CPU cores.
# Where mlflow sends runs and registrations; every tiny copy uses its own store instead.
MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")

TINY_PARAMS = {
    "ingest": {"min_images": 10},
    # One torch thread: `make test` runs two workers on two cores, and tiny models gain nothing
    # from a second thread while two busy-waiting thread pools slow each other several-fold.
    "train": {
        "epochs": 2,
        "batch_size": 4,
        "crop_size": 64,
        "decoder_channels": [16, 16, 16, 16, 16],
        "threads": 1,
    },
    "evaluate": {"overlays": 2},
    # Tuning itself is unit-tested; a small grid keeps every tiny repro quick.
    "inference": {"threshold_grid": [0.4, 0.5], "seed_threshold_grid": [0.5, 0.8], "min_area_grid": [0, 16]},
    # Two epochs on 16 tiny images: the gate's bars must be reachable for a first champion.
    "promote": {"minimums": {"dice": 0.05, "iou": 0.02, "ap50": 0.0}, "max_regression": {"ap50": 1.0}},
}


# The end-to-end test files, longest first (by `pytest --durations` on 2 cores). pytest-xdist's
# worksteal gives each worker a contiguous share of the collected tests and lets a worker that
# runs out take the end of another's queue; with the long tests first the run ends on short
# tests both workers share, instead of one worker finishing a 90-second test while the other
# idles. Only the order changes (within a file it stays as written).
LONGEST_FIRST = (
    "test_team_server.py",
    "test_promotion.py",
    "test_multiclass.py",
    "test_crossval.py",
    "test_repro.py",
    "test_distributed.py",
    "test_remote.py",
    "test_resume.py",
    "test_formats.py",
)


def pytest_collection_modifyitems(items: list) -> None:
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable


def free_port() -> int:
    """A loopback port nothing listens on (for a server a test starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(
    cmd: list[str], cwd: Path, check: bool = True, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run a command in the copy with the venv's tools first on PATH; output captured.

    The copy logs to its own mlflow.db and BentoML store unless `env` names others
    (MLFLOW_TRACKING_URI, BENTOML_HOME), as checkouts sharing a team's stores do."""
    env = env or {}
    full_env = {**os.environ, **env}
    full_env["PATH"] = f"{BIN}{os.pathsep}{full_env.get('PATH', '')}"
    for name in set(MLFLOW_ENV) - set(env):  # the copy's own sqlite store, unless `env` names one
        full_env.pop(name, None)
    if "BENTOML_HOME" not in env:  # and its own BentoML store, likewise
        full_env["BENTOML_HOME"] = str(cwd / ".bentoml")
    full_env["BENTOML_DO_NOT_TRACK"] = "True"
    # `dvc exp run` commits; CI machines may have no git identity configured.
    for role in ("AUTHOR", "COMMITTER"):
        full_env.setdefault(f"GIT_{role}_NAME", "segflow tests")
        full_env.setdefault(f"GIT_{role}_EMAIL", "tests@segflow.invalid")
    result = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=1800)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {result.returncode}\n--- stdout\n{result.stdout[-4000:]}"
            f"\n--- stderr\n{result.stderr[-4000:]}"
        )
    return result


def merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = (
            merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def make_tiny_repo(dest: Path, params: dict | None = None, count: int = 16, size: int = 64) -> Path:
    """Copy the tracked files, generate a tiny sample dataset, commit; returns the copy.

    Like the real data/, the dataset holds a shifted-domain evaluation set in data/shifted
    (6 images of the same size) beside the training images.
    """
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split("\0")  # fmt: skip
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file() and not name.startswith(("reports/", "dvc.lock", "data.dvc")):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    (dest / "params.yaml").write_text(yaml.safe_dump(merge(merge(raw, TINY_PARAMS), params or {})))
    run(["git", "init", "-q"], dest)
    run(["segflow", "sample", "--out", "data", "--count", str(count), "--size", str(size)], dest)
    shifted = ["--out", "data/shifted", "--domain", "shifted", "--count", "6", "--size", str(size)]
    run(["segflow", "sample", *shifted], dest)
    run(["dvc", "add", "-q", "data"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-qm", "tiny copy"], dest)
    return dest


@pytest.fixture(autouse=True)
def _mlflow_env_restored():
    """Put MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI back after every test.

    mlflow.set_tracking_uri and set_registry_uri export them into os.environ, and
    set_registry_uri(None) leaves the variable behind: a test's store then leaked into later
    subprocesses of the same pytest worker (an export registered into another test's DB).
    """
    saved = {name: os.environ.get(name) for name in MLFLOW_ENV}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def _build(repo: Path) -> Path:
    make_tiny_repo(repo)
    result = run(["dvc", "repro"], repo)
    (repo / "first_repro.log").write_text(result.stdout + result.stderr)  # its presence: built
    return repo


@pytest.fixture(scope="session")
def built_repo(tmp_path_factory, worker_id) -> Path:
    """A tiny copy on which `dvc repro` has run once, successfully.

    Built once per test run and shared by the pytest-xdist workers: each worker building its
    own cost about 100 s of CPU apiece, on the same two cores the other tests need. Tests only
    read it; a test that changes anything (files, params, even a `dvc` command's lock and
    index files) takes repo_copy, so the other workers never see a half-changed repository.
    """
    if worker_id == "master":  # no xdist
        return _build(tmp_path_factory.mktemp("pipeline"))
    shared = tmp_path_factory.getbasetemp().parent  # this run's folder, the same for every worker
    with (shared / "built_repo.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the first worker builds; the others wait for it
        repo = shared / "built-repo"
        if not (repo / "first_repro.log").is_file():
            shutil.rmtree(repo, ignore_errors=True)  # what a build that failed left behind
            repo.mkdir()
            _build(repo)
    return repo


@pytest.fixture
def repo_copy(built_repo: Path, tmp_path: Path) -> Path:
    """A private copy of the built repo (with its DVC cache and MLflow store) to break."""
    dest = tmp_path / "repo"
    shutil.copytree(built_repo, dest, symlinks=True)
    _relocate_mlflow_store(dest, built_repo)
    return dest


def _relocate_mlflow_store(copy: Path, original: Path) -> None:
    """Point a copied MLflow store at the copy's own mlartifacts/.

    MLflow records absolute artifact locations (experiments, runs, logged models, registered
    versions), so a copied store kept writing models under the shared built repo: it grew by
    every copy's models (470 MB by the end of a run) and every later copy copied them again.
    """
    old, new = str(original), str(copy)
    with closing(sqlite3.connect(copy / "mlflow.db")) as db, db:  # closed, and committed
        tables = [row[0] for row in db.execute("select name from sqlite_master where type = 'table'")]
        for table in tables:
            for _, column, kind, *_ in db.execute(f"pragma table_info('{table}')").fetchall():
                if "CHAR" in kind.upper() or "TEXT" in kind.upper():  # where a path can be
                    update = f'update "{table}" set "{column}" = replace("{column}", ?, ?)'
                    db.execute(f'{update} where instr("{column}", ?) > 0', (old, new, old))
