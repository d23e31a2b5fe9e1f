"""Dynamic batching: the encoded rows of concurrent requests scored in one forward pass.

Requests are encoded on the event loop and queued here; ``workers`` threads run the forward
passes (ONNX Runtime and torch release the GIL while they compute). A worker that becomes free
takes every queued request for the same model, up to ``max_rows`` rows (always at least one
request), concatenates their rows, scores them in one pass and hands each request its slice.

While forward passes take under ``inline_below`` of the recent time (their share of the last
second or so, decayed), and none is queued or running, a request's pass runs at once on the
event loop's own thread: at a low rate two thread hand-offs (a wake-up each way) and the move of
the rows to another core cost about a fifth of a 100-row pass. Past that share the loop must
keep reading requests while passes run, so the workers take them (and merge them).

``window`` (seconds) is how long a worker waits, after the oldest queued request arrived, for
more requests to fill a pass. The default 0 never waits: requests that arrive while every
worker is busy are merged, a lone request is scored at once. A positive window trades that much
latency for fewer, larger passes (worth it only when the per-pass cost matters: small requests
at a high rate).
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from deepfm.serve.predictor import Predictor

#: time constant (seconds) of the forward passes' recent share of time
LOAD_SECONDS = 1.0
#: the share of time in forward passes below which the server runs them on the event loop
INLINE_BELOW = 0.5


@dataclass
class _Job:
    predictor: Predictor
    ids: np.ndarray
    values: np.ndarray | None
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    arrived: float = field(default_factory=time.monotonic)


def _resolve(future: asyncio.Future, result: np.ndarray | None, error: BaseException | None):
    if future.done():  # the request was cancelled (its client left)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class ForwardBatcher:
    """``await batcher.score(predictor, ids, values)`` → click probabilities ``[rows]``
    (float64, unchecked), scored with the rows of other requests waiting at the same time."""

    def __init__(
        self,
        workers: int,
        window: float = 0.0,
        max_rows: int = 4096,
        on_pass: Callable[[int, int], None] | None = None,
        inline_below: float = 0.0,
    ) -> None:
        assert workers >= 1 and window >= 0 and max_rows >= 1 and 0 <= inline_below <= 1
        self.window = window
        self.inline_below = inline_below
        self._busy = 0.0  # seconds of forward passes, decayed over LOAD_SECONDS
        self._since = time.monotonic()
        self._running = 0  # passes in worker threads
        self.max_rows = max_rows
        self.on_pass = on_pass  # (requests, rows) of each pass, for metrics
        self._queue: deque[_Job] = deque()
        self._ready = threading.Condition()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, name=f"deepfm-forward-{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    async def score(
        self, predictor: Predictor, ids: np.ndarray, values: np.ndarray | None
    ) -> np.ndarray:
        idle = not self._queue and not self._running
        if self.inline_below and idle and self.load() < self.inline_below:
            began = time.perf_counter()
            ctr = predictor.forward(ids, values)  # a failure is the request's, as in a worker
            self._count(time.perf_counter() - began, 1, len(ids))
            return ctr
        loop = asyncio.get_running_loop()
        job = _Job(predictor, ids, values, loop.create_future(), loop)
        with self._ready:
            if self._closed:
                raise RuntimeError("the forward batcher is closed")
            self._queue.append(job)
            self._ready.notify()
        return await job.future

    def load(self) -> float:
        """The share of recent time spent in forward passes (0-1 for one pass at a time)."""
        return self._busy * math.exp((self._since - time.monotonic()) / LOAD_SECONDS) / LOAD_SECONDS

    def _count(self, seconds: float, requests: int, rows: int) -> None:
        # updated by the loop and the workers without a lock: a lost update only blurs the share
        now = time.monotonic()
        self._busy = self._busy * math.exp((self._since - now) / LOAD_SECONDS) + seconds
        self._since = now
        if self.on_pass is not None:
            self.on_pass(requests, rows)

    def close(self) -> None:
        """Stop the workers once the queue is empty."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()
        for thread in self._threads:
            thread.join(timeout=10)

    def _take(self) -> list[_Job] | None:
        """The next pass: the oldest job and those behind it for the same model, up to
        ``max_rows``; None once closed and drained."""
        with self._ready:
            while not self._queue:
                if self._closed:
                    return None
                self._ready.wait()
            if self.window > 0:
                deadline = self._queue[0].arrived + self.window
                while not self._closed:
                    rows = sum(len(job.ids) for job in self._queue)
                    left = deadline - time.monotonic()
                    if rows >= self.max_rows or left <= 0:
                        break
                    self._ready.wait(left)
            first = self._queue.popleft()
            jobs, rows = [first], len(first.ids)
            while self._queue:
                job = self._queue[0]
                if job.predictor is not first.predictor or rows + len(job.ids) > self.max_rows:
                    break
                jobs.append(self._queue.popleft())
                rows += len(job.ids)
            if self._queue:
                self._ready.notify()  # another worker can start on the rest
            self._running += 1
            return jobs

    def _work(self) -> None:
        while (jobs := self._take()) is not None:
            began = time.perf_counter()
            try:
                if len(jobs) == 1:
                    ctr = jobs[0].predictor.forward(jobs[0].ids, jobs[0].values)
                else:
                    ids = np.concatenate([job.ids for job in jobs])
                    values = (
                        None
                        if jobs[0].values is None
                        else np.concatenate([job.values for job in jobs])  # type: ignore[misc]
                    )
                    ctr = jobs[0].predictor.forward(ids, values)
            except BaseException as exc:  # handed to each request, which answers for it
                for job in jobs:
                    job.loop.call_soon_threadsafe(_resolve, job.future, None, exc)
                continue
            finally:
                with self._ready:
                    self._running -= 1
            self._count(time.perf_counter() - began, len(jobs), len(ctr))
            start = 0
            for job in jobs:
                end = start + len(job.ids)
                job.loop.call_soon_threadsafe(_resolve, job.future, ctr[start:end], None)
                start = end
