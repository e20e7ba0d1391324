"""Adaptive batching: concurrent requests share model calls, a lone request never waits.

One worker thread owns the model. Each time it is free it takes every image queued so
far (up to `max_batch_size`) and runs them in one call. Under light load a request is
run the moment it arrives (batch of one, no added latency); under heavy load requests
pile up while the model is busy and the next call takes them together, which is where
batching pays. (BentoML's own `batchable=True` batches only requests to an endpoint
whose argument is a list; this keeps single-image endpoints single-image.)
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")

_STOP = object()


class MicroBatcher(Generic[In, Out]):
    """Runs `run_batch(items) -> results` (same length, same order) on coalesced calls."""

    def __init__(
        self,
        run_batch: Callable[[list[In]], Sequence[Out]],
        max_batch_size: int,
        on_batch: Callable[[int], None] | None = None,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self._run_batch = run_batch
        self._max = max_batch_size
        self._on_batch = on_batch
        self._queue: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._loop, name="segflow-batcher", daemon=True)
        self._worker.start()

    def submit(self, items: Sequence[In], timeout: float | None = None) -> list[Out]:
        """Queue the items and block until all are processed; errors are re-raised here."""
        futures: list[Future] = []
        for item in items:
            future: Future = Future()
            self._queue.put((item, future))
            futures.append(future)
        return [future.result(timeout) for future in futures]

    def pending(self) -> int:
        """Items queued and not yet taken by the worker (how far the model is behind)."""
        return self._queue.qsize()

    def close(self) -> None:
        """Stop the worker after the items already queued."""
        self._queue.put(_STOP)
        self._worker.join()

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            while len(batch) < self._max:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    self._queue.put(_STOP)  # finish this batch, then stop
                    break
                batch.append(nxt)
            self._run(batch)

    def _run(self, batch: list[tuple[In, Future]]) -> None:
        live = [(item, future) for item, future in batch if future.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            results = self._run_batch([item for item, _ in live])
            if len(results) != len(live):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(live)} items")
        except BaseException as exc:
            for _, future in live:
                future.set_exception(exc)
            return
        if self._on_batch is not None:
            self._on_batch(len(live))
        for (_, future), result in zip(live, results, strict=True):
            future.set_result(result)
