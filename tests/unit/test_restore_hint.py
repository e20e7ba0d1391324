"""The line a failed stage prints to restore its last good outputs, read from dvc.yaml."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from segflow.artifacts import restore_hint


def _repo(tmp_path: Path) -> Path:
    stages = {
        "train": {
            "cmd": "x",
            "outs": ["artifacts/model"],
            "plots": [{"reports/curves.csv": {"cache": False}}],
        },
        "promote": {"cmd": "x", "outs": [{"reports/promotion.json": {"cache": False, "persist": True}}]},
        "report": {"cmd": "x", "metrics": [{"reports/uncommitted.json": {"cache": False}}]},
    }
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports/curves.csv").write_text("epoch\n")
    identity = ["-c", "user.name=segflow tests", "-c", "user.email=tests@segflow.invalid"]
    for command in (["init", "-q"], ["add", "-A"], [*identity, "commit", "-qm", "x"]):
        subprocess.run(["git", *command], cwd=tmp_path, check=True)
    return tmp_path


def test_cached_outputs_come_back_from_dvc_and_committed_reports_from_git(tmp_path):
    hint = restore_hint("train", _repo(tmp_path))
    assert hint.endswith("back: dvc checkout train && git checkout -- reports/curves.csv"), hint


def test_outputs_dvc_keeps_or_git_never_held_are_not_promised(tmp_path):
    repo = _repo(tmp_path)
    assert restore_hint("promote", repo) == ""  # persist: true, DVC did not remove it
    assert restore_hint("report", repo) == ""  # not committed: git cannot give it back
    assert restore_hint("unknown", repo) == ""
