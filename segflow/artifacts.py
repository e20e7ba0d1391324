"""Where stages read and write, and the small helpers every stage shares.

Paths are relative to the repository root, which is DVC's working directory for stages.
"""

from __future__ import annotations

import contextlib
import csv
import json
import shutil
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd

from segflow.errors import UserError
from segflow.runtime import configure_logging, offline_env

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

    A failing stage thus leaves the previous output exactly as it was.
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
        main()
    except (UserError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        traceback.print_exc(limit=1)
        sys.exit(130)
