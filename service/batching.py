"""Work-conserving micro-batching inside one worker.

One executor thread runs the model, so torch is not oversubscribed. When it is idle, a request's
batch starts at once; while a batch runs, requests for the same key (task, plan name, version,
weights) gather and run together as the next batch as soon as the thread frees up, up to
``max_batch_size``. Batching thus costs a lone request nothing and grows with the load by itself. A
batch never mixes keys; of several waiting keys, the one with the oldest request runs next, so no
key starves. ``max_latency_ms`` (default 0) optionally makes a batch wait that long for batch-mates
when it would start on an idle model (a full batch never waits). A bounded queue answers overload
with :class:`Overloaded` (HTTP 503 + Retry-After) instead of queueing without bound.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

RunBatch = Callable[[Sequence[Any]], Sequence[Any]]
MAX_BATCH_SPANS = 4096  # busy spans remembered for busy_fraction (a bound on memory)
STREAM_BUFFER = 64  # items a streamed run may hand over before the model thread waits for the consumer
STREAM_POLL_S = 0.05  # how often a waiting producer checks whether its consumer went away
SPAN_MERGE_GAP_S = 0.002  # a batch starting this soon after the last one extends its span: a saturated model is one span


class Overloaded(Exception):
    """The worker's queue is full; retry later."""


@dataclass
class _Pending:
    item: Any
    future: asyncio.Future
    arrived: float  # loop.time() at submit: the optional idle wait counts from the oldest request
    order: int  # arrival order across keys: oldest-first between keys


@dataclass
class _Queue:
    run_batch: RunBatch  # every submit of one key runs the same model path; the first one's is kept
    limit: int  # most items per batch (1 for run_alone)
    reported: bool  # passed to on_batch (run_alone calls are not batches of a plan key)
    items: deque[_Pending] = field(default_factory=deque)


class MicroBatcher:
    def __init__(self, max_batch_size: int = 16, max_latency_ms: float = 0.0, max_queue: int = 256,
                 on_batch: Callable[[Hashable, int], None] | None = None) -> None:
        if max_batch_size < 1 or max_latency_ms < 0 or max_queue < 1:
            raise ValueError("need max_batch_size >= 1, max_latency_ms >= 0 and max_queue >= 1")
        self.max_batch_size = max_batch_size
        self.max_latency = max_latency_ms / 1000.0
        self.max_queue = max_queue
        self.on_batch = on_batch
        self._queues: dict[Hashable, _Queue] = {}  # only keys with waiting requests
        self._pending = 0  # waiting + running requests (the queue bound)
        self._busy = False  # a batch is on the model thread
        self._timer: asyncio.TimerHandle | None = None  # the optional idle wait
        self._arrivals = itertools.count()
        self._seconds_per_item: float | None = None  # EWMA of model-thread time per request
        self._batch_spans: deque[tuple[float, float]] = deque(maxlen=MAX_BATCH_SPANS)  # (started, finished)
        self._running_since: float | None = None  # perf_counter() when the running batch started
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="das-model")

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def seconds_per_item(self) -> float | None:
        """Recent model-thread time per request (batch time / batch size, smoothed), None before any batch."""
        return self._seconds_per_item

    def backlog_seconds(self) -> float:
        """About how long a request arriving now waits for the model: the requests already waiting or
        running times the recent time per request. Known at arrival, unlike any latency, so it is the
        early sign of overload (service.adaptive)."""
        return self._pending * (self._seconds_per_item or 0.0)

    def busy_fraction(self, window_s: float, now: float | None = None) -> float:
        """The share of the last ``window_s`` seconds the model thread spent running batches (0-1):
        how close this worker is to its capacity on the current mix of plans (service.adaptive
        steps up to a dearer plan only when that plan would leave headroom)."""
        now = time.perf_counter() if now is None else now
        start = now - window_s
        while self._batch_spans and self._batch_spans[0][1] <= start:
            self._batch_spans.popleft()
        busy = sum(min(end, now) - max(began, start) for began, end in self._batch_spans if end > start)
        if self._running_since is not None:
            busy += now - max(self._running_since, start)
        return min(1.0, max(0.0, busy / window_s))

    async def submit(self, key: Hashable, item: Any, run_batch: RunBatch) -> Any:
        """Queue ``item``; ``run_batch(items)`` returns one result per item, in order."""
        return await self._enqueue(key, item, run_batch, self.max_batch_size, reported=True)

    async def run_alone(self, fn: Callable[[], Any]) -> Any:
        """Run one call on the model thread as a batch of its own (no batch-mates, no idle wait),
        in turn with the batches and counted against the queue bound."""
        return await self._enqueue(object(), None, lambda _: [fn()], 1, reported=False)

    async def stream_alone(self, make_events: Callable[[], Iterator[Any]], buffer: int = STREAM_BUFFER) -> AsyncIterator[Any]:
        """Run ``make_events()`` (an iterator, e.g. a generation's token events) on the model thread
        as a batch of its own, as :meth:`run_alone` does, and yield its items here as they come.

        Backpressure: at most ``buffer`` items wait for the consumer; the model thread waits when
        they do. Closing this iterator early (a client that went away: Starlette closes the response
        body's iterator) stops the producer at its next item, or drops it from the queue if it has
        not started, so the model thread is free for the next batch. An exception of the producer is
        raised here after the items before it."""
        loop = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue(maxsize=buffer)
        stop, started = threading.Event(), threading.Event()

        def put(item: Any) -> bool:
            """Hand an item to the event loop, waiting while the buffer is full; False once stopped."""
            handed = asyncio.run_coroutine_threadsafe(items.put(item), loop)
            while True:
                try:
                    handed.result(timeout=STREAM_POLL_S)
                    return True
                except concurrent.futures.TimeoutError:
                    if stop.is_set():
                        handed.cancel()
                        return False
                except concurrent.futures.CancelledError:  # the loop is closing
                    return False

        def produce() -> None:
            started.set()
            if stop.is_set():
                return
            events = make_events()
            try:
                for item in events:
                    if stop.is_set() or not put(item):
                        return
            finally:
                close = getattr(events, "close", None)
                if close is not None:
                    close()

        job = asyncio.ensure_future(self.run_alone(produce))
        try:
            while True:
                getting = asyncio.ensure_future(items.get())
                done, _ = await asyncio.wait({getting, job}, return_when=asyncio.FIRST_COMPLETED)
                if getting in done:
                    yield getting.result()
                    continue
                getting.cancel()
                while not items.empty():  # what the producer handed over before it ended
                    yield items.get_nowait()
                job.result()  # the producer's exception, if any
                return
        finally:
            stop.set()
            if not job.done() and not started.is_set():
                job.cancel()  # still queued: dropped by the dispatcher, never run

    async def _enqueue(self, key: Hashable, item: Any, run_batch: RunBatch, limit: int, reported: bool) -> Any:
        if self._pending >= self.max_queue:
            raise Overloaded()
        loop = asyncio.get_running_loop()
        pending = _Pending(item, loop.create_future(), loop.time(), next(self._arrivals))
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = _Queue(run_batch, limit, reported)
        queue.items.append(pending)
        self._pending += 1
        try:
            self._dispatch(idle_wait=True)
            return await pending.future
        finally:
            self._pending -= 1

    def _dispatch(self, idle_wait: bool) -> None:
        """Start the next batch if the model thread is free. ``idle_wait``: the model was idle when
        called (a new request), so the optional ``max_latency`` wait applies; after a batch it does
        not (the waiting requests already waited for that batch)."""
        if self._busy:
            return  # the running batch dispatches the next one when it finishes
        for key in [k for k, q in self._queues.items() if not _drop_cancelled(q)]:
            del self._queues[key]  # callers gone (client disconnected)
        if not self._queues:
            return
        full = [k for k, q in self._queues.items() if len(q.items) >= q.limit]
        waiting = full or list(self._queues)
        key = min(waiting, key=lambda k: self._queues[k].items[0].order)
        if idle_wait and not full and self.max_latency > 0:
            if self._timer is None:  # already armed for an older request otherwise
                deadline = self._queues[key].items[0].arrived + self.max_latency
                self._timer = asyncio.get_running_loop().call_at(deadline, self._on_timer)
            return
        self._start(key)

    def _on_timer(self) -> None:
        self._timer = None
        self._dispatch(idle_wait=False)

    def _start(self, key: Hashable) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        queue = self._queues[key]
        batch = [queue.items.popleft() for _ in range(min(queue.limit, len(queue.items)))]
        if not queue.items:
            del self._queues[key]
        if queue.reported and self.on_batch is not None:
            try:
                self.on_batch(key, len(batch))
            except Exception:  # an observer must never stall the batch
                pass
        self._busy = True
        started = self._running_since = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            running = loop.run_in_executor(self._executor, queue.run_batch, [p.item for p in batch])
        except Exception as exc:  # e.g. the executor is shut down: fail this batch, not the loop
            running = loop.create_future()
            running.set_exception(exc)
        running.add_done_callback(lambda done: self._finish(batch, done, started))

    def _finish(self, batch: list[_Pending], done: asyncio.Future, started: float) -> None:
        self._busy = False
        finished, self._running_since = time.perf_counter(), None
        if self._batch_spans and started - self._batch_spans[-1][1] < SPAN_MERGE_GAP_S:
            self._batch_spans[-1] = (self._batch_spans[-1][0], finished)
        else:
            self._batch_spans.append((started, finished))
        per_item = (finished - started) / len(batch)
        previous = self._seconds_per_item
        self._seconds_per_item = per_item if previous is None else 0.7 * previous + 0.3 * per_item
        if done.cancelled():  # the loop is shutting down
            for pending in batch:
                pending.future.cancel()
            return
        try:
            results = list(done.result())
            if len(results) != len(batch):  # zip would leave the extra callers waiting forever
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} items")
        except Exception as exc:  # hand the failure to every waiting request
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
        else:
            for pending, result in zip(batch, results):
                if not pending.future.done():
                    pending.future.set_result(result)
        self._dispatch(idle_wait=False)


@dataclass(frozen=True)
class Failed:
    """One item's failure inside a batch that :func:`each_alone_on` split up: the caller raises it."""

    error: Exception


def each_alone_on(errors: tuple[type[Exception], ...], run_batch: RunBatch) -> RunBatch:
    """``run_batch``, except that when the whole batch raises one of ``errors`` (one item's bad input
    fails a batched call, e.g. a prompt too long for the model's context), each item runs again on
    its own, and the items that fail alone get :class:`Failed` as their result: one request's
    problem never fails its batch-mates. See :func:`unwrap`."""

    def run(items: Sequence[Any]) -> Sequence[Any]:
        try:
            return run_batch(items)
        except errors as exc:
            if len(items) == 1:
                return [Failed(exc)]
        results: list[Any] = []
        for item in items:
            try:
                results.extend(run_batch([item]))
            except errors as exc:
                results.append(Failed(exc))
        return results

    return run


def run_where_ready(items: Sequence[Any], inputs: Sequence[Any], run: Callable[[list, list], Sequence[Any]]) -> list:
    """A batch whose items each come with their prepared inputs, or the Exception that preparing
    them raised (an upload that does not decode): the ready items run together as ``run(items,
    inputs)``, the others get :class:`Failed` as their result. See :func:`unwrap`."""
    results: list[Any] = [Failed(value) if isinstance(value, Exception) else None for value in inputs]
    ready = [i for i, result in enumerate(results) if result is None]
    if ready:
        outputs = list(run([items[i] for i in ready], [inputs[i] for i in ready]))
        if len(outputs) != len(ready):
            raise RuntimeError(f"run returned {len(outputs)} results for {len(ready)} items")
        for i, output in zip(ready, outputs):
            results[i] = output
    return results


def unwrap(result: Any) -> Any:
    """A result of an :func:`each_alone_on` batch: raises the item's own error."""
    if isinstance(result, Failed):
        raise result.error
    return result


def _drop_cancelled(queue: _Queue) -> bool:
    """Remove requests whose caller went away; True if any request is left."""
    while queue.items and queue.items[0].future.done():
        queue.items.popleft()
    if any(p.future.done() for p in queue.items):
        queue.items = deque(p for p in queue.items if not p.future.done())
    return bool(queue.items)
