"""Request log summaries and the drift signal."""

from __future__ import annotations

import time

import numpy as np

from segflow.serve.monitoring import RequestLog, drift_report, psi, reference_profile


def test_psi_is_small_for_the_same_distribution_and_large_for_a_shift():
    rng = np.random.default_rng(0)
    reference = rng.normal(0.5, 0.05, 500)
    assert psi(reference, rng.normal(0.5, 0.05, 200)) < 0.1
    assert psi(reference, rng.normal(0.8, 0.05, 200)) > 0.25
    assert psi(np.zeros(50), np.zeros(40)) < 1e-6  # constant reference: no crash, no drift


def test_drift_report_statuses():
    rng = np.random.default_rng(1)
    images = [rng.integers(100, 140, (8, 8), dtype=np.uint8) for _ in range(60)]
    reference = reference_profile(images, [0.2] * 60)
    assert drift_report(None, {}, 10)["status"] == "unavailable"
    few = {"intensity_mean": [0.5] * 3, "foreground_fraction": [0.2] * 3}
    assert drift_report(reference, few, 10)["status"] == "insufficient_data"
    values = reference["intensity_mean"]["values"]  # the reference itself: no shift
    same = {"intensity_mean": values, "foreground_fraction": [0.2] * len(values)}
    assert drift_report(reference, same, 10)["status"] == "ok"
    dark = {"intensity_mean": [0.01] * 40, "foreground_fraction": [0.2] * 40}
    report = drift_report(reference, dark, 10)
    assert report["status"] == "drift" and report["features"]["intensity_mean"]["status"] == "drift"


def test_request_log_summary(tmp_path):
    log = RequestLog(tmp_path / "logs" / "requests.db")
    now = time.time()
    for i, (status, latency) in enumerate([(200, 10.0), (200, 20.0), (200, 30.0), (415, 1.0)]):
        row = {
            "id": f"r{i}",
            "time": now + i,
            "endpoint": "/segment",
            "status": status,
            "latency_ms": latency,
        }
        log.record({**row, "images": 1 if status == 200 else None}, [(0.5, 0.1)] if status == 200 else [])
    log.flush()
    summary = log.summary(window=100, reference=None, min_images=2)
    assert summary["window"]["requests"] == 4
    assert summary["requests"]["by_status"] == {"200": 3, "415": 1}
    assert summary["errors"] == {"count": 1, "rate": 0.25}
    assert summary["latency_ms"]["p50"] == 20.0 and summary["images"] == 3
    assert summary["drift"]["status"] == "unavailable"
    assert log.summary(window=2, reference=None, min_images=2)["window"]["requests"] == 2
