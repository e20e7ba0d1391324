"""dvc.yaml's code deps are exactly each stage's import closure, so editing any module a
stage runs re-runs it, and nothing else does. Without this, DVC silently keeps outputs made
by old code (or re-runs a stage for code it never imports).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from segflow.codebase import closure_files, stage_code_deps

ROOT = Path(__file__).resolve().parents[2]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
# promote builds the Bento, which ships these whole (bentofile.yaml includes them).
SHIPPED_WHOLE = ("segflow/core", "segflow/serve")


def _deps(stage: dict) -> set[str]:
    return {d if isinstance(d, str) else next(iter(d)) for d in stage["deps"]}


def _code(deps: set[str]) -> set[str]:
    return {d for d in deps if d.startswith(("segflow/", "stages/")) or d == "service.py"}


def _covered(path: str, deps: set[str]) -> bool:
    return path in deps or any(path.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("name", sorted(DVC["stages"]))
def test_stage_code_deps_are_its_import_closure(name):
    stage = DVC["stages"][name]
    assert stage["cmd"] == f"python -m stages.{name}"
    needed = set(stage_code_deps(name))
    if name == "promote":
        needed |= set(closure_files("service"))
    listed = _code(_deps(stage))
    missing = sorted(p for p in needed if not _covered(p, listed))
    stale = sorted(d for d in listed if d not in needed and d not in SHIPPED_WHOLE)
    hint = f"print the right list with `python -m segflow.codebase {name}`"
    assert not missing, f"dvc.yaml stage {name!r} lacks deps {missing}; {hint}"
    assert not stale, f"dvc.yaml stage {name!r} lists deps it never imports {stale}; {hint}"


def test_promote_depends_on_everything_the_bento_ships():
    deps = _deps(DVC["stages"]["promote"])
    assert {"service.py", "bentofile.yaml", *SHIPPED_WHOLE} <= deps


def test_closure_follows_imports_inside_functions():
    # segflow.cli imports segflow.release.teamserver only inside the command that uses it.
    assert "segflow/release/teamserver.py" in closure_files("segflow.cli")
    # The training targets (interior_target) decide what train computes.
    assert "segflow/core/instances.py" in stage_code_deps("train")
