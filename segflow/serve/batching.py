"""Adaptive batching: concurrent requests share model calls, a lone request never waits.

One worker thread owns the model. Each time it is free it takes every image queued so
far (up to `max_batch_size`) and runs them in one call. Under light load a request is
run the moment it arrives (batch of one, no added latency); under heavy load requests
pile up while the model is busy and the next call takes them together, which is where
batching pays. (BentoML's own `batchable=True` batches only requests to an endpoint
whose argument is a list; this keeps single-image endpoints single-image.)

With `lanes` > 1, that many worker threads take batches side by side. A batch that finds
every other lane idle and nothing else queued runs with `run_batch` (a session using all
the cores: a lone request's latency); batches that run beside others use `run_shared` (a
session with a lane's share of the cores). On 2 cores, two one-thread ONNX Runtime calls side
by side ran 43.4 INT8 images/s against 40.4 for one two-thread call at a time at its best
batch (bench/serve.py measures both): a single call's threads wait for each other at every
operator, and for any request thread that took their core.
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


def lanes_for(threads: int) -> int:
    """Lanes for a worker with `threads` ONNX Runtime threads: two when it has two or more
    (each then runs its batches with half of them), else one."""
    return 2 if threads >= 2 else 1


class MicroBatcher(Generic[In, Out]):
    """Runs `run_batch(items) -> results` (same length, same order) on coalesced calls
    (`run_shared` for a batch that runs beside another lane's)."""

    def __init__(
        self,
        run_batch: Callable[[list[In]], Sequence[Out]],
        max_batch_size: int,
        on_batch: Callable[[int], None] | None = None,
        lanes: int = 1,
        run_shared: Callable[[list[In]], Sequence[Out]] | None = None,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if lanes < 1:
            raise ValueError(f"lanes must be at least 1, got {lanes}")
        self._run_batch = run_batch
        self._run_shared = run_shared or run_batch
        self._max = max_batch_size
        self._on_batch = on_batch
        self._queue: queue.Queue = queue.Queue()
        self._busy_lock = threading.Lock()
        self._busy = 0  # lanes running a batch
        self._workers = [
            threading.Thread(target=self._loop, name=f"segflow-batcher-{lane}", daemon=True)
            for lane in range(lanes)
        ]
        for worker in self._workers:
            worker.start()

    def submit(self, items: Sequence[In], timeout: float | None = None) -> list[Out]:
        """Queue the items and block until all are processed; errors are re-raised here."""
        futures: list[Future] = []
        for item in items:
            future: Future = Future()
            self._queue.put((item, future))
            futures.append(future)
        return [future.result(timeout) for future in futures]

    def pending(self) -> int:
        """Items queued and not yet taken by a lane (how far the model is behind)."""
        return self._queue.qsize()

    def close(self) -> None:
        """Stop the workers after the items already queued."""
        self._queue.put(_STOP)  # each lane puts it back for the next one
        for worker in self._workers:
            worker.join()
        self._queue.get_nowait()  # the last lane's

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                self._queue.put(_STOP)  # for the other lanes
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
            with self._busy_lock:
                self._busy += 1
                alone = self._busy == 1 and self._queue.empty()
            try:
                self._run(batch, self._run_batch if alone else self._run_shared)
            finally:
                with self._busy_lock:
                    self._busy -= 1

    def _run(self, batch: list[tuple[In, Future]], run_batch: Callable[[list[In]], Sequence[Out]]) -> None:
        live = [(item, future) for item, future in batch if future.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            results = run_batch([item for item, _ in live])
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
