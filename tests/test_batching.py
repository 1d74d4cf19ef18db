"""MicroBatcher: work-conserving batching by key, fairness, result routing, failures, the queue
bound (pure Python, real asyncio and a real model thread; ordering is pinned with gates, not clocks)."""

from __future__ import annotations

import asyncio
import itertools
import threading

import pytest

from service.batching import MicroBatcher, Overloaded, each_alone_on, run_where_ready, unwrap


class Recorder:
    """A fake model: records each batch as it starts; answers (tag, item) per item, in order."""

    def __init__(self, tag: str = "r", fail: bool = False, gate: threading.Event | None = None) -> None:
        self.tag, self.fail, self.gate = tag, fail, gate
        self.batches: list[list] = []
        self.started = threading.Event()
        self.lock = threading.Lock()

    def __call__(self, items):
        with self.lock:
            self.batches.append(list(items))
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(10), "gate never opened"
        if self.fail:
            raise ValueError(f"boom in a batch of {len(items)}")
        return [(self.tag, item) for item in items]


async def hold_model(batcher: MicroBatcher):
    """Occupy the model thread until the returned gate is set; returns (gate, the holding call)."""
    gate, started = threading.Event(), threading.Event()

    def block():
        started.set()
        assert gate.wait(10), "gate never opened"
        return "held"

    holder = asyncio.ensure_future(batcher.run_alone(block))
    assert await asyncio.to_thread(started.wait, 10), "the model thread never started"
    return gate, holder


async def until_pending(batcher: MicroBatcher, n: int) -> None:
    """Let queued submit() calls run until the batcher holds n requests."""
    for _ in range(1000):
        if batcher.pending == n:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"pending stayed {batcher.pending}, wanted {n}")


def test_a_lone_request_starts_at_once_and_later_ones_form_the_next_batch():
    gate = threading.Event()

    async def main():
        batcher = MicroBatcher(max_batch_size=2)
        model = Recorder(gate=gate)
        first = asyncio.ensure_future(batcher.submit("k", "a", model))
        # nothing else is queued and no timer will fire: the model starts on the lone request
        assert await asyncio.to_thread(model.started.wait, 10)
        snapshot = [list(b) for b in model.batches]
        later = [asyncio.ensure_future(batcher.submit("k", x, model)) for x in "bcd"]
        await until_pending(batcher, 4)
        assert model.batches == [["a"]]  # the others wait for the running batch
        gate.set()
        results = await asyncio.wait_for(asyncio.gather(first, *later), 10)
        return batcher, model, snapshot, results

    try:
        batcher, model, snapshot, results = asyncio.run(main())
    finally:
        gate.set()
    assert snapshot == [["a"]]
    assert results == [("r", x) for x in "abcd"]
    assert model.batches == [["a"], ["b", "c"], ["d"]]  # arrivals during a batch run next, max 2 a batch
    assert batcher.pending == 0 and MicroBatcher().max_latency == 0  # no idle wait by default


def test_same_key_requests_are_grouped_under_load():
    sizes = []

    async def main():
        batcher = MicroBatcher(max_batch_size=4, on_batch=lambda key, n: sizes.append((key, n)))
        model = Recorder()
        gate, holder = await hold_model(batcher)
        calls = [asyncio.ensure_future(batcher.submit("k", i, model)) for i in range(10)]
        await until_pending(batcher, 11)
        gate.set()
        return batcher, model, await asyncio.gather(*calls), await holder

    batcher, model, results, held = asyncio.run(main())
    assert results == [("r", i) for i in range(10)] and held == "held"
    assert model.batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert sizes == [("k", 4), ("k", 4), ("k", 2)]  # run_alone calls are not reported as batches
    assert batcher.pending == 0


def test_keys_are_never_mixed_and_the_oldest_request_goes_first():
    async def main():
        batcher = MicroBatcher(max_batch_size=2)
        model = Recorder()
        gate, holder = await hold_model(batcher)
        arrivals = [("a", 1), ("b", 1), ("a", 2), ("b", 2), ("a", 3)]
        calls = []
        for key, i in arrivals:
            calls.append(asyncio.ensure_future(batcher.submit(key, (key, i), model)))
            await until_pending(batcher, len(calls) + 1)  # arrival order is exactly this list
        gate.set()
        await holder
        return model, await asyncio.gather(*calls), arrivals

    model, results, arrivals = asyncio.run(main())
    assert results == [("r", item) for item in arrivals]
    # a's oldest request is oldest, then b's (older than a's third), then a's third
    assert model.batches == [[("a", 1), ("a", 2)], [("b", 1), ("b", 2)], [("a", 3)]]


def test_keys_are_never_mixed_and_results_go_back_to_their_caller():
    sizes = []

    async def main():
        batcher = MicroBatcher(max_batch_size=3, on_batch=lambda key, n: sizes.append((key, n)))
        models = {key: Recorder(tag=str(key)) for key in (("vqa", "a", 1), ("vqa", "a", 2), ("vqa", "b", 1))}
        keys = list(models)
        calls = []
        for i in range(21):
            key = keys[i % 3]
            calls.append((key, i, batcher.submit(key, (key, i), models[key])))
            if i % 5 == 4:
                await asyncio.sleep(0)  # interleave with the batcher's callbacks
        results = await asyncio.gather(*(call for _, _, call in calls))
        return models, [(key, i) for key, i, _ in calls], results

    models, sent, results = asyncio.run(main())
    for (key, i), result in zip(sent, results):
        assert result == (str(key), (key, i))  # each caller gets its own item's result
    batch_count = 0
    for key, model in models.items():
        for batch in model.batches:
            batch_count += 1
            assert {item_key for item_key, _ in batch} == {key}  # one key per batch
            assert 1 <= len(batch) <= 3
            indices = [i for _, i in batch]
            assert indices == sorted(indices)  # arrival order kept inside a batch
        assert sorted(i for batch in model.batches for _, i in batch) == [i for k, i in sent if k == key]
    assert len(sizes) == batch_count and sum(n for _, n in sizes) == 21
    assert any(n > 1 for _, n in sizes)  # the calls that arrived while the first batch ran were grouped


def test_an_exception_reaches_every_caller_of_the_batch():
    async def main():
        batcher = MicroBatcher(max_batch_size=4)
        bad, good = Recorder(fail=True), Recorder()
        gate, holder = await hold_model(batcher)
        calls = [asyncio.ensure_future(batcher.submit("bad", i, bad)) for i in range(4)]
        calls += [asyncio.ensure_future(batcher.submit("good", i, good)) for i in range(2)]
        await until_pending(batcher, 7)
        gate.set()
        await holder
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        again = await batcher.submit("bad", 99, Recorder())  # the batcher keeps working afterwards
        return batcher, bad, outcomes, again

    batcher, bad, outcomes, again = asyncio.run(main())
    assert [len(b) for b in bad.batches] == [4]
    assert all(isinstance(o, ValueError) and "boom in a batch of 4" in str(o) for o in outcomes[:4])
    assert outcomes[4:] == [("r", 0), ("r", 1)]
    assert again == ("r", 99)
    assert batcher.pending == 0


def test_a_wrong_number_of_results_fails_the_batch_instead_of_hanging():
    async def main():
        batcher = MicroBatcher(max_batch_size=3)
        gate, holder = await hold_model(batcher)
        calls = [asyncio.ensure_future(batcher.submit("k", i, lambda items: ["just one"])) for i in range(3)]
        await until_pending(batcher, 4)
        gate.set()
        await holder
        return batcher, await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 10)

    batcher, outcomes = asyncio.run(main())
    assert all(isinstance(o, RuntimeError) and "1 results for 3 items" in str(o) for o in outcomes), outcomes
    assert batcher.pending == 0


def test_a_caller_that_goes_away_is_not_run():
    async def main():
        batcher = MicroBatcher(max_batch_size=4)
        model = Recorder()
        gate, holder = await hold_model(batcher)
        gone = asyncio.ensure_future(batcher.submit("k", "gone", model))
        kept = asyncio.ensure_future(batcher.submit("k", "kept", model))
        await until_pending(batcher, 3)
        gone.cancel()  # e.g. the client disconnected
        await until_pending(batcher, 2)
        gate.set()
        await holder
        return batcher, model, await kept

    batcher, model, kept = asyncio.run(main())
    assert kept == ("r", "kept") and model.batches == [["kept"]]
    assert batcher.pending == 0


def test_the_queue_bound_raises_overloaded():
    gate = threading.Event()

    async def main():
        batcher = MicroBatcher(max_batch_size=2, max_queue=3)
        model = Recorder(gate=gate)
        waiting = [asyncio.ensure_future(batcher.submit("k", i, model)) for i in range(3)]
        await until_pending(batcher, 3)  # one running (blocked in the model), two queued
        with pytest.raises(Overloaded):
            await batcher.submit("k", 3, model)
        with pytest.raises(Overloaded):
            await batcher.submit("other", 0, model)
        with pytest.raises(Overloaded):
            await batcher.run_alone(lambda: "alone")
        gate.set()
        results = await asyncio.wait_for(asyncio.gather(*waiting), 10)
        after = await batcher.submit("k", 4, model)  # room again
        alone = await batcher.run_alone(lambda: "alone")
        return batcher, results, after, alone

    try:
        batcher, results, after, alone = asyncio.run(main())
    finally:
        gate.set()
    assert results == [("r", 0), ("r", 1), ("r", 2)]
    assert after == ("r", 4) and alone == "alone"
    assert batcher.pending == 0


def test_the_optional_idle_wait_gathers_batch_mates_and_never_holds_a_full_batch():
    async def main():
        batcher = MicroBatcher(max_batch_size=3, max_latency_ms=600_000)  # a wait no test would outlive
        model = Recorder()
        calls = []
        for i in range(3):
            calls.append(asyncio.ensure_future(batcher.submit("k", i, model)))
            await until_pending(batcher, i + 1)
        return model, await asyncio.wait_for(asyncio.gather(*calls), 10)  # full: runs without the wait

    model, results = asyncio.run(main())
    assert results == [("r", 0), ("r", 1), ("r", 2)]
    assert model.batches == [[0, 1, 2]]  # the first request waited for its batch-mates


def test_the_idle_wait_does_not_apply_after_a_batch():
    async def main():
        batcher = MicroBatcher(max_batch_size=8, max_latency_ms=600_000)
        model = Recorder()
        gate, holder = await hold_model(batcher)  # run_alone never waits
        calls = [asyncio.ensure_future(batcher.submit("k", i, model)) for i in range(2)]
        await until_pending(batcher, 3)
        gate.set()
        await holder
        return model, await asyncio.wait_for(asyncio.gather(*calls), 10)  # not full, yet they run

    model, results = asyncio.run(main())
    assert results == [("r", 0), ("r", 1)] and model.batches == [[0, 1]]


def test_a_short_idle_wait_still_runs_a_lone_request():
    async def main():
        batcher = MicroBatcher(max_batch_size=8, max_latency_ms=5)
        model = Recorder()
        return await asyncio.wait_for(batcher.submit("k", "only", model), 10), model

    result, model = asyncio.run(main())
    assert result == ("r", "only") and model.batches == [["only"]]


def test_on_batch_gets_key_and_size():
    seen = []

    async def main():
        batcher = MicroBatcher(max_batch_size=5, on_batch=lambda key, n: seen.append((key, n)))
        model = Recorder()
        gate, holder = await hold_model(batcher)
        calls = [asyncio.ensure_future(batcher.submit(("vqa", "p", 1), i, model)) for i in range(5)]
        await until_pending(batcher, 6)
        gate.set()
        await asyncio.gather(holder, *calls)
        await batcher.submit(("vqa", "p", 1), 5, model)
        return model

    model = asyncio.run(main())
    assert seen == [(("vqa", "p", 1), 5), (("vqa", "p", 1), 1)]
    assert [len(b) for b in model.batches] == [5, 1]


def test_bad_settings_are_refused():
    for bad in ({"max_batch_size": 0}, {"max_latency_ms": -1}, {"max_queue": 0}):
        with pytest.raises(ValueError):
            MicroBatcher(**bad)


def test_backlog_is_the_waiting_requests_times_the_recent_time_per_request():
    async def main():
        batcher = MicroBatcher(max_batch_size=4)
        assert batcher.seconds_per_item is None and batcher.backlog_seconds() == 0.0
        model = Recorder()
        await asyncio.gather(*(batcher.submit("k", i, model) for i in range(3)))
        per_item = batcher.seconds_per_item
        assert per_item is not None and per_item > 0
        gate, holder = await hold_model(batcher)
        queued = [asyncio.ensure_future(batcher.submit("k", i, model)) for i in range(5)]
        await until_pending(batcher, 6)  # the held call and five waiting
        assert batcher.backlog_seconds() == pytest.approx(6 * per_item)
        gate.set()
        await asyncio.gather(holder, *queued)
        assert batcher.pending == 0 and batcher.backlog_seconds() == 0.0

    asyncio.run(main())


def test_busy_fraction_is_the_share_of_the_window_spent_running_batches():
    import time

    async def main():
        batcher = MicroBatcher(max_batch_size=4)
        assert batcher.busy_fraction(1.0) == 0.0  # nothing has run
        gate, holder = await hold_model(batcher)
        await asyncio.sleep(0.02)
        # a batch has been running all of the last 10 ms (float subtraction of clock readings: approx)
        assert batcher.busy_fraction(0.01) == pytest.approx(1.0)
        gate.set()
        await holder
        done = time.perf_counter()
        ran = batcher.busy_fraction(1000.0, now=done) * 1000.0  # the held batch's seconds on the model
        assert ran >= 0.02
        assert batcher.busy_fraction(2 * 1000.0, now=done) == pytest.approx(ran / 2000.0)  # a wider window
        assert batcher.busy_fraction(0.5, now=done + 10) == 0.0  # a window after the batch is idle

    asyncio.run(main())


def test_back_to_back_batches_are_one_busy_span():
    """A saturated model keeps one span, however many batches it runs (bounded memory at any rate)."""
    async def main():
        batcher = MicroBatcher(max_batch_size=1)
        model = Recorder()
        gate, holder = await hold_model(batcher)
        queued = [asyncio.ensure_future(batcher.submit("k", i, model)) for i in range(20)]
        await until_pending(batcher, 21)
        gate.set()
        await asyncio.gather(holder, *queued)
        assert len(model.batches) == 20
        return len(batcher._batch_spans)

    assert asyncio.run(main()) <= 3  # 21 batches, dispatched back to back


# -- streamed runs (stream_alone) and per-item failures (each_alone_on) -------------------------
def test_a_streamed_run_yields_its_items_in_order_then_its_error():
    def events():
        yield from range(5)
        raise ValueError("after five")

    async def main():
        batcher, got = MicroBatcher(), []
        with pytest.raises(ValueError, match="after five"):
            async for item in batcher.stream_alone(events, buffer=2):
                got.append(item)
        return batcher, got

    batcher, got = asyncio.run(main())
    assert got == [0, 1, 2, 3, 4] and batcher.pending == 0


def test_a_streamed_run_waits_for_its_consumer_and_stops_when_it_goes_away():
    produced, closed = [], threading.Event()

    def endless():
        try:
            for i in itertools.count():
                produced.append(i)
                yield i
        finally:
            closed.set()

    async def main():
        batcher = MicroBatcher()
        stream = batcher.stream_alone(endless, buffer=2)
        first = [await anext(stream) for _ in range(3)]
        await asyncio.sleep(0.3)  # room for the producer to run ahead, if it could
        ahead = len(produced)
        await stream.aclose()  # the client went away
        after = await asyncio.wait_for(batcher.run_alone(lambda: "the model thread is free"), 10)
        return batcher, first, ahead, after

    batcher, first, ahead, after = asyncio.run(main())
    assert first == [0, 1, 2]
    assert ahead <= 3 + 2 + 1  # consumed, buffered, and one waiting to be handed over: no more
    assert closed.is_set() and after == "the model thread is free" and batcher.pending == 0


def test_a_streamed_run_closed_before_it_started_never_runs():
    ran = threading.Event()

    def events():
        ran.set()
        yield 1

    async def main():
        batcher = MicroBatcher()
        gate, holding = await hold_model(batcher)
        stream = batcher.stream_alone(events)
        waiting = asyncio.ensure_future(anext(stream))
        await until_pending(batcher, 2)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await stream.aclose()
        gate.set()
        await holding
        await batcher.run_alone(lambda: None)
        return batcher

    batcher = asyncio.run(main())
    assert not ran.is_set() and batcher.pending == 0


def test_one_items_failure_does_not_fail_its_batch_mates():
    calls = []

    def run(items):
        calls.append(list(items))
        if "bad" in items:
            raise ValueError(f"bad item among {len(items)}")
        return [item.upper() for item in items]

    async def main():
        batcher = MicroBatcher()
        gate, holding = await hold_model(batcher)
        wrapped = each_alone_on((ValueError,), run)
        futures = [asyncio.ensure_future(batcher.submit("k", item, wrapped)) for item in ("a", "bad", "c")]
        await until_pending(batcher, 4)
        gate.set()
        await holding
        return await asyncio.gather(*futures)

    results = asyncio.run(main())
    assert unwrap(results[0]) == "A" and unwrap(results[2]) == "C"
    with pytest.raises(ValueError, match="bad item among 1"):
        unwrap(results[1])
    assert calls == [["a", "bad", "c"], ["a"], ["bad"], ["c"]]
    with pytest.raises(ValueError, match="among 1"):  # a batch of one gets its failure back too
        unwrap(each_alone_on((ValueError,), run)(["bad"])[0])


def test_items_whose_inputs_failed_fail_alone():
    """run_where_ready: the ready items run together, in order; an item whose preparation failed
    gets its own error, raised by unwrap; no ready item means no run."""
    calls = []

    def run(items, inputs):
        calls.append((list(items), list(inputs)))
        return [f"{item}:{value}" for item, value in zip(items, inputs)]

    bad = ValueError("item b: not an image")
    results = run_where_ready(["a", "b", "c"], [1, bad, 3], run)
    assert calls == [(["a", "c"], [1, 3])]
    assert unwrap(results[0]) == "a:1" and unwrap(results[2]) == "c:3"
    with pytest.raises(ValueError, match="item b"):
        unwrap(results[1])
    calls.clear()
    only_bad = run_where_ready(["b"], [bad], run)
    assert calls == [] and len(only_bad) == 1
    with pytest.raises(RuntimeError, match="1 results for 2 items"):
        run_where_ready(["a", "c"], [1, 3], lambda items, inputs: ["one"])
