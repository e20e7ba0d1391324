"""The real `dvc repro` on a tiny copy of the repository: outputs, MLflow, registry, caching."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import run

pytestmark = pytest.mark.slow

STAGES = ("ingest", "convert", "split", "train", "evaluate", "export", "promote", "crossval")


def _client(repo: Path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{repo / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _params_digest(repo: Path) -> str:
    from segflow.config import load_params

    return load_params(repo / "params.yaml").digest()


def test_repro_writes_every_output(built_repo: Path):
    for path in ("artifacts/ingested/manifest.csv", "artifacts/ingested/validation.json",
                 "artifacts/converted/manifest.csv", "artifacts/split/train.csv",
                 "artifacts/split/val.csv", "artifacts/split/test.csv", "artifacts/model/model.pt",
                 "artifacts/export/model.onnx", "artifacts/export/preprocessing.json",
                 "reports/plots/train_curves.csv", "reports/plots/per_image.csv"):  # fmt: skip
        assert (built_repo / path).is_file(), path
    metrics = json.loads((built_repo / "reports/metrics.json").read_text())
    assert set(metrics) >= {"test", "val", "baseline"}
    for split in ("test", "val"):
        assert 0.0 <= metrics[split]["dice"] <= 1.0
    assert metrics["baseline"]["method"] == "otsu+watershed" and "ap50" in metrics["baseline"]["test"]
    for scores in (metrics["test"], metrics["val"], metrics["extra_sets"]["shifted"]):  # objects, too
        assert (
            0.0 <= scores["ap50"] <= 1.0
            and 0.0 <= scores["ap"] <= scores["ap50"]
            and scores["count_error"] >= 0
        )
    # Post-processing chosen on val is what export ships to the CLI and the service.
    post = json.loads((built_repo / "reports/postprocess.json").read_text())
    prep = json.loads((built_repo / "artifacts/export/preprocessing.json").read_text())
    assert post["tuned_on"] == "val" and prep["instances"] == "watershed"
    assert (prep["threshold"], prep["seed_threshold"]) == (post["threshold"], post["seed_threshold"])
    domains = (built_repo / "reports/plots/domains.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in domains[1:]] == ["test", "shifted"]
    assert len((built_repo / "reports/plots/ap_by_iou.csv").read_text().splitlines()) == 1 + 10
    assert json.loads((built_repo / "artifacts/export/parity.json").read_text())["max_abs_diff"] <= 1e-4
    # The INT8 variant: checked on val against fp32; on disk exactly when the check passed.
    int8 = json.loads((built_repo / "artifacts/export/int8.json").read_text())
    assert {"dice_fp32", "dice_int8", "dice_drop", "ap50_drop", "passed", "reason"} <= set(int8)
    assert int8["passed"] == (int8["dice_drop"] <= 0.005 and int8["ap50_drop"] <= 0.01)
    assert (built_repo / "artifacts/export/model.int8.onnx").is_file() == int8["passed"]
    assert len(list((built_repo / "reports/overlays").glob("*.png"))) == 2
    curves = (built_repo / "reports/plots/train_curves.csv").read_text().splitlines()
    assert curves[0].startswith("epoch,") and len(curves) == 1 + 2  # header + 2 epochs


def test_splits_are_disjoint_and_cover_the_data(built_repo: Path):
    import pandas as pd

    frames = {s: pd.read_csv(built_repo / f"artifacts/split/{s}.csv") for s in ("train", "val", "test")}
    ids = [set(f["id"]) for f in frames.values()]
    assert sum(len(i) for i in ids) == 16
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])


def test_second_repro_runs_nothing_and_status_is_clean(repo_copy: Path):
    again = run(["dvc", "repro"], repo_copy)
    assert "Running stage" not in again.stdout
    assert "up to date" in again.stdout
    status = run(["dvc", "status"], repo_copy)
    assert "up to date" in status.stdout, status.stdout


def test_a_fresh_clone_runs_the_gate_and_can_serve_its_champion(repo_copy: Path, tmp_path: Path):
    """The README's first run: clone, get the data (no remote for the rest), `dvc repro`.
    The clone's registry and BentoML store start empty, so its gate must run there even though
    dvc.lock says every other output is what the committed code makes."""
    run(["git", "add", "-A"], repo_copy)
    run(["git", "commit", "-qm", "pipeline run"], repo_copy)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo_copy), str(clone)], tmp_path)
    assert not (clone / "reports/promotion.json").exists()  # in DVC's cache, not in git
    # The data alone, as `make data` regenerates it; the copy's cache serves as a local remote.
    run(["dvc", "remote", "add", "--local", "-d", "origin", str(repo_copy / ".dvc/cache")], clone)
    run(["dvc", "pull", "-q", "data.dvc"], clone)
    repro = run(["dvc", "repro"], clone).stdout
    assert "Running stage 'promote'" in repro, repro
    record = json.loads((clone / "logs/release.json").read_text())
    assert record["decision"]["promote"], record["decision"]
    tag = record["serving"]["model_tag"]
    run(["bentoml", "models", "get", tag], clone)  # in the clone's own store: what the service serves
    # Same data and code: the same decision, and nothing for git to record.
    report = "reports/promotion.json"
    assert (clone / report).read_bytes() == (repo_copy / report).read_bytes()
    assert run(["git", "status", "--porcelain"], clone).stdout == ""


def test_changing_epochs_reruns_the_model_stages_and_going_back_restores_them_from_the_run_cache(
    repo_copy: Path,
):
    model = repo_copy / "artifacts/model/model.pt"
    first = {p: (repo_copy / p).read_bytes() for p in ("artifacts/model/model.pt", "reports/metrics.json")}
    original = (repo_copy / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params["train"]["epochs"] = 3
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params))
    log = run(["dvc", "repro"], repo_copy).stdout  # a dry run cannot see downstream changes
    ran = {stage for stage in STAGES if f"Running stage '{stage}'" in log}
    # crossval trains by the same params (it is off here: crossval.folds 0, so it only says so).
    assert ran == {"train", "evaluate", "export", "promote", "crossval"}, log
    assert model.read_bytes() != first["artifacts/model/model.pt"]

    # Back to the first epochs: DVC's run-cache restores the first run's outputs, no training.
    (repo_copy / "params.yaml").write_text(original)
    started = time.perf_counter()
    back = run(["dvc", "repro", "export"], repo_copy).stdout
    print(f"dvc repro export, back to the first params: {time.perf_counter() - started:.1f} s")
    for stage in ("train", "evaluate", "export"):
        assert f"Stage '{stage}' is cached - skipping run, checking out outputs" in back, back
    for path, content in first.items():
        assert (repo_copy / path).read_bytes() == content, path
    rest = run(["dvc", "repro"], repo_copy).stdout
    assert "Stage 'crossval' is cached - skipping run" in rest, rest
    assert "Running stage 'promote'" in rest  # it acts on the registry: never restored from a file


def test_tuning_grids_rerun_evaluation_not_training(repo_copy: Path):
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    params["inference"]["seed_threshold_grid"] = [0.5]
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params))
    status = run(["dvc", "status"], repo_copy).stdout
    assert "evaluate:" in status and "train:" not in status, status


def test_stage_runs_are_grouped_per_model_with_lineage_tags(built_repo: Path):
    client = _client(built_repo)
    model_exp = client.get_experiment_by_name("segflow")
    data_exp = client.get_experiment_by_name("segflow-data")
    assert model_exp is not None and data_exp is not None
    data_runs = client.search_runs([data_exp.experiment_id])
    assert {r.data.tags["segflow.stage"] for r in data_runs} == {"ingest", "convert", "split"}

    model_sha = hashlib.sha256((built_repo / "artifacts/model/model.pt").read_bytes()).hexdigest()
    [parent] = client.search_runs([model_exp.experiment_id], f"tags.`segflow.model_sha256` = '{model_sha}'")
    parent_id = parent.info.run_id
    children = client.search_runs([model_exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert sorted(r.data.tags["segflow.stage"] for r in children) == [
        "evaluate",
        "export",
        "promote",
        "train",
    ]

    commit = run(["git", "rev-parse", "HEAD"], built_repo).stdout.strip()
    data_hash = json.loads((built_repo / "artifacts/ingested/summary.json").read_text())["data_hash"]
    for r in [*children, *data_runs]:
        tags = r.data.tags
        assert tags["segflow.git_commit"] == commit
        assert tags["segflow.git_dirty"] in {"true", "false"}
        assert tags["segflow.data_hash"] == data_hash
        assert tags["segflow.params_hash"] == _params_digest(built_repo)

    # Each stage run lists the splits it read as MLflow datasets (digest: the manifest's hash).
    digests = {
        split: hashlib.sha256((built_repo / f"artifacts/split/{split}.csv").read_bytes()).hexdigest()[:16]
        for split in ("train", "val", "test")
    }
    read = {"train": {"train", "val"}, "evaluate": {"val", "test"}, "export": {"train", "test"}}
    for child in children:
        inputs = client.get_run(child.info.run_id).inputs.dataset_inputs
        assert {d.dataset.name for d in inputs} == read.get(child.data.tags["segflow.stage"], set())
        for d in inputs:
            assert d.dataset.digest == digests[d.dataset.name]
            assert {t.key: t.value for t in d.tags}["mlflow.data.context"] == d.dataset.name

    parent = client.get_run(parent_id)
    assert parent.data.params["train.encoder"] == "resnet18"
    expected = {"test_dice", "test_ap50", "shifted_ap50", "val_dice", "train_loss", "baseline_test_ap50"}
    assert expected <= set(parent.data.metrics)
    assert len(client.get_metric_history(parent_id, "val_dice")) == 2  # one point per epoch
    artifacts = {a.path for a in client.list_artifacts(parent_id)}
    assert {"overlays", "metrics.json", "postprocess.json", "figures", "plots"} <= artifacts


def test_model_is_registered_as_challenger(built_repo: Path):
    client = _client(built_repo)
    version = client.get_model_version_by_alias("segflow-segmenter", "challenger")
    assert str(version.version) == "1"
    onnx_sha = hashlib.sha256((built_repo / "artifacts/export/model.onnx").read_bytes()).hexdigest()
    assert version.tags["segflow.onnx_sha256"] == onnx_sha  # how promote finds it
    assert not (built_repo / "artifacts/export/registration.json").exists()  # nothing store-specific
    assert (
        version.tags["segflow.data_hash"]
        == json.loads((built_repo / "artifacts/ingested/summary.json").read_text())["data_hash"]
    )
    assert float(version.tags["test_dice"]) >= 0.0

    import mlflow.onnx

    uri = f"sqlite:///{built_repo / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)  # both, whatever earlier tests left in mlflow's globals
    mlflow.set_registry_uri(uri)
    try:
        model = mlflow.onnx.load_model("models:/segflow-segmenter@challenger")
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    assert model.graph.input[0].name == "image"


def test_sqlite_store_is_at_the_repository_root(built_repo: Path):
    with sqlite3.connect(built_repo / "mlflow.db") as db:
        experiments = {
            row[0]: row[1] for row in db.execute("select name, artifact_location from experiments")
        }
    assert experiments["segflow"] == (built_repo / "mlartifacts" / "segflow").as_uri()


def test_corrupt_image_fails_ingest_and_says_how_to_restore_the_last_good_outputs(repo_copy: Path):
    # The documented workflow: the last good run is committed (dvc.lock and reports in git).
    run(["git", "add", "-A"], repo_copy)
    run(["git", "commit", "-q", "-m", "a good run"], repo_copy)
    before = {
        p: (repo_copy / p).read_bytes()
        for p in ("artifacts/ingested/manifest.csv", "artifacts/model/model.pt", "reports/validation.json")
    }
    victim = sorted((repo_copy / "data/images").iterdir())[3]
    victim.write_bytes(victim.read_bytes()[:200])  # a truncated PNG
    result = run(["dvc", "repro"], repo_copy, check=False)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert f"images/{victim.name}" in output and "every image is readable" in output
    report = json.loads((repo_copy / "artifacts/ingest.failed.json").read_text())
    assert not report["suites"]["ingest"]["success"]
    # DVC removed ingest's outputs before the run; the message names the line that restores them.
    assert not (repo_copy / "artifacts/ingested").exists()
    restore = _restore(output, "ingest", repo_copy)
    assert restore == "dvc checkout ingest && git checkout -- reports/validation.json", restore
    for path, content in before.items():
        assert (repo_copy / path).read_bytes() == content, f"{path} not restored after a failed ingest"


def test_wrong_size_mask_fails_ingest_naming_the_file(repo_copy: Path):
    from PIL import Image

    victim = sorted((repo_copy / "data/masks").iterdir())[5]
    Image.new("I;16", (32, 48)).save(victim)
    result = run(["dvc", "repro"], repo_copy, check=False)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert f"masks/{victim.name}" in output and "is 32x48 but the image is 64x64" in output
    _restore(output, "ingest", repo_copy)
    assert (repo_copy / "artifacts/ingested/manifest.csv").is_file()


def test_unknown_encoder_fails_before_training(repo_copy: Path):
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    params["train"]["encoder"] = "resnet1"
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params))
    model_before = (repo_copy / "artifacts/model/model.pt").read_bytes()
    result = run(["dvc", "repro"], repo_copy, check=False)
    assert result.returncode != 0
    assert "train.encoder" in result.stderr and "unknown encoder 'resnet1'" in result.stderr
    assert "epoch" not in result.stdout
    _restore(result.stderr, "train", repo_copy)  # DVC removed the model before train ran
    assert (repo_copy / "artifacts/model/model.pt").read_bytes() == model_before


def _restore(output: str, stage: str, repo: Path) -> str:
    """Run the line a failed stage printed to put its last good outputs back; return it."""
    [hint] = [line for line in output.splitlines() if f"DVC removed the previous outputs of {stage}" in line]
    restore = hint.split("back: ", 1)[1]
    assert restore.startswith(f"dvc checkout {stage}"), restore
    run(["bash", "-c", restore], repo)
    return restore


def _experiment_runs(repo: Path, name: str) -> list:
    client = _client(repo)
    experiment = client.get_experiment_by_name("segflow")
    return client.search_runs([experiment.experiment_id], f"tags.`segflow.dvc_experiment` = '{name}'")


def test_dvc_exp_run_temp_logs_to_the_repository_store(repo_copy: Path):
    # --temp runs in a copy under .dvc/tmp/exps; its runs must reach the copy's mlflow.db.
    # Up to train is enough here (the queued experiment below runs every stage the same way).
    run(["dvc", "exp", "run", "--temp", "-n", "temp-exp", "-S", "train.epochs=1", "train"], repo_copy)
    stages = sorted(r.data.tags["segflow.stage"] for r in _experiment_runs(repo_copy, "temp-exp"))
    assert stages == ["model", "train"]


def test_dvc_queue_logs_to_the_repository_store(repo_copy: Path):
    import time

    run(["dvc", "exp", "run", "--queue", "-n", "queued-exp", "-S", "train.epochs=1"], repo_copy)
    run(["dvc", "queue", "start"], repo_copy)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = run(["dvc", "queue", "status"], repo_copy).stdout
        if "queued-exp" in status and not any(s in status for s in ("Queued", "Running")):
            break
        time.sleep(5)  # each `dvc queue status` costs a second of CPU the experiment needs
    assert "Success" in status, status
    stages = sorted(r.data.tags["segflow.stage"] for r in _experiment_runs(repo_copy, "queued-exp"))
    assert stages == ["evaluate", "export", "model", "promote", "train"]


def test_grouped_split_keeps_each_group_in_one_split(repo_copy: Path):
    """split.group_regex through the real stage: the groups (last digit of the file
    number) never straddle splits, and the summary counts them."""
    import json

    import pandas as pd

    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    params["split"]["group_regex"] = r"(\d)\.png$"
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params))
    run(["dvc", "repro", "split"], repo_copy)
    frames = {s: pd.read_csv(repo_copy / f"artifacts/split/{s}.csv") for s in ("train", "val", "test")}
    groups = [set(f["group"].astype(str)) for f in frames.values()]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    assert sum(len(f) for f in frames.values()) == 16
    summary = json.loads((repo_copy / "artifacts/split/summary.json").read_text())
    assert sum(summary["groups"].values()) == 10

    params["split"]["group_regex"] = r"^nomatch_"
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params))
    failed = run(["dvc", "repro", "split"], repo_copy, check=False)
    assert failed.returncode != 0 and "matches no part of 16 file name" in failed.stderr + failed.stdout


def _set(repo: Path, section: str, **values) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))


def test_on_error_skip_drops_and_lists_bad_items(repo_copy: Path):
    from PIL import Image

    images = sorted((repo_copy / "data/images").iterdir())
    images[3].write_bytes(images[3].read_bytes()[:200])  # truncated image
    Image.new("I;16", (32, 48)).save(repo_copy / "data/masks" / images[5].name)  # wrong-size mask
    _set(repo_copy, "ingest", on_error="skip")
    result = run(["dvc", "repro", "split"], repo_copy)
    assert "skipped 2 item(s)" in result.stdout
    report = json.loads((repo_copy / "reports/validation.json").read_text())
    skipped = {item["item"]: item["problem"] for item in report["skipped"]}
    assert set(skipped) == {f"images/{images[3].name}", f"images/{images[5].name}"}
    assert "image unreadable" in skipped[f"images/{images[3].name}"]
    assert "is 32x48 but the image is 64x64" in skipped[f"images/{images[5].name}"]
    summary = json.loads((repo_copy / "artifacts/ingested/summary.json").read_text())
    assert summary["images"] == 14 and summary["skipped"] == 2


def _coco_from_instances(repo: Path, layout: str) -> dict:
    """A COCO file for the copy's sample: one compressed-RLE annotation per object of its
    instance masks (exact, so the round trip can be compared pixel for pixel)."""
    import numpy as np
    from pycocotools import mask as coco_mask

    from segflow.core.images import read_image

    images, annotations = [], {}
    for number, path in enumerate(sorted((repo / "data/instances").glob("*.png")), start=1):
        instances = read_image(path)
        images.append({"id": number, "file_name": path.name, "width": instances.shape[1],
                       "height": instances.shape[0]})  # fmt: skip
        for obj in np.unique(instances)[1:]:
            rle = coco_mask.encode(np.asfortranarray((instances == obj).astype(np.uint8)))
            annotations[str(len(annotations) + 1)] = {
                "image_id": number, "category_id": 1, "iscrowd": 0,
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
            }  # fmt: skip
    coco = {"images": images, "categories": [{"id": 1, "name": "cell"}]}
    coco["annotations"] = annotations if layout == "livecell" else list(annotations.values())
    return coco


def test_coco_source_gives_the_same_canonical_masks(built_repo: Path, repo_copy: Path):
    """The sample as COCO (LIVECell's dict layout) converts to exactly the instance masks
    the folder of instance-id PNGs gives."""
    import numpy as np

    from segflow.core.images import read_image

    shutil.move(repo_copy / "data/masks", repo_copy / "data/instances")
    (repo_copy / "data/annotations.json").write_text(json.dumps(_coco_from_instances(repo_copy, "livecell")))
    _set(repo_copy, "ingest", format="coco", annotations="annotations.json")
    run(["dvc", "repro", "convert"], repo_copy)
    converted = sorted((built_repo / "artifacts/converted/instances").glob("*.png"))
    assert len(converted) == 16
    for path in converted:
        drawn = read_image(repo_copy / "artifacts/converted/instances" / path.name)
        assert np.array_equal(read_image(path), drawn), path.name


def test_malformed_coco_fails_naming_items_or_skips_them(repo_copy: Path):
    shutil.move(repo_copy / "data/masks", repo_copy / "data/instances")
    coco = _coco_from_instances(repo_copy, "list")
    coco["annotations"][0]["image_id"] = 999  # unknown image
    coco["annotations"][1]["segmentation"] = [[1, 1, 4, 4]]  # two points
    coco["images"].append({"id": 500, "file_name": "ghost.png", "width": 64, "height": 64})
    (repo_copy / "data/annotations.json").write_text(json.dumps(coco))
    _set(repo_copy, "ingest", format="coco", annotations="annotations.json")
    failed = run(["dvc", "repro", "ingest"], repo_copy, check=False)
    output = failed.stdout + failed.stderr
    assert failed.returncode != 0
    assert "refers to unknown image id 999" in output
    assert "has a polygon with 2 point(s)" in output and "ghost.png is missing" in output

    _set(repo_copy, "ingest", on_error="skip")
    result = run(["dvc", "repro", "ingest"], repo_copy)
    assert "skipped 3 item(s)" in result.stdout
    skipped = json.loads((repo_copy / "reports/validation.json").read_text())["skipped"]
    assert len(skipped) == 3 and any("ghost.png" in item["problem"] for item in skipped)
