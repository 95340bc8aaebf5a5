"""Micro-batching: concurrent requests share one featurize + search.

In: items submitted from many coroutines, each with a size (its number of queries).
Out: each submitter's own result, computed by ``run(items) -> results`` (same order)
on one worker thread, for up to ``max_items`` queries at a time.

A batch starts with the oldest waiting item and takes the items behind it while their
sizes fit in ``max_items``; if that is less than full it waits until ``max_wait``
seconds after the oldest item arrived for more. Items that arrive while a batch runs
wait for the next one, so under load batches fill up by themselves. When a batch of
several items fails, each item is run alone, so one bad request cannot fail the
others. :meth:`MicroBatcher.stats` counts batches, items and queries.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

logger = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass
class _Waiting(Generic[Item]):
    item: Item
    size: int
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


class MicroBatcher(Generic[Item, Result]):
    """Runs ``run(items) -> results`` on batches of concurrently submitted items (one batch at a time)."""

    def __init__(self, run: Callable[[list[Item]], Sequence[Result]], max_items: int, max_wait: float):
        self.run = run
        self.max_items = max_items
        self.max_wait = max_wait
        self._waiting: deque[_Waiting[Item]] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._running: list[_Waiting[Item]] = []
        self._stats = {"batches": 0, "items": 0, "queries": 0, "largest_batch_items": 0,
                       "largest_batch_queries": 0, "combined_batches": 0}

    async def start(self) -> None:
        """Start the batching loop on the running event loop."""
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gradindex-batch")
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Stop the loop; waiting submitters get a ``RuntimeError``."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for waiting in [*self._running, *self._waiting]:
            if not waiting.future.done():
                waiting.future.set_exception(RuntimeError("the server is shutting down"))
        self._waiting.clear()
        self._running = []
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def submit(self, item: Item, size: int) -> Result:
        """Queue ``item`` (``size`` queries) and wait for its result (or its exception)."""
        if self._task is None:
            raise RuntimeError("MicroBatcher.submit before start()")
        waiting = _Waiting(item, size, asyncio.get_running_loop().create_future())
        self._waiting.append(waiting)
        self._wakeup.set()
        return await waiting.future

    def stats(self) -> dict[str, int]:
        """Counters: batches run, items and queries answered, the largest batch, batches of 2+ items."""
        return dict(self._stats)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._waiting:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            deadline = self._waiting[0].arrived + self.max_wait
            while True:
                fitting = self._fitting()
                full = fitting < len(self._waiting) or self._size(fitting) >= self.max_items
                remaining = deadline - time.monotonic()
                if full or remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch = [self._waiting.popleft() for _ in range(self._fitting())]
            batch = [w for w in batch if not w.future.done()]  # submitters that gave up (client gone)
            if not batch:
                continue
            self._running = batch
            outcomes = await loop.run_in_executor(self._executor, self._run_batch, [w.item for w in batch])
            self._running = []
            self._count(batch)
            for waiting, (ok, value) in zip(batch, outcomes):
                if waiting.future.done():
                    continue
                if ok:
                    waiting.future.set_result(value)
                else:
                    waiting.future.set_exception(value)

    def _fitting(self) -> int:
        """How many of the oldest waiting items fit in one batch (at least the first)."""
        total = 0
        for count, waiting in enumerate(self._waiting):
            total += waiting.size
            if total > self.max_items:
                return max(1, count)
        return len(self._waiting)

    def _size(self, count: int) -> int:
        return sum(self._waiting[i].size for i in range(count))

    def _run_batch(self, items: list[Item]) -> list[tuple[bool, Any]]:
        """``(True, result)`` or ``(False, exception)`` per item."""
        try:
            results = list(self.run(items))
        except Exception as err:  # noqa: BLE001 - handed to the submitters
            if len(items) == 1:
                return [(False, err)]
            logger.debug("a batch of %d failed (%s); running its items one by one", len(items), err)
            return [self._run_batch([item])[0] for item in items]
        assert len(results) == len(items), "run() must answer every item"
        return [(True, result) for result in results]

    def _count(self, batch: list[_Waiting[Item]]) -> None:
        queries = sum(w.size for w in batch)
        stats = self._stats
        stats["batches"] += 1
        stats["items"] += len(batch)
        stats["queries"] += queries
        stats["largest_batch_items"] = max(stats["largest_batch_items"], len(batch))
        stats["largest_batch_queries"] = max(stats["largest_batch_queries"], queries)
        stats["combined_batches"] += len(batch) > 1
