"""User errors end as one line and exit 1, bugs keep their traceback; the service's settings
are validated on their own with messages naming the file and key."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from segflow.artifacts import run_stage
from segflow.errors import UserError
from segflow.runtime import configure_logging
from segflow.serve import settings
from segflow.serve.settings import (
    ServeParams,
    SettingsError,
    cgroup_cpu_quota,
    load_serve_params,
    onnx_threads,
)


def test_a_user_error_is_one_line_and_exit_1(capsys):
    def main():
        raise UserError("params.yaml: train.epochs must be at least 1; set it to 20")

    with pytest.raises(SystemExit) as stop:
        run_stage(main)
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert err == "error: params.yaml: train.epochs must be at least 1; set it to 20\n"


def test_a_bug_keeps_its_traceback():
    def main():
        raise KeyError("a bug, not bad input")

    with pytest.raises(KeyError):
        run_stage(main)


def test_serve_settings_come_from_the_serve_section_alone(tmp_path: Path):
    params = tmp_path / "params.yaml"
    # Training sections the Bento cannot validate (no smp there) are simply not read.
    params.write_text("train: {encoder: not-an-encoder}\nserve: {max_batch_images: 3}\n")
    settings = load_serve_params(params)
    assert settings.max_batch_images == 3
    assert settings.max_pixels == ServeParams().max_pixels


@pytest.mark.parametrize(
    ("workers", "threads", "cores", "expected"),
    [(1, 0, 8, 8), (2, 0, 8, 4), (3, 0, 8, 2), (4, 0, 2, 1), (2, 3, 8, 3)],
)
def test_workers_share_the_cores_unless_threads_are_set(workers, threads, cores, expected):
    params = ServeParams(workers=workers, threads=threads)
    assert onnx_threads(params, cores) == expected


@pytest.mark.parametrize(
    ("v2", "v1", "expected"),
    [
        ("200000 100000\n", None, 2.0),  # a pod limited to 2 CPUs
        ("max 100000\n", None, 0.0),  # no limit
        (None, ("150000", "100000"), 1.5),  # cgroup v1
        (None, ("-1", "100000"), 0.0),
        (None, None, 0.0),  # not in a container
    ],
)
def test_a_containers_cpu_quota_is_read_from_either_cgroup_version(tmp_path, v2, v1, expected):
    v2_file, quota, period = tmp_path / "cpu.max", tmp_path / "quota", tmp_path / "period"
    if v2:
        v2_file.write_text(v2)
    if v1:
        quota.write_text(v1[0])
        period.write_text(v1[1])
    assert cgroup_cpu_quota(v2_file, (quota, period)) == expected


def test_threads_follow_the_quota_not_the_nodes_cores(monkeypatch):
    # A pod limited to 2 CPUs on a 64-core node: its CPU set still lists all 64.
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setattr(settings, "cgroup_cpu_quota", lambda: 2.0)
    assert settings.available_cores() == 2
    assert onnx_threads(ServeParams(workers=2)) == 1
    monkeypatch.setattr(settings, "cgroup_cpu_quota", lambda: 0.0)  # no quota: the CPU set
    assert onnx_threads(ServeParams(workers=2)) == 32


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (
            "serve: {max_batch_imges: 3}\n",
            "serve.max_batch_imges: unknown key; allowed keys here: max_upload",
        ),
        ("serve: {max_batch_images: 0}\n", "serve.max_batch_images"),
        ("serve: {workers: 0}\n", "serve.workers: Input should be greater than or equal to 1"),
        ("serve: [1, 2]\n", "`serve` must be a mapping"),
        ("- a list\n", "expected a YAML mapping"),
        ("serve: {\n", "not valid YAML"),
    ],
)
def test_bad_serve_settings_name_the_file_and_key(tmp_path: Path, text: str, words: str):
    params = tmp_path / "params.yaml"
    params.write_text(text)
    with pytest.raises(SettingsError) as caught:
        load_serve_params(params)
    assert str(params) in str(caught.value) and words in str(caught.value)
    assert isinstance(caught.value, UserError)


def test_missing_settings_file_says_how_to_point_at_one(tmp_path: Path):
    with pytest.raises(SettingsError, match="SEGFLOW_PARAMS"):
        load_serve_params(tmp_path / "absent.yaml")


def test_an_unknown_log_level_falls_back_to_info(monkeypatch):
    monkeypatch.setenv("SEGFLOW_LOG_LEVEL", "verbose")
    configure_logging()
    assert logging.getLogger("segflow").level == logging.INFO
    monkeypatch.setenv("SEGFLOW_LOG_LEVEL", "debug")
    configure_logging()
    assert logging.getLogger("segflow").level == logging.DEBUG
    handlers = [h for h in logging.getLogger("segflow").handlers if getattr(h, "_segflow", False)]
    assert len(handlers) == 1  # configuring twice adds no second handler
    logging.getLogger("segflow").setLevel(logging.INFO)


def test_a_checkout_serves_the_model_its_own_promotion_imported(tmp_path: Path):
    from segflow.serve.settings import champion_model_tag

    assert champion_model_tag(tmp_path) == "segflow-segmenter:latest"  # never promoted here
    record = tmp_path / "logs" / "release.json"
    record.parent.mkdir()
    record.write_text('{"serving": {"model_tag": "segflow-segmenter:abc123"}}')
    assert champion_model_tag(tmp_path) == "segflow-segmenter:abc123"
    record.write_text('{"serving": null}')  # refused before any champion existed
    assert champion_model_tag(tmp_path) == "segflow-segmenter:latest"


def test_serving_a_checkout_with_no_model_in_the_store_says_how_to_get_one(tmp_path: Path):
    """`bentoml serve service:svc` before any promotion here (an empty BentoML store): one line
    naming the model and the command that imports it, not BentoML's "no cloud context"."""
    import subprocess
    import sys

    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "store"), "BENTOML_DO_NOT_TRACK": "True"}
    env.pop("SEGFLOW_MODEL_TAG", None)
    root = Path(__file__).resolve().parents[2]
    command = [sys.executable, "-c", "import service"]
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "no model 'segflow-segmenter:" in result.stderr, result.stderr
    assert "run `dvc repro`" in result.stderr, result.stderr
