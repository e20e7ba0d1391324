"""export: ONNX + preprocessing.json, a parity check against torch, then registration.

The parity check runs both backends through segflow.core.inference on the test images; a
difference above export.parity_atol fails the stage before anything is registered. With
export.int8 an INT8 variant is quantized and checked against fp32 on the validation split
(segflow.release.quantize); it ships beside fp32 only if it passed, int8.json says why.
"""

from __future__ import annotations

from segflow.artifacts import (
    CONVERTED,
    EXPORT,
    MODEL,
    REPORTS,
    SPLIT,
    data_hash,
    read_json,
    read_manifest,
    replace_dir,
    run_stage,
)
from segflow.config import load_params
from segflow.core.preprocessing import normalize
from segflow.data.samples import load_samples
from segflow.release import registry, tracking
from segflow.release.export import write_export
from segflow.runtime import set_threads
from segflow.serve.monitoring import REFERENCE_FILE
from segflow.serve.precision import INT8_FILE, INT8_REPORT
from segflow.train.checkpoints import load_checkpoint


def main() -> None:
    params = load_params()
    set_threads(params.train.threads)
    model, prep = load_checkpoint(MODEL / "model.pt")
    prep = prep.with_postprocess(read_json(REPORTS / "postprocess.json"))  # as evaluate chose on val
    test = load_samples(read_manifest(SPLIT / "test.csv"), CONVERTED)
    train = load_samples(read_manifest(SPLIT / "train.csv"), CONVERTED)
    val = load_samples(read_manifest(SPLIT / "val.csv"), CONVERTED) if params.export.int8.enabled else None
    test_scores = read_json(REPORTS / "metrics.json")["test"]  # before anything is written

    with replace_dir(EXPORT) as out:
        # A ParityError (a UserError) stops the stage with its message, before registration.
        parity, int8 = write_export(params.export, model, prep, out, train, test, val)
        print(
            f"export: parity max |ONNX - torch| = {parity['max_abs_diff']:.2e} on {parity['images']} images"
        )
        if int8 is not None:
            print(f"export: INT8 variant {'shipped' if int8['passed'] else 'not shipped'}: {int8['reason']}")
        tags = tracking.lineage_tags("export", params.digest(), data_hash(SPLIT))
        parent_id = _log_checks(tags, parity, int8)
        registration = _register(params.export, parent_id, out, prep, test, tags, test_scores)
    print(f"export: registered {registration['name']} version {registration['version']} as 'challenger'")


def _log_checks(tags: dict, parity: dict, int8: dict | None) -> str:
    """The parity and INT8 checks on the model's MLflow runs; returns the parent run's id."""
    with tracking.model_stage_run("export", tags, MODEL) as (parent_id, _):
        import mlflow

        mlflow.log_metrics({"parity_max_abs_diff": parity["max_abs_diff"]})
        if int8 is not None:
            mlflow.log_dict(int8, INT8_REPORT)
            drops = {f"int8_{k}": v for k, v in int8.items() if k.endswith("_drop")}
            mlflow.log_metrics(drops | {"int8_shipped": int(int8["passed"])})
        tracking.log_datasets(SPLIT, ("train", "test"))  # the drift reference; the parity check
        mlflow.log_dict(parity, "parity.json")
    return parent_id


def _register(cfg, parent_id: str, out, prep, test, tags: dict, test_scores: dict) -> dict:
    """A new version of the registered model, aliased 'challenger', with the test scores as tags."""
    example = normalize(test[0].image, prep)[None, :, :64, :64]  # (1, C, 64, 64) float32
    version_tags = {**tags, "segflow.test_hash": read_json(SPLIT / "summary.json")["test_hash"]}
    version_tags |= {f"test_{k}": v for k, v in test_scores.items()}
    return registry.register_onnx(
        parent_id,
        out / "model.onnx",
        out / "preprocessing.json",
        example,
        cfg.registered_model_name,
        version_tags,
        extra_files=tuple(
            out / name for name in (REFERENCE_FILE, INT8_FILE, INT8_REPORT) if (out / name).is_file()
        ),
        int8_path=out / INT8_FILE,
    )


if __name__ == "__main__":
    run_stage(main)
