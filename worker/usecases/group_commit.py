"""Group commit: work items that arrive while a batch is being written share the next
transaction, and each caller waits for its own batch's commit.

With nothing queued an item goes alone at once (no added latency); under load batches
form by themselves, and the commit, the pool checkout and the thread hop are paid once
per batch instead of once per item (the shape of graphile-worker's and River's batched
completions). Used for kod.mobi's callbacks: each is stored durably before its 2xx."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from worker.logging import get_logger

log = get_logger("worker.group_commit")

Item = TypeVar("Item")
Result = TypeVar("Result")

#: At most this many items in one transaction.
MAX_BATCH = 128
#: Threads writing batches; batches lock their rows in a fixed order, so they never
#: deadlock each other.
THREADS = 2

_Pending = tuple[Any, asyncio.Future[Any], asyncio.AbstractEventLoop]


class GroupCommit(Generic[Item, Result]):
    """`await submit(item)` returns `apply([... item ...])`'s result for it once the
    batch is committed. A batch that fails is retried item by item, so one bad item
    fails alone."""

    def __init__(
        self,
        apply: Callable[[list[Item]], list[Result]],
        *,
        max_batch: int = MAX_BATCH,
        threads: int = THREADS,
        name: str = "group-commit",
    ) -> None:
        self._apply = apply
        self._max_batch = max_batch
        self._threads_wanted = threads
        self._name = name
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    async def submit(self, item: Item) -> Result:
        if not self._threads:
            self._start()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        self._queue.put((item, future, loop))
        return await future

    def _start(self) -> None:
        with self._lock:
            while len(self._threads) < self._threads_wanted:
                thread = threading.Thread(
                    target=self._run, name=f"{self._name}-{len(self._threads)}", daemon=True
                )
                thread.start()
                self._threads.append(thread)

    def close(self) -> None:
        """Stop the threads once what is queued is written."""
        with self._lock:
            threads, self._threads = self._threads, []
        for _ in threads:
            self._queue.put(None)
        for thread in threads:
            thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self._max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:  # closing: finish this batch, then stop
                    self._queue.put(None)
                    break
                batch.append(more)
            self._write(batch)

    def _write(self, batch: list[_Pending]) -> None:
        try:
            results = self._apply([item for item, _, _ in batch])
        except Exception as exc:
            if len(batch) == 1:
                _settle(batch[0], error=exc)
                return
            log.warning("group_commit.batch_failed", size=len(batch), error=type(exc).__name__)
            for pending in batch:
                self._write([pending])
            return
        for pending, result in zip(batch, results, strict=True):
            _settle(pending, result=result)


def _settle(pending: _Pending, *, result: Any = None, error: BaseException | None = None) -> None:
    _, future, loop = pending

    def settle() -> None:
        if future.done():  # the request went away (client disconnected)
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    with contextlib.suppress(RuntimeError):  # its event loop has closed
        loop.call_soon_threadsafe(settle)
