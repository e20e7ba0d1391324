"""The GitHub Actions workflows validate against the GitHub-workflow JSON schema, offline.

check-jsonschema ships the schema inside the package (`--builtin-schema`), so nothing is
fetched. A broken workflow file is only noticed on GitHub otherwise.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
CHECK = Path(sys.executable).parent / "check-jsonschema"


def _validate(*paths: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(CHECK), "--builtin-schema", "vendor.github-workflows", *map(str, paths)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_both_workflows_exist():
    assert {p.name for p in WORKFLOWS} == {"ci.yml", "promote.yml"}


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_matches_the_github_schema(workflow: Path):
    result = _validate(workflow)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_validator_rejects_a_broken_workflow(tmp_path: Path):
    broken = tmp_path / "broken.yml"
    broken.write_text("on: push\njobs:\n  test:\n    steps: []\n")  # no runs-on
    assert _validate(broken).returncode != 0


def test_ci_runs_the_readme_test_command_and_promote_is_strict():
    ci = yaml.safe_load((ROOT / ".github/workflows/ci.yml").read_text())
    promote = yaml.safe_load((ROOT / ".github/workflows/promote.yml").read_text())
    fast = [s.get("run", "") for s in ci["jobs"]["fast"]["steps"]]
    end_to_end = [s.get("run", "") for s in ci["jobs"]["end-to-end"]["steps"]]
    assert "make lint" in fast and "make test-fast" in fast
    assert "make test-slow" in end_to_end  # together: everything `make test` runs
    promote_runs = " ".join(s.get("run", "") for s in promote["jobs"]["promote"]["steps"])
    assert "segflow promote --strict" in promote_runs and "bentoml containerize" in promote_runs
    # The container is started and answers before it is pushed.
    steps = [s.get("name", "") for s in promote["jobs"]["promote"]["steps"]]
    smoke = next(i for i, n in enumerate(steps) if n.startswith("Smoke-test the container"))
    assert smoke < steps.index("Push")
    assert "/readyz" in promote_runs and "/segment" in promote_runs


def test_promote_pulls_from_and_pushes_to_the_remote_its_secrets_name():
    promote = yaml.safe_load((ROOT / ".github/workflows/promote.yml").read_text())
    job = promote["jobs"]["promote"]
    assert job["env"]["DVC_REMOTE_URL"] == "${{ secrets.DVC_REMOTE_URL }}"
    runs = [s.get("run", "") for s in job["steps"]]
    at = {name: next(i for i, r in enumerate(runs) if name in r) for name in (
        "dvc remote add", "dvc pull", "dvc repro", "segflow promote", "dvc push --run-cache")}  # fmt: skip
    assert (
        at["dvc remote add"]
        < at["dvc pull"]
        < at["dvc repro"]
        < at["segflow promote"]
        < at["dvc push --run-cache"]
    )
    assert "--pull" in runs[at["dvc repro"]]  # outputs a previous run pushed are not recomputed
    # Without the secret (a fork) the remote steps are skipped and everything is reproduced.
    for name in ("dvc remote add", "dvc pull", "dvc push --run-cache"):
        assert "env.DVC_REMOTE_URL != ''" in job["steps"][at[name]]["if"]
