"""Where things live: the repository root, and the root the MLflow store belongs to."""

from __future__ import annotations

from pathlib import Path

# `dvc exp run --temp` and queued experiments run in a copy of the repository under
# <repo>/.dvc/tmp/exps/<run>/ ; logging there must still reach the store of <repo>.
_EXP_TMP_PART = ("", ".dvc", "tmp", "exps")


def repo_root(start: Path | None = None) -> Path:
    """The nearest folder at or above `start` (default: cwd) that holds dvc.yaml.

    Falls back to `start` itself when there is none, so library use outside a
    checkout still works.
    """
    start = (start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if (folder / "dvc.yaml").is_file():
            return folder
    return start


def store_root(start: Path | None = None) -> Path:
    """The repository whose `mlflow.db` this process should log to.

    Inside a DVC experiment's temporary copy this is the original repository, so that
    `dvc exp run --temp` and `dvc queue start` log to the same store as `dvc repro`.
    """
    root = repo_root(start)
    parts = root.parts
    for i in range(len(parts) - 3):
        if parts[i : i + 3] == _EXP_TMP_PART[1:]:
            return Path(*parts[:i])
    return root
