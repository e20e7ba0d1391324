"""Adaptive batching: coalescing under load, no waiting alone, errors to every caller."""

from __future__ import annotations

import threading
import time

import pytest

from segflow.serve.batching import MicroBatcher


def test_lone_request_runs_at_once_as_a_batch_of_one():
    calls = []
    batcher = MicroBatcher(lambda items: calls.append(list(items)) or [i * 2 for i in items], 8)
    assert batcher.submit([21]) == [42]
    assert calls == [[21]]
    batcher.close()


def _wait_for(condition, what: str, timeout: float = 10.0) -> None:
    """Poll `condition` until it holds (no fixed sleeps: as fast as the machine allows)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


def test_requests_queued_while_the_model_is_busy_share_one_call():
    started, release, calls = threading.Event(), threading.Event(), []

    def run(items):
        calls.append(list(items))
        if len(calls) == 1:
            started.set()
            release.wait(10)  # hold the first call so the others pile up
        return [f"r{i}" for i in items]

    batcher = MicroBatcher(run, 4)
    results = {}
    threads = [
        threading.Thread(target=lambda i=i: results.update({i: batcher.submit([i])})) for i in range(6)
    ]
    threads[0].start()
    assert started.wait(10), "the first call never started"
    for t in threads[1:]:
        t.start()
    _wait_for(lambda: batcher.pending() == 5, "five requests queued behind the busy model")
    release.set()
    for t in threads:
        t.join(10)
    assert results == {i: [f"r{i}"] for i in range(6)}
    assert [len(c) for c in calls] == [1, 4, 1]  # capped at max_batch_size
    batcher.close()


def test_errors_reach_every_caller_and_the_worker_survives():
    def run(items):
        if "bad" in items:
            raise ValueError("boom")
        return items

    batcher = MicroBatcher(run, 8)
    with pytest.raises(ValueError, match="boom"):
        batcher.submit(["bad"])
    assert batcher.submit(["ok"]) == ["ok"]
    batcher.close()


def test_wrong_result_count_is_an_error():
    batcher = MicroBatcher(lambda items: [], 2)
    with pytest.raises(RuntimeError, match="0 results for 1"):
        batcher.submit([1])
    batcher.close()


def test_lanes_run_batches_side_by_side_and_a_lone_batch_gets_the_whole_model():
    """Two lanes: the first request, alone, runs with run_batch (all the threads); one that
    arrives while it runs is taken by the other lane at once, with run_shared, so both
    calls are in flight together; the held call then finishes with its own result."""
    first_started, release = threading.Event(), threading.Event()
    in_flight, calls, lock = [], [], threading.Lock()

    def run(kind):
        def call(items):
            with lock:
                calls.append((kind, list(items)))
                in_flight.append(kind)
            if items == [0]:
                first_started.set()
                release.wait(10)  # hold the lone call
            with lock:
                in_flight.remove(kind)
            return [f"{kind}{i}" for i in items]

        return call

    batcher = MicroBatcher(run("whole"), 4, lanes=2, run_shared=run("shared"))
    results = {}
    first = threading.Thread(target=lambda: results.update({0: batcher.submit([0])}))
    first.start()
    assert first_started.wait(10), "the first call never started"
    assert batcher.submit([1]) == ["shared1"]  # answered while the first call is still held
    assert in_flight == ["whole"] and first.is_alive()
    release.set()
    first.join(10)
    assert results == {0: ["whole0"]}
    assert calls == [("whole", [0]), ("shared", [1])]
    assert batcher.submit([2]) == ["whole2"]  # alone again: the whole model
    batcher.close()
    assert batcher.pending() == 0


def test_lanes_must_be_at_least_one():
    with pytest.raises(ValueError, match="lanes must be at least 1"):
        MicroBatcher(lambda items: items, 4, lanes=0)


def test_lanes_for_the_threads_a_worker_has():
    from segflow.serve.batching import lanes_for

    assert [lanes_for(t) for t in (1, 2, 3, 8)] == [1, 2, 2, 2]
