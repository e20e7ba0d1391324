"""Where stages read and write, and the small helpers every stage shares.

Paths are relative to the repository root, which is DVC's working directory for stages.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import shutil
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd

from segflow.errors import UserError
from segflow.release import tracking
from segflow.runtime import configure_logging, offline_env

log = logging.getLogger(__name__)

INGESTED = Path("artifacts/ingested")
CONVERTED = Path("artifacts/converted")
SPLIT = Path("artifacts/split")
MODEL = Path("artifacts/model")
EXPORT = Path("artifacts/export")
REPORTS = Path("reports")
PLOTS = REPORTS / "plots"
OVERLAYS = REPORTS / "overlays"
SUMMARY = "summary.json"


class StageError(UserError):
    """A problem the user can fix; stages print it without a traceback and exit 1."""


def write_json(path: str | Path, data: object) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def write_csv(path: str | Path, rows: list[dict]) -> None:
    """One row per dict; the columns are the union of their keys, in first-seen order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path} is missing; run the stage that produces it (`dvc repro`)")
    return json.loads(path.read_text())


def read_manifest(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path} is missing; run the stage that produces it (`dvc repro`)")
    return pd.read_csv(path, dtype={"id": str, "content_hash": str}, keep_default_na=False, na_values=[""])


def data_hash(folder: Path) -> str | None:
    """The dataset hash recorded by ingest and carried forward in each summary.json."""
    path = folder / SUMMARY
    return json.loads(path.read_text()).get("data_hash") if path.is_file() else None


@contextlib.contextmanager
def replace_dir(target: Path) -> Iterator[Path]:
    """Build a folder beside `target` and swap it in only when the block succeeds.

    A stage that fails half-way thus never leaves a half-written output. (Under `dvc repro`
    DVC has removed the previous output before the stage started; run_stage says how to
    get it back.)
    """
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main(): offline defaults, and user errors as one clear message.

    Unexpected exceptions keep their traceback: those are bugs to report, not input to fix.
    """
    offline_env()
    configure_logging()
    try:
        tracking.check_store()  # every stage logs to MLflow: an unusable store fails now, not after the work
        main()
    except (UserError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        _print_restore_hint()
        sys.exit(1)
    except KeyboardInterrupt:
        traceback.print_exc(limit=1)
        _print_restore_hint()
        sys.exit(130)
    except Exception as exc:
        if not _store_failure(exc):
            _print_restore_hint()
            raise
        # The store failed mid-run (after check_store passed): one line, traceback at DEBUG.
        log.debug("tracking store failure", exc_info=True)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        print(
            f"error: the MLflow store {tracking.tracking_uri()} failed: {first} "
            f"(SEGFLOW_LOG_LEVEL=DEBUG shows the traceback){_lock_hint(exc)}",
            file=sys.stderr,
        )
        _print_restore_hint()
        sys.exit(1)


def _lock_hint(exc: BaseException) -> str:
    """What to do when an SQLite store stayed locked past MLflow's own wait (it sets SQLite's
    busy_timeout to 20 s, so concurrent writers normally just queue)."""
    if "database is locked" not in f"{exc} {exc.__cause__} {exc.__context__}":
        return ""
    return (
        "; another process held the SQLite store's write lock for over 20 s. Run again (a killed "
        "training resumes), or give several writers at once (dvc queue start -j N, a team) a "
        "tracking server: make mlflow-server, then MLFLOW_TRACKING_URI=http://127.0.0.1:5000"
    )


def _store_failure(exc: BaseException | None) -> bool:
    """Whether `exc`, or an exception it was raised from, is the store's database or
    connection failing (MLflow wraps those); MLflow's other errors keep their traceback."""
    seen = 0
    while exc is not None and seen < 10:
        if type(exc).__module__.split(".")[0] in ("sqlalchemy", "sqlite3", "requests", "urllib3"):
            return True
        if "API request to" in str(exc) and "failed" in str(exc):  # MLflow's client out of retries
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _print_restore_hint() -> None:
    stage = os.environ.get("DVC_STAGE")  # set by DVC for the stage it runs
    if stage:
        hint = restore_hint(stage, Path(os.environ.get("DVC_ROOT", ".")))
        if hint:
            print(hint, file=sys.stderr)


def restore_hint(stage: str, root: Path) -> str:
    """How to get back the outputs DVC removed before running `stage` (it keeps outputs only
    with `persist: true`, which would turn off its run-cache).

    Cached outputs are in DVC's cache as dvc.lock records them: `dvc checkout <stage>`. Reports
    (`cache: false`) are committed to git: `git checkout -- <paths>` restores them as last
    committed. Returns "" for a stage without outputs.
    """
    import yaml

    dvc_yaml = root / "dvc.yaml"
    if not dvc_yaml.is_file():
        return ""
    spec = (yaml.safe_load(dvc_yaml.read_text()).get("stages") or {}).get(stage.split(":")[-1]) or {}
    entries = [_output(item) for kind in ("outs", "metrics", "plots") for item in spec.get(kind) or []]
    outputs = [(path, cached) for path, cached, persist in entries if not persist]  # DVC keeps those
    commands = [f"dvc checkout {stage}"] if any(cached for _, cached in outputs) else []
    committed = [path for path, cached in outputs if not cached and _committed(root, path)]
    if committed:
        commands.append("git checkout -- " + " ".join(committed))
    if not commands:
        return ""
    return (
        f"DVC removed the previous outputs of {stage} before this run; to put the last good run's "
        f"back: {' && '.join(commands)}"
    )


def _output(item: str | dict) -> tuple[str, bool, bool]:
    """(path, cached, persisted) of one dvc.yaml output entry: `path` or `{path: {cache: false, ...}}`."""
    if isinstance(item, str):
        return item, True, False
    [(path, options)] = item.items()
    options = options or {}
    return path, options.get("cache", True), options.get("persist", False)


def _committed(root: Path, path: str) -> bool:
    """Whether git's HEAD holds anything under `path` (False without git)."""
    try:
        command = ["git", "ls-tree", "-r", "--name-only", "HEAD", "--", path]
        result = subprocess.run(command, cwd=root, capture_output=True, text=True)
    except OSError:
        return False
    return result.returncode == 0 and bool(result.stdout.strip())
