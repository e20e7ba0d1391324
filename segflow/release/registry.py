"""The model registry: exported ONNX files registered as versions, and found again by content.

export registers each exported model as a version of `export.registered_model_name` with the
alias `challenger`, tagged with the sha256 of the files it holds; promote finds the version
holding artifacts/export's files by those hashes (DVC's outputs hold no version numbers) and
compares it with the champion's.
"""

from __future__ import annotations

import json
from pathlib import Path

from segflow.release.tracking import file_sha256, once_more_if_raced

ONNX_KEY_TAG = "segflow.onnx_sha256"  # on a registered version: the exported file it holds
# ... and its preprocessing.json: evaluate may change post-processing, TTA or the diameter
# setting while the network (and so the ONNX file) stays byte-identical.
PREP_KEY_TAG = "segflow.preprocessing_sha256"
# ... and its INT8 variant ("none" without one): a new variant of the same network is news too.
INT8_KEY_TAG = "segflow.int8_sha256"


def optional_sha256(path: Path | None) -> str:
    """A file's sha256, or "none" when there is no such file (an optional model variant)."""
    return file_sha256(path) if path is not None and path.is_file() else "none"


def file_tags(onnx_path: Path, prep_path: Path, int8_path: Path | None) -> dict[str, str]:
    """The version tags naming the files an export holds: what register_onnx tags a version
    with, and what promote compares with the champion's to see whether it holds this export."""
    return {
        ONNX_KEY_TAG: file_sha256(onnx_path),
        PREP_KEY_TAG: file_sha256(prep_path),
        INT8_KEY_TAG: optional_sha256(int8_path),
    }


def find_registered_version(client, name: str, onnx_path: Path, prep_path: Path | None = None) -> str | None:
    """The newest registered version of `name` that holds exactly the file onnx_path (and,
    given prep_path, that preprocessing.json: two exports of one network with other
    post-processing are two versions), if any."""
    wanted = {ONNX_KEY_TAG: file_sha256(onnx_path)}
    if prep_path is not None:
        wanted[PREP_KEY_TAG] = file_sha256(prep_path)
    versions = [
        v
        for v in client.search_model_versions(f"name='{name}'")
        if all(v.tags.get(key) == value for key, value in wanted.items())
    ]
    return str(max(int(v.version) for v in versions)) if versions else None


def onnx_requirements() -> list[str]:
    """The pins a registered ONNX version needs to load as an MLflow pyfunc (MLflow adds its
    own). The same list MLflow infers, read from this environment: its inference starts a
    subprocess that imports the model's flavour (register_onnx took 8.8 s with it and 4.9 s
    without, under cProfile, on the tests' tiny model)."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("numpy", "onnx", "onnxruntime")]


def register_onnx(
    parent_id: str,
    onnx_path: Path,
    preprocessing_path: Path,
    input_example,
    registered_name: str,
    version_tags: dict[str, str],
    extra_files: tuple[Path, ...] = (),
    int8_path: Path | None = None,
) -> dict:
    """Log the ONNX model on the model's parent run and register it as `challenger`.

    The model carries preprocessing.json (plus `extra_files`, e.g. the drift reference and
    the INT8 variant, `int8_path`, whose hash is tagged too) as extra files and the
    preprocessing in its metadata, so a registered version alone is enough to serve it.

    Returns:
        {"name", "version", "alias", "model_uri", "run_id"}.
    """
    import mlflow
    import numpy as np
    import onnx
    from mlflow.models import ModelSignature
    from mlflow.tracking import MlflowClient
    from mlflow.types import Schema, TensorSpec

    prep = json.loads(preprocessing_path.read_text())
    proto = onnx.load(str(onnx_path))
    # The logits' channels as exported: the classes' logits and, for seeded instances, one more.
    channels_out = proto.graph.output[0].type.tensor_type.shape.dim[1].dim_value
    outputs = [TensorSpec(np.dtype("float32"), (-1, channels_out, -1, -1), prep["output_name"])]
    if prep.get("size_output"):  # the size head's estimate, one per image
        outputs.append(TensorSpec(np.dtype("float32"), (-1,), prep["size_output"]))
    signature = ModelSignature(
        inputs=Schema(
            [TensorSpec(np.dtype("float32"), (-1, prep["in_channels"], -1, -1), prep["input_name"])]
        ),
        outputs=Schema(outputs),
    )
    with mlflow.start_run(run_id=parent_id):
        info = mlflow.onnx.log_model(
            onnx_model=proto,
            name="model",
            registered_model_name=registered_name,
            signature=signature,
            input_example=input_example,
            extra_files=[str(preprocessing_path), *map(str, extra_files)],
            metadata={"preprocessing": prep},
            save_as_external_data=False,
            onnx_execution_providers=["CPUExecutionProvider"],
            pip_requirements=onnx_requirements(),
        )
    version = str(info.registered_model_version)
    client = MlflowClient()
    # Two exports at once: the later one's version stays the challenger, as without the race.
    once_more_if_raced(
        lambda: client.set_registered_model_alias(registered_name, "challenger", version), "alias challenger"
    )
    # The file's hash is how promote finds this version again (no version number in DVC's outputs).
    for key, value in {**version_tags, **file_tags(onnx_path, preprocessing_path, int8_path)}.items():
        client.set_model_version_tag(registered_name, version, key, str(value))
    return {
        "name": registered_name,
        "version": version,
        "alias": "challenger",
        "model_uri": f"models:/{registered_name}/{version}",
        "run_id": parent_id,
    }
