"""The stores the pipeline writes to, checked before any work is done.

MLflow reports an unwritable SQLite file as 228 lines of SQLAlchemy text after the stage's
work is done, and retries an unreachable server for minutes. These checks run first (every
stage, every CLI command that logs) and fail with one line: the store, the cause, the fix.
They only look: nothing is written, no table is created.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from segflow.errors import UserError

log = logging.getLogger(__name__)

# How long a check waits for a store that is slow rather than gone.
TIMEOUT_SECONDS = 10
_ELSEWHERE = "or set MLFLOW_TRACKING_URI to another store (unset, runs go to the repository's mlflow.db)"


class StoreError(UserError):
    """A tracking or model store that cannot be used as configured."""


def check_tracking_store(uri: str) -> None:
    """Raise StoreError when the MLflow store at `uri` cannot take runs.

    sqlite: the file (or, for a new store, its folder) must be writable and not locked;
    http(s): the server must answer; postgresql, mysql, mssql: the database must accept a
    connection. Other schemes are left to MLflow.
    """
    scheme = urlsplit(uri).scheme.split("+")[0]
    if scheme == "sqlite":
        path = uri.split(":///", 1)[1] if ":///" in uri else ""
        if path and path != ":memory:":
            _check_sqlite(Path(path))
    elif scheme in ("http", "https"):
        _check_server(uri)
    elif scheme in ("postgresql", "mysql", "mssql"):
        _check_database(uri)


def _check_sqlite(path: Path) -> None:
    folder = path.parent
    if not folder.is_dir():
        raise StoreError(
            f"MLflow store {path}: its folder {folder} does not exist; "
            f"create it (mkdir -p {folder}) {_ELSEWHERE}"
        )
    # SQLite writes a journal beside the file, so the folder must be writable too.
    if not os.access(folder, os.W_OK | os.X_OK):
        raise StoreError(
            f"MLflow store {path}: its folder {folder} is not writable (SQLite keeps its journal there); "
            f"make it writable (chmod u+w {folder}) {_ELSEWHERE}"
        )
    if not path.exists():
        return  # MLflow creates it
    try:
        connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=rw", uri=True, timeout=TIMEOUT_SECONDS)
        try:
            connection.execute("BEGIN IMMEDIATE")  # the write lock MLflow needs
            # A file SQLite could only open read-only still takes the lock; a write shows it.
            # Rewriting user_version with its own value, rolled back, changes nothing.
            version = connection.execute("PRAGMA user_version").fetchone()[0]
            connection.execute(f"PRAGMA user_version = {int(version)}")
            connection.rollback()
        finally:
            connection.close()
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"MLflow store {path}: {_sqlite_cause(path, exc)}") from None


def _sqlite_cause(path: Path, exc: sqlite3.DatabaseError) -> str:
    reason = str(exc)
    if "locked" in reason or "busy" in reason:
        return (
            f"locked by another process for over {TIMEOUT_SECONDS} s ({reason}); wait for that run "
            "(another dvc repro, mlflow ui holding a write) to finish"
        )
    if "readonly" in reason or "unable to open" in reason or not os.access(path, os.W_OK):
        return f"not writable ({reason}); make it writable (chmod u+w {path}) {_ELSEWHERE}"
    return (
        f"not a usable SQLite database ({reason}); move it aside (MLflow then starts a new one) " + _ELSEWHERE
    )


def _check_server(uri: str) -> None:
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS):
            return
    except urllib.error.HTTPError as exc:
        if exc.code < 500:
            return  # it answers; authentication and the rest are MLflow's to report
        reason = f"it answered HTTP {exc.code} at /health"
    except (urllib.error.URLError, OSError) as exc:
        reason = str(getattr(exc, "reason", exc))
    raise StoreError(
        f"cannot reach the MLflow tracking server at {uri} ({reason}): start it (mlflow server ...), "
        "fix MLFLOW_TRACKING_URI, or unset it to log to the repository's mlflow.db"
    )


def _check_database(uri: str) -> None:
    import sqlalchemy

    parts = urlsplit(uri)
    shown = uri.replace(f":{parts.password}@", ":***@") if parts.password else uri  # no password in errors
    try:
        engine = sqlalchemy.create_engine(uri, pool_pre_ping=False)
        with engine.connect():
            pass
    except ModuleNotFoundError as exc:
        raise StoreError(
            f"MLflow database {shown}: its driver {exc.name} is not installed; pip install {exc.name}"
        ) from None
    except Exception as exc:  # driver errors differ by database; each says what failed
        log.debug("tracking database check failed", exc_info=True)
        first = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise StoreError(
            f"cannot connect to the MLflow database {shown} ({first}): start it or fix MLFLOW_TRACKING_URI"
        ) from None


def check_bentoml_store() -> Path:
    """Raise StoreError unless the BentoML store (BENTOML_HOME, default ~/bentoml) can be
    written; returns its folder. A promotion checks it before moving `champion`, so a store
    it cannot build into never leaves the alias ahead of the Bento."""
    home = Path(os.environ.get("BENTOML_HOME") or Path.home() / "bentoml").expanduser()
    existing = next((p for p in (home, *home.parents) if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise StoreError(
            f"BentoML store {home} is not writable ({existing} is not a writable folder): "
            "make it writable or set BENTOML_HOME to a writable folder"
        )
    return home
