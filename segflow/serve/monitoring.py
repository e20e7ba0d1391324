"""What the service saw: a persistent request log, traffic summaries and input drift.

The request log is a local SQLite file (one row per request, one observation per image).
Writes go through a background thread so no request waits on the disk. Drift compares
recent images with the training images' profile saved at export (reference.json): the
population stability index (PSI) of mean intensity and of predicted foreground fraction.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

REFERENCE_FILE = "reference.json"
REFERENCE_VERSION = 1
DRIFT_FEATURES = ("intensity_mean", "foreground_fraction")
# Conventional PSI bands: below 0.1 stable, 0.1-0.25 moderate shift, above 0.25 drift.
PSI_MODERATE, PSI_DRIFT = 0.1, 0.25
_MAX_REFERENCE_VALUES = 2000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY, time REAL NOT NULL, client TEXT, endpoint TEXT NOT NULL,
    status INTEGER NOT NULL, latency_ms REAL NOT NULL, images INTEGER, height INTEGER,
    width INTEGER, object_count INTEGER, model_version TEXT, error TEXT
);
CREATE INDEX IF NOT EXISTS requests_time ON requests (time);
CREATE TABLE IF NOT EXISTS observations (
    request_id TEXT NOT NULL, time REAL NOT NULL, intensity_mean REAL, foreground_fraction REAL
);
CREATE INDEX IF NOT EXISTS observations_time ON observations (time);
"""
REQUEST_COLUMNS = (
    "id", "time", "client", "endpoint", "status", "latency_ms", "images", "height", "width",
    "object_count", "model_version", "error",
)  # fmt: skip


def intensity_mean(image: np.ndarray) -> float:
    """Mean intensity on the dtype's [0, 1] scale (uint8 /255, uint16 /65535, float as is)."""
    if image.dtype == np.uint8:
        return float(image.mean() / 255.0)
    if image.dtype == np.uint16:
        return float(image.mean() / 65535.0)
    return float(image.mean())


def reference_profile(images: Sequence[np.ndarray], foreground_fractions: Sequence[float]) -> dict:
    """The training distribution the drift signal compares against (saved at export)."""
    values = {
        "intensity_mean": [intensity_mean(img) for img in images],
        "foreground_fraction": [float(f) for f in foreground_fractions],
    }
    profile: dict = {"version": REFERENCE_VERSION, "images": len(images)}
    for name, vals in values.items():
        arr = np.asarray(vals, dtype=np.float64)
        step = max(1, len(arr) // _MAX_REFERENCE_VALUES)
        profile[name] = {
            "mean": round(float(arr.mean()), 6),
            "std": round(float(arr.std()), 6),
            "values": [round(v, 6) for v in np.sort(arr)[::step].tolist()],
        }
    return profile


def profile_model(segmenter, images: Sequence[np.ndarray]) -> dict:
    """reference_profile of `images` with the foreground fractions `segmenter` predicts on them."""
    fractions = [np.count_nonzero(p.mask) / p.mask.size for p in segmenter.predict(images)]
    return reference_profile(images, fractions)


def psi(reference: Sequence[float], recent: Sequence[float], bins: int = 10) -> float:
    """Population stability index of `recent` against `reference`.

    Bins are the reference's quantiles (duplicates merged, so a reference with many equal
    values still works); empty bins get a small floor so the index stays finite.
    """
    ref = np.asarray(reference, dtype=np.float64)
    new = np.asarray(recent, dtype=np.float64)
    edges = np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1)[1:-1]))
    expected = np.bincount(np.searchsorted(edges, ref, side="right"), minlength=len(edges) + 1) / len(ref)
    actual = np.bincount(np.searchsorted(edges, new, side="right"), minlength=len(edges) + 1) / len(new)
    expected, actual = np.maximum(expected, 1e-4), np.maximum(actual, 1e-4)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def drift_report(reference: dict | None, recent: dict[str, list[float]], min_images: int) -> dict:
    """Per-feature PSI and an overall status: ok | moderate | drift | insufficient_data | unavailable."""
    if reference is None:
        return {"status": "unavailable", "reason": "the model was exported without reference.json"}
    count = len(recent.get("intensity_mean", []))
    if count < min_images:
        return {
            "status": "insufficient_data",
            "reason": f"{count} recent images; the drift signal needs at least {min_images}",
            "images": count,
        }
    features = {}
    for name in DRIFT_FEATURES:
        index = psi(reference[name]["values"], recent[name])
        features[name] = {
            "psi": round(index, 4),
            "status": _band(index),
            "reference_mean": reference[name]["mean"],
            "recent_mean": round(float(np.mean(recent[name])), 6),
        }
    worst = max((f["psi"] for f in features.values()), default=0.0)
    return {"status": _band(worst), "images": count, "features": features}


def _band(index: float) -> str:
    return "drift" if index > PSI_DRIFT else "moderate" if index > PSI_MODERATE else "ok"


def load_reference(folder: Path) -> dict | None:
    path = Path(folder) / REFERENCE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


GROUP_COMMIT_S = 0.1  # a row reaches the disk at most this long after its request (flush() waits)
GROUP_COMMIT_ROWS = 500


class RequestLog:
    """Append-only SQLite log of requests and per-image observations."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")  # readers (GET /stats) never block the writer
            db.executescript(_SCHEMA)
        self._queue: queue.Queue = queue.Queue()
        self._writer = threading.Thread(target=self._write_loop, name="segflow-request-log", daemon=True)
        self._writer.start()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=10)
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    def record(self, request: dict, observations: Sequence[tuple[float, float]] = ()) -> None:
        """Queue one request row (keys from REQUEST_COLUMNS) and its images' (intensity, fg)."""
        self._queue.put((request, list(observations)))

    def flush(self) -> None:
        """Block until everything recorded so far is on disk."""
        self._queue.join()

    def _write_loop(self) -> None:
        db = self._connect()
        while True:
            batch = self._next_batch()
            try:
                for request, observations in batch:
                    row = tuple(request.get(column) for column in REQUEST_COLUMNS)
                    db.execute(f"INSERT OR REPLACE INTO requests VALUES ({','.join('?' * len(row))})", row)
                    db.executemany(
                        "INSERT INTO observations VALUES (?, ?, ?, ?)",
                        [(request["id"], request["time"], i, f) for i, f in observations],
                    )
                db.commit()
            except sqlite3.Error as exc:  # a full disk must not take the service down
                log.warning("request log write failed: %s (%d rows lost)", exc, len(batch))
                with contextlib.suppress(sqlite3.Error):
                    db.rollback()  # an open transaction would hold the lock the other workers need
            finally:
                for _ in batch:
                    self._queue.task_done()

    def _next_batch(self) -> list[tuple]:
        """The next rows to write: the first to arrive, and whatever follows it within
        GROUP_COMMIT_S (up to GROUP_COMMIT_ROWS). One commit per request cost as much CPU as
        answering it; a group commit costs the same for many."""
        batch = [self._queue.get()]
        deadline = time.monotonic() + GROUP_COMMIT_S
        while len(batch) < GROUP_COMMIT_ROWS:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(self._queue.get(timeout=remaining))
            except queue.Empty:
                break
        return batch

    def summary(self, window: int, reference: dict | None, min_images: int) -> dict:
        """Counts, latency percentiles and errors over the last `window` requests, plus drift."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT endpoint, status, latency_ms, images, time FROM requests ORDER BY time DESC LIMIT ?",
                (window,),
            ).fetchall()
            obs = db.execute(
                "SELECT intensity_mean, foreground_fraction FROM observations ORDER BY time DESC LIMIT ?",
                (window,),
            ).fetchall()
        by_endpoint: dict[str, int] = {}
        by_status: dict[str, int] = {}
        for endpoint, status, *_ in rows:
            by_endpoint[endpoint] = by_endpoint.get(endpoint, 0) + 1
            by_status[str(status)] = by_status.get(str(status), 0) + 1
        ok_latency = [r[2] for r in rows if r[1] < 400]
        errors = sum(1 for r in rows if r[1] >= 400)
        recent = {"intensity_mean": [o[0] for o in obs], "foreground_fraction": [o[1] for o in obs]}
        return {
            "window": {
                "requests": len(rows),
                "limit": window,
                "since": _iso(min((r[4] for r in rows), default=None)),
                "until": _iso(max((r[4] for r in rows), default=None)),
            },
            "requests": {"by_endpoint": by_endpoint, "by_status": by_status},
            "images": int(sum(r[3] or 0 for r in rows if r[1] < 400)),
            "errors": {"count": errors, "rate": round(errors / len(rows), 4) if rows else 0.0},
            "latency_ms": _percentiles(ok_latency),
            "drift": drift_report(reference, recent, min_images),
        }


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    p50, p90, p99 = np.percentile(values, (50, 90, 99))
    return {
        "p50": round(p50, 2),
        "p90": round(p90, 2),
        "p99": round(p99, 2),
        "mean": round(np.mean(values), 2),
    }


def _iso(timestamp: float | None) -> str | None:
    return None if timestamp is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))
