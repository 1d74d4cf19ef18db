"""Adaptive micro-batching inside one worker.

Requests for the same (task, plan name, plan version) that arrive within ``max_latency_ms`` of each
other run as one model batch (up to ``max_batch_size``). A batch never mixes plans or versions. One
executor thread runs the model, so torch is not oversubscribed; a bounded queue answers overload
with :class:`Overloaded` (HTTP 503 + Retry-After) instead of queueing without bound.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any


class Overloaded(Exception):
    """The worker's queue is full; retry later."""


@dataclass
class _Pending:
    item: Any
    future: asyncio.Future


class MicroBatcher:
    def __init__(self, max_batch_size: int = 16, max_latency_ms: float = 10.0, max_queue: int = 256,
                 on_batch: Callable[[Hashable, int], None] | None = None) -> None:
        self.max_batch_size = max_batch_size
        self.max_latency = max_latency_ms / 1000.0
        self.max_queue = max_queue
        self.on_batch = on_batch
        self._queues: dict[Hashable, list[_Pending]] = {}
        self._runners: dict[Hashable, Callable[[Sequence[Any]], Sequence[Any]]] = {}
        self._pending = 0
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="das-model")
        self._wakeups: dict[Hashable, asyncio.Task] = {}

    @property
    def pending(self) -> int:
        return self._pending

    async def run_alone(self, fn: Callable[[], Any]) -> Any:
        """Run one call on the model thread (no batching), still counted against the queue bound."""
        if self._pending >= self.max_queue:
            raise Overloaded()
        self._pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn)
        finally:
            self._pending -= 1

    async def submit(self, key: Hashable, item: Any, run_batch: Callable[[Sequence[Any]], Sequence[Any]]) -> Any:
        """Queue ``item``; ``run_batch(items)`` returns one result per item, in order."""
        if self._pending >= self.max_queue:
            raise Overloaded()
        loop = asyncio.get_running_loop()
        pending = _Pending(item, loop.create_future())
        self._pending += 1
        queue = self._queues.setdefault(key, [])
        queue.append(pending)
        self._runners[key] = run_batch
        if len(queue) >= self.max_batch_size:
            self._flush(key)
        elif key not in self._wakeups:
            self._wakeups[key] = loop.create_task(self._flush_later(key))
        try:
            return await pending.future
        finally:
            self._pending -= 1

    async def _flush_later(self, key: Hashable) -> None:
        await asyncio.sleep(self.max_latency)
        self._wakeups.pop(key, None)
        self._flush(key)

    def _flush(self, key: Hashable) -> None:
        queue = self._queues.pop(key, [])
        if not queue:
            return
        wakeup = self._wakeups.pop(key, None)
        if wakeup is not None and wakeup is not asyncio.current_task():
            wakeup.cancel()
        run_batch = self._runners[key]
        asyncio.get_running_loop().create_task(self._run(key, queue, run_batch))

    async def _run(self, key: Hashable, batch: list[_Pending], run_batch) -> None:
        if self.on_batch is not None:
            try:
                self.on_batch(key, len(batch))
            except Exception:  # an observer must never stall the batch
                pass
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self._executor, run_batch, [p.item for p in batch])
            results = list(results)
            if len(results) != len(batch):  # zip would leave the extra callers waiting forever
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} items")
            for pending, result in zip(batch, results):
                if not pending.future.done():
                    pending.future.set_result(result)
        except Exception as exc:  # hand the failure to every waiting request
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
