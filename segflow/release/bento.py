"""Packaging the champion for serving: BentoML model store, Bento build, container context.

The Bento holds only what serving needs: segflow/core and segflow/serve with ONNX Runtime,
NumPy, OpenCV, scikit-image and Pillow; training, tracking and pipeline libraries stay out of
it (bentofile.yaml; tests/unit/test_boundaries.py checks both).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from segflow.paths import repo_root
from segflow.serve.monitoring import REFERENCE_FILE
from segflow.serve.precision import INT8_FILE, INT8_REPORT

BENTO_MODEL_NAME = "segflow-segmenter"
MODEL_FILES = ("model.onnx", "preprocessing.json")
# The drift reference and the INT8 variant with its check; older exports lack them, and a
# variant that failed its check is not there (int8.json says why).
OPTIONAL_MODEL_FILES = (REFERENCE_FILE, INT8_FILE, INT8_REPORT)
# Never shipped in a Bento: serving runs on ONNX Runtime alone.
FORBIDDEN_REQUIREMENTS = ("torch", "torchvision", "segmentation-models-pytorch", "dvc", "mlflow")


def load_bentoml():
    """The bentoml module, imported offline and with the venv's uv on PATH (for builds)."""
    from segflow.runtime import offline_env

    offline_env()
    # `bentoml build` runs uv; the venv's copy must win over a missing one on PATH.
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    import bentoml

    return bentoml


def import_model(model_dir: Path, labels: dict[str, str], metadata: dict) -> str:
    """Copy model.onnx and preprocessing.json into the BentoML model store.

    Args:
        model_dir: folder holding MODEL_FILES.
        labels: string labels (registry name/version, git commit, data hash).
        metadata: JSON-like extras (test metrics, preprocessing).

    Returns:
        The new model tag, e.g. "segflow-segmenter:abcd1234efgh5678".
    """
    bentoml = load_bentoml()
    missing = [name for name in MODEL_FILES if not (model_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{model_dir} lacks {', '.join(missing)}; run `dvc repro export` first")
    with bentoml.models.create(BENTO_MODEL_NAME, labels=labels, metadata=metadata) as model:
        for name in MODEL_FILES + tuple(n for n in OPTIONAL_MODEL_FILES if (model_dir / n).is_file()):
            shutil.copyfile(model_dir / name, model.path_of(name))
    return str(model.tag)


def find_model(registry_name: str, registry_version: str) -> str | None:
    """The store's model imported from this registry version, if any (newest first)."""
    bentoml = load_bentoml()
    candidates = [
        m
        for m in bentoml.models.list(BENTO_MODEL_NAME)
        if m.info.labels.get("registry_name") == registry_name
        and m.info.labels.get("registry_version") == str(registry_version)
    ]
    candidates.sort(key=lambda m: m.info.creation_time, reverse=True)
    return str(candidates[0].tag) if candidates else None


def build_bento(model_tag: str, labels: dict[str, str]) -> tuple[str, Path]:
    """Build the Bento from bentofile.yaml, pinned to `model_tag`.

    The model tag is a build argument (recorded in the Bento and restored when it is
    served), so the Bento always serves the model it was built with.

    Returns:
        (the Bento tag, the path of its generated Dockerfile).
    """
    bentoml = load_bentoml()
    root = repo_root()
    bento = bentoml.bentos.build_bentofile(
        str(root / "bentofile.yaml"),
        build_ctx=str(root),
        labels={**labels, "model_tag": model_tag},
        args={"model_tag": model_tag},
    )
    return str(bento.tag), Path(bento.path) / "env" / "docker" / "Dockerfile"


def bento_requirements(bento_tag: str) -> list[str]:
    """The Python requirements the Bento installs (env/python/requirements.txt)."""
    bentoml = load_bentoml()
    path = Path(bentoml.bentos.get(bento_tag).path) / "env" / "python" / "requirements.txt"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [line.strip() for line in lines if line.strip() and not line.startswith(("#", "-"))]


def bento_size(bento_tag: str) -> int:
    """Bytes on disk of the Bento including the model it packs."""
    bentoml = load_bentoml()
    bento = bentoml.bentos.get(bento_tag)
    return int(bento.total_size())
