"""A background thread that runs an iterator a few items ahead of its consumer."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Background(Generic[T]):
    """Iterate ``items`` in a daemon thread, at most ``depth`` items ahead of the consumer.

    Work that releases the GIL (PyArrow parsing, NumPy gathers, file reads, tensor copies) then
    overlaps with the consumer's work. An exception in the thread is raised in the consumer at
    the position it happened; stopping early (``close``, ``break``) stops the thread.
    """

    _DONE = object()

    def __init__(self, items: Iterable[T], depth: int = 2) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(iter(items),), daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, items: Iterator[T]) -> None:
        try:
            for item in items:
                if not self._put((True, item)):
                    return
        except BaseException as exc:  # re-raised in the consumer
            self._put((False, exc))
            return
        self._put((True, self._DONE))

    def __iter__(self) -> Iterator[T]:
        try:
            while True:
                ok, item = self._queue.get()
                if not ok:
                    raise item
                if item is self._DONE:
                    return
                yield item
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join()
