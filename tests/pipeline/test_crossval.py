"""Cross-validation and size normalisation through the real `dvc repro` on the tiny copy.

The tiny models are far too weak for their scores to mean anything; what is checked is the
bookkeeping (every image held out once, per-fold and mean ± spread per scale, DVC metrics,
MLflow) and that a size-normalised, distance-seeded model goes through export's ONNX parity
check and `segflow predict` with its size settings.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import run

pytestmark = pytest.mark.slow


def _set(repo: Path, changes: dict) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for dotted, value in changes.items():
        *parents, key = dotted.split(".")
        section = params
        for name in parents:
            section = section[name]
        section[key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params))


def test_crossval_is_off_by_default_and_says_so(built_repo: Path):
    assert json.loads((built_repo / "reports/crossval/summary.json").read_text()) == {"folds": 0}
    assert "crossval: off" in (built_repo / "first_repro.log").read_text()


def test_crossval_holds_every_image_out_once_and_reports_the_spread(repo_copy: Path):
    _set(repo_copy, {"crossval.folds": 3, "crossval.scales": [1.0, 0.5], "train.epochs": 1,
                     "crossval.subsets": {"two": ["cells_0000", "cells_0001"]},
                     "train.diameter": 12, "inference.instances": "distance",
                     # The size head doubles the size passes, flips triple the model's; the next
                     # test and test_sizehead.py cover them.
                     "train.size_head": False, "inference.tta_grid": ["none"]})  # fmt: skip
    out = run(["dvc", "repro", "crossval"], repo_copy).stdout
    assert "Running stage 'train'" not in out  # the pipeline's own model is not retrained
    assert "at each image's true object diameter: ap50" in out  # printed beside the estimated scores
    summary = json.loads((repo_copy / "reports/crossval/summary.json").read_text())
    assert summary["folds"] == 3 and summary["images"] == 16
    for key in ("scale_1", "scale_0.5"):
        block = summary[key]
        assert [row["fold"] for row in block["per_fold"]] == [0, 1, 2]
        assert sum(row["images"] for row in block["per_fold"]) == 16
        for metric in ("ap50", "ap", "ap75", "dice", "count_error"):
            stats = block[metric]
            assert stats["min"] <= stats["mean"] <= stats["max"] and stats["std"] >= 0
        assert block["pooled"]["images"] == 16 and block["subset_two"]["images"] == 2
        # Sizes are estimated (train.diameter, inference.diameter auto): the same folds again at
        # each image's true object size say what the estimate costs.
        assert 0 <= block["known_diameter"]["ap50"]["mean"] <= 1
    assert [row["tta"] for row in summary["chosen"]] == ["none"] * 3  # each fold's tuned settings
    for scale, key in ((1, "scale_1"), (0.5, "scale_0.5")):  # each fold's line as it lands
        for row in summary[key]["per_fold"]:
            line = re.search(rf"fold {row['fold']} held-out, scale {scale:g}: ap50 ([\d.]+)", out)
            assert line and abs(float(line[1]) - row["ap50"]) <= 5e-4
    images = (repo_copy / "reports/crossval/images.csv").read_text().splitlines()
    assert len(images) == 1 + 16 * 2  # every image once per scale
    per_image = pd.read_csv(repo_copy / "reports/crossval/images.csv")
    # The size each image was segmented at beside its true size: shrinking an image halves both.
    assert (per_image["diameter_true"] > 0).all() and (per_image["diameter_used"] > 0).all()
    assert per_image["known_diameter_ap50"].between(0, 1).all()
    by_scale = per_image.pivot_table(index="image", columns="scale", values="diameter_true")
    assert ((by_scale[0.5] / by_scale[1.0]).between(0.4, 0.6)).all()
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], repo_copy).stdout)
    assert "reports/crossval/summary.json" in json.dumps(shown)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo_copy / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("segflow-crossval")
    [cv_run] = client.search_runs([experiment.experiment_id])
    assert cv_run.data.metrics["cv_scale_1_ap50_mean"] == summary["scale_1"]["ap50"]["mean"]
    known = summary["scale_1"]["known_diameter"]["ap50"]["mean"]
    assert cv_run.data.metrics["cv_scale_1_known_diameter_ap50_mean"] == known
    assert cv_run.data.tags["segflow.stage"] == "crossval"
    history = client.get_metric_history(cv_run.info.run_id, "fold_scale_1_ap50")
    assert [m.step for m in history] == [0, 1, 2]

    # A change that reaches neither training nor any fold's scores reruns the stage, which
    # takes every fold's result as the first run kept it: nothing trains, tunes or scores again.
    _set(repo_copy, {"crossval.subsets": {"two": ["cells_0000", "cells_0001"], "one": ["cells_0002"]}})
    again = run(["dvc", "repro", "crossval"], repo_copy)
    log = again.stdout + again.stderr
    assert "Running stage 'crossval'" in again.stdout
    assert len(re.findall(r"held-out, scale 1: ap50 [\d.]+.*kept from an earlier run", log)) == 3
    assert not re.search(r"fold \d \(seed \d+\): \d+ training", log)  # no fold started
    assert "resuming after" not in log and "training in" not in log  # no model loaded
    rerun = json.loads((repo_copy / "reports/crossval/summary.json").read_text())
    assert rerun["scale_1"]["per_fold"] == summary["scale_1"]["per_fold"]
    assert rerun["scale_1"]["subset_one"]["images"] == 1

    # Repeated cross-validation: a second partition seed beside base.seed. The first
    # partition's folds come from their states again; only the new partition's models train.
    seed = yaml.safe_load((repo_copy / "params.yaml").read_text())["base"]["seed"]
    _set(repo_copy, {"crossval.seeds": [seed, seed + 1]})
    repeated = run(["dvc", "repro", "crossval"], repo_copy)
    log = repeated.stdout + repeated.stderr
    assert len(re.findall(r"held-out, scale 1: .*kept from an earlier run", log)) == 3
    assert len(re.findall(r"epoch +1/1 +train_loss", log)) == 3
    both = json.loads((repo_copy / "reports/crossval/summary.json").read_text())
    block = both["scale_1"]
    assert both["seeds"] == [seed, seed + 1] and both["folds"] == 3 and both["images"] == 16
    assert [row for row in block["per_fold"] if row["seed"] == seed] == summary["scale_1"]["per_fold"]
    assert [row["seed"] for row in block["per_seed"]] == [seed, seed + 1]
    assert block["per_seed"][0]["ap50"] == pytest.approx(summary["scale_1"]["ap50"]["mean"], abs=1e-6)
    assert block["pooled"]["images"] == 32  # every image once per partition
    assert f"seed {seed + 1}'s folds: ap50" in repeated.stdout
    per_image = pd.read_csv(repo_copy / "reports/crossval/images.csv")
    assert per_image.groupby(["seed", "scale"])["image"].nunique().eq(16).all()  # each held out once per seed
    # The second partition deals other folds (the tiny copy has enough groups to differ).
    folds = per_image[per_image["scale"] == 1].pivot_table(index="image", columns="seed", values="fold")
    assert not folds[seed].equals(folds[seed + 1])

    # A change that reaches the folds' tuning but not their training: every fold's model comes
    # from its resume state and is tuned and scored again; nothing trains. (One partition: the
    # second would only double the test's time.)
    _set(repo_copy, {"inference.min_area_grid": [0, 8], "crossval.seeds": [seed]})
    retuned = run(["dvc", "repro", "crossval"], repo_copy)
    log = retuned.stdout + retuned.stderr
    assert "kept from an earlier run" not in log and "scored with different params" in log
    assert len(re.findall(r"resuming after the last epoch 1/1", log)) == 3
    assert not re.search(r"epoch +1/1 +train_loss", log)


def test_a_size_normalised_distance_model_exports_and_predicts(repo_copy: Path):
    _set(repo_copy, {"train.diameter": 12, "train.augment.scale": 0.2, "inference.instances": "distance",
                     "inference.tta_grid": ["none", "flips"], "inference.learned_score": True})  # fmt: skip
    log = run(["dvc", "repro", "export"], repo_copy)
    assert "model time per val image by tta: none" in log.stdout
    prep = json.loads((repo_copy / "artifacts/export/preprocessing.json").read_text())
    assert prep["instances"] == "distance" and prep["train_diameter"] == 12
    # The tiny model matches too few val objects to fit an object score: it says so and keeps
    # the rule (tests/unit/test_object_score.py fits one and follows it to preprocessing.json).
    assert "so the distance rule stays" in log.stdout + log.stderr and prep["object_score"] is None
    assert prep["data_diameter"] > 0 and prep["diameter"] == "auto" and prep["tta"] in ("none", "flips")
    assert json.loads((repo_copy / "artifacts/export/parity.json").read_text())["max_abs_diff"] <= 1e-4
    # Its size head, and how far it strays on images it was not fitted on, beside the model's row.
    assert prep["size_output"] == "log_size"
    error = json.loads((repo_copy / "artifacts/model/summary.json").read_text())["size_head_error"]
    assert 0 < error < 5
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo_copy / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("segflow")
    newest = client.search_runs(
        [experiment.experiment_id], "tags.`segflow.stage` = 'model'", order_by=["start_time DESC"]
    )[0]  # this repro's model run (the built copy's own first model came before it, without a head)
    assert newest.data.metrics["size_head_error"] == error
    image = sorted((repo_copy / "data/images").iterdir())[0]
    for extra in ([], ["--diameter", "9"]):
        out = run(
            ["segflow", "predict", str(image), "--model", "artifacts/export", "--out", "p", *extra], repo_copy
        )
        assert "objects" in out.stdout
    refused = run(["segflow", "predict", str(image), "--diameter", "-2"], repo_copy, check=False)
    assert refused.returncode == 2 and "positive number of pixels" in refused.stderr
