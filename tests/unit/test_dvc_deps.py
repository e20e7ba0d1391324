"""Every segflow module a stage imports (directly or through other segflow modules, at
top level or inside functions) is listed in that stage's deps in dvc.yaml, so editing it
re-runs the stage. Without this, DVC silently keeps outputs made by old code.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())


def _module_file(name: str) -> Path | None:
    parts = name.split(".")
    for candidate in (ROOT.joinpath(*parts).with_suffix(".py"), ROOT.joinpath(*parts, "__init__.py")):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path) -> set[Path]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name.split(".")[0] in {"segflow", "stages", "service"}:
                module = _module_file(name)
                if module and module.name != "__init__.py":
                    found.add(module)
    return found


def import_closure(path: Path) -> set[str]:
    seen, todo = set(), [path]
    while todo:
        current = todo.pop()
        for module in _imports(current) - seen:
            seen.add(module)
            todo.append(module)
    return {p.relative_to(ROOT).as_posix() for p in seen}


def _deps(stage: dict) -> set[str]:
    return {d if isinstance(d, str) else next(iter(d)) for d in stage["deps"]}


@pytest.mark.parametrize("name", sorted(DVC["stages"]))
def test_stage_deps_cover_its_imports(name):
    stage = DVC["stages"][name]
    entry = stage["cmd"].split("-m ")[1].strip()
    script = ROOT / (entry.replace(".", "/") + ".py")
    needed = import_closure(script) | {script.relative_to(ROOT).as_posix()}
    missing = sorted(needed - _deps(stage))
    assert not missing, f"dvc.yaml stage {name!r} lacks deps: {missing}"
