"""A team tracking server: PostgreSQL for runs and the model registry, MLflow's proxied
artifact store on disk, and `mlflow server` in front of both.

`segflow tracking-server` (`make mlflow-server`) runs it on this machine; the tests start the
same thing on loopback. Point every checkout at it with
`export MLFLOW_TRACKING_URI=http://<host>:5000` and the pipeline, promotion, rollback and
the Bento build run unchanged: clients talk HTTP only, and artifacts go through the server
(`--serve-artifacts`), so no client needs the database driver or access to the disk.

PostgreSQL refuses to run as root, so as root its programs run as the `postgres` user
(`runuser`), and the data folder belongs to that user. Connections are local and trusted:
for a server other machines reach, put it behind your usual authentication and TLS.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from segflow.errors import UserError

log = logging.getLogger(__name__)

DB_USER = "mlflow"
DB_NAME = "mlflow"


def _as_db_owner(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(_as_db_owner(cmd), capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise UserError(f"{' '.join(cmd[:2])} failed ({result.returncode}): {result.stderr.strip()[-800:]}")
    return result


def _require(program: str) -> None:
    if shutil.which(program) is None:
        raise UserError(
            f"{program} is not on PATH: install PostgreSQL's server programs "
            "(Debian: apt-get install postgresql) or put their bin folder on PATH"
        )


def start_postgres(folder: Path, port: int) -> str:
    """Initialise (once) and start a PostgreSQL cluster in folder/pgdata listening on
    127.0.0.1:`port`, with database `mlflow`; returns its SQLAlchemy URI."""
    for program in ("initdb", "pg_ctl", "createdb"):
        _require(program)
    folder = folder.resolve()
    data = folder / "pgdata"
    if not (data / "PG_VERSION").is_file():
        data.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:  # the cluster belongs to the user that runs it
            for path in (folder, data):
                shutil.chown(path, "postgres", "postgres")
        data.chmod(0o700)
        _run(["initdb", "-D", str(data), "-U", DB_USER, "--auth=trust", "-E", "UTF8", "--no-instructions"])
    options = f"-p {port} -h 127.0.0.1 -k {data}"  # the Unix socket stays inside the folder
    _run(["pg_ctl", "-D", str(data), "-l", str(data / "server.log"), "-o", options, "-w", "start"])
    result = subprocess.run(
        _as_db_owner(["createdb", "-h", "127.0.0.1", "-p", str(port), "-U", DB_USER, DB_NAME]),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if result.returncode != 0 and "already exists" not in result.stderr:
        raise UserError(f"createdb failed: {result.stderr.strip()}")
    log.info("PostgreSQL on 127.0.0.1:%d, data in %s", port, data)
    return f"postgresql+psycopg2://{DB_USER}@127.0.0.1:{port}/{DB_NAME}"


def stop_postgres(folder: Path) -> None:
    data = folder.resolve() / "pgdata"
    if (data / "postmaster.pid").is_file():
        _run(["pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop"])


def server_command(database: str, artifacts: Path, host: str, port: int, workers: int = 1) -> list[str]:
    """`mlflow server` on `database` with proxied artifacts stored in `artifacts`."""
    artifacts.mkdir(parents=True, exist_ok=True)
    return [
        str(Path(sys.executable).parent / "mlflow"), "server",
        "--backend-store-uri", database,
        "--serve-artifacts", "--artifacts-destination", str(artifacts.resolve()),
        "--host", host, "--port", str(port), "--workers", str(workers),
    ]  # fmt: skip


def serve(folder: Path, host: str, port: int, db_port: int) -> int:
    """Start PostgreSQL and run `mlflow server` until interrupted; then stop PostgreSQL."""
    database = start_postgres(folder, db_port)
    cmd = server_command(database, folder / "artifacts", host, port)
    print(
        f"MLflow tracking server on http://{host}:{port} (PostgreSQL on 127.0.0.1:{db_port}, artifacts "
        f"in {folder / 'artifacts'}); point checkouts at it: export MLFLOW_TRACKING_URI=http://{host}:{port}"
    )
    try:
        return subprocess.run(cmd).returncode
    except KeyboardInterrupt:
        return 0
    finally:
        stop_postgres(folder)
