"""The border between what ships (segflow.core, segflow.serve, service.py) and what trains.

A built Bento holds only bentofile.yaml's includes and the serving requirements: a module
that reaches the training side, or torch/smp/DVC/MLflow, crashes it at startup. The
import-linter contracts in pyproject.toml guard the packages; these tests run them and
check that the Bento's includes cover service.py's whole import closure.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from segflow.codebase import closure_files

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
# What service.py may import from outside the project: the serving requirements.
SERVING_LIBRARIES = {"bentoml", "numpy", "starlette", "cv2", "onnxruntime", "PIL", "tifffile", "skimage"}
STDLIB = set(sys.stdlib_module_names) | {"__future__"}


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_import_linter_contracts_are_kept():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "2 kept, 0 broken" in result.stdout


def test_a_torch_import_in_core_breaks_the_contract(tmp_path: Path):
    # A copy of the package with one forbidden import: the same check must fail and name it.
    shutil.copytree(ROOT / "segflow", tmp_path / "segflow", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    masks = tmp_path / "segflow" / "core" / "masks.py"
    masks.write_text("import torch  # noqa\n" + masks.read_text())
    result = subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(tmp_path), "PATH": str(Path(sys.executable).parent)},
    )
    assert result.returncode != 0
    assert "segflow.core.masks -> torch" in result.stdout


def _bento_includes() -> list[str]:
    bentofile = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    return [entry.lstrip("/") for entry in bentofile["include"]]


def test_the_bento_includes_cover_service_closure():
    includes = _bento_includes()
    shipped = [p for p in closure_files("service")]
    uncovered = [
        p
        for p in shipped
        if not any(p == inc or (inc.endswith("/") and p.startswith(inc)) for inc in includes)
    ]
    assert not uncovered, f"service.py imports {uncovered}, which bentofile.yaml does not include"
    assert "segflow/core/" in includes and "segflow/serve/" in includes  # whole packages, no module lists


def test_service_imports_only_serving_libraries():
    tree = ast.parse((ROOT / "service.py").read_text())
    external = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            external |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            external.add(node.module.split(".")[0])
    external -= STDLIB | {"segflow"}
    assert external <= SERVING_LIBRARIES, f"service.py imports {sorted(external - SERVING_LIBRARIES)}"


# The import names of what service.py's closure uses -> the distributions that provide them.
DISTRIBUTIONS = {
    "bentoml": "bentoml",  # added by `bentoml build` itself
    "cv2": "opencv-python-headless",
    "numpy": "numpy",
    "onnxruntime": "onnxruntime",
    "PIL": "pillow",
    "pydantic": "pydantic",
    "scipy": "scipy",
    "simplejpeg": "simplejpeg",
    "skimage": "scikit-image",
    "starlette": "bentoml",  # BentoML's own server stack
    "tifffile": "tifffile",
    "uvicorn": "bentoml",  # BentoML's HTTP server
    "yaml": "pyyaml",
}


def _third_party(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names - STDLIB - {"segflow", "service"}


def test_everything_the_shipped_code_imports_is_in_the_bento_requirements():
    # import-linter forbids the training side; this is the other half: whatever core, serve
    # and service.py do import must be installed in the Bento, or it dies at startup.
    bentofile = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    listed = {re.split(r"[=<>!~ ]", p, maxsplit=1)[0].lower() for p in bentofile["python"]["packages"]}
    listed.add("bentoml")
    imported = set().union(*(_third_party(ROOT / f) for f in closure_files("service")))
    unknown = sorted(imported - set(DISTRIBUTIONS))
    assert not unknown, f"shipped code imports {unknown}: add them to bentofile.yaml and DISTRIBUTIONS here"
    missing = sorted({DISTRIBUTIONS[name] for name in imported} - listed)
    assert not missing, f"bentofile.yaml python.packages lacks {missing}"


def test_resume_fingerprint_follows_every_file_of_the_training_closure(tmp_path: Path, monkeypatch):
    from segflow.train import resume

    files = resume.code_files()
    assert files == closure_files("segflow.train.loop")
    for needed in ("segflow/train/loop.py", "segflow/core/instances.py", "segflow/data/samples.py"):
        assert needed in files
    # Hash a copy of the tree, then edit one file the loop only reaches indirectly.
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    monkeypatch.setattr(resume, "source_root", lambda: tmp_path)
    before = resume._code_hash()
    target = tmp_path / "segflow/core/instances.py"
    target.write_text(target.read_text() + "\n# an edit\n")
    assert resume._code_hash() != before
