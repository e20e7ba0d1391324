"""Adaptive batching: coalescing under load, no waiting alone, errors to every caller."""

from __future__ import annotations

import threading
import time

import pytest

from segflow.batching import MicroBatcher


def test_lone_request_runs_at_once_as_a_batch_of_one():
    calls = []
    batcher = MicroBatcher(lambda items: calls.append(list(items)) or [i * 2 for i in items], 8)
    assert batcher.submit([21]) == [42]
    assert calls == [[21]]
    batcher.close()


def test_requests_queued_while_the_model_is_busy_share_one_call():
    gate, calls = threading.Event(), []

    def run(items):
        calls.append(list(items))
        if len(calls) == 1:
            gate.wait(5)  # hold the first call so the others pile up
        return [f"r{i}" for i in items]

    batcher = MicroBatcher(run, 4)
    results = {}
    threads = [
        threading.Thread(target=lambda i=i: results.update({i: batcher.submit([i])})) for i in range(6)
    ]
    threads[0].start()
    time.sleep(0.1)
    for t in threads[1:]:
        t.start()
    time.sleep(0.2)
    gate.set()
    for t in threads:
        t.join(5)
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
