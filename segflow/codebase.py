"""Which code a module depends on: its import closure within this project.

Lists of "the modules that matter" are computed here instead of kept by hand: the resume
fingerprint hashes the training loop's closure, and tests check dvc.yaml's stage deps and
the Bento's includes against the closures of the stages and of service.py.

Imports are read from the source (ast), at module level and inside functions alike, so a
lazily imported module counts as much as one imported at the top.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

# The project's top-level modules and packages (stages and service.py live beside segflow/).
PROJECT_ROOTS = ("segflow", "stages", "service")


def source_root() -> Path:
    """The folder that holds the segflow package (the repository root in a checkout)."""
    return Path(__file__).resolve().parents[1]


def module_file(name: str, root: Path | None = None) -> Path | None:
    """The source file of a project module (a package's __init__.py), or None when absent."""
    root = root or source_root()
    parts = name.split(".")
    for candidate in (root.joinpath(*parts).with_suffix(".py"), root.joinpath(*parts, "__init__.py")):
        if candidate.is_file():
            return candidate
    return None


def direct_imports(name: str, root: Path | None = None) -> set[str]:
    """Project modules that module `name` imports (absolute imports; `from pkg import mod` counts mod)."""
    root = root or source_root()
    path = module_file(name, root)
    if path is None:
        return set()
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        candidates: list[str] = []
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            candidates = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for candidate in candidates:
            if candidate.split(".")[0] in PROJECT_ROOTS and module_file(candidate, root):
                found.add(candidate)
                found.update(_parents(candidate, root))  # importing a.b.c runs a/__init__ and a/b/__init__
    return found


def _parents(name: str, root: Path) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts)) if module_file(".".join(parts[:i]), root)}


@cache
def import_closure(name: str, root: Path | None = None) -> tuple[str, ...]:
    """`name` and every project module it imports, directly or through others, sorted.

    Args:
        name: a dotted module name, e.g. "segflow.train.loop" or "stages.train".
        root: the folder holding the project's packages; default source_root().

    Returns:
        Sorted dotted names, `name` included.
    """
    root = root or source_root()
    seen, todo = {name}, [name]
    while todo:
        for imported in direct_imports(todo.pop(), root) - seen:
            seen.add(imported)
            todo.append(imported)
    return tuple(sorted(seen))


def closure_files(name: str, root: Path | None = None) -> list[str]:
    """The closure's source files as repository-relative POSIX paths, sorted.

    Empty package __init__.py files are left out: they hold no code to depend on.
    """
    root = root or source_root()
    files = []
    for module in import_closure(name, root):
        path = module_file(module, root)
        if path is None:  # not in this installation (service.py ships beside, not inside, the package)
            continue
        if path.name == "__init__.py" and not path.read_text().strip():
            continue
        files.append(path.relative_to(root).as_posix())
    return sorted(files)


def stage_code_deps(stage: str, root: Path | None = None) -> list[str]:
    """The code deps a dvc.yaml stage needs: its stage file and every project module it imports."""
    return closure_files(f"stages.{stage}", root)


def main(argv: list[str] | None = None) -> int:
    """`python -m segflow.codebase STAGE...`: print the code deps to paste into dvc.yaml."""
    import sys

    for stage in argv if argv is not None else sys.argv[1:]:
        print(f"{stage}:")
        for path in stage_code_deps(stage):
            print(f"      - {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
