"""MicroBatcher: grouping by key, result routing, failures, the queue bound (pure Python)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from service.batching import MicroBatcher, Overloaded


class Recorder:
    """A fake model: records each batch it runs; answers (tag, item) per item, in order."""

    def __init__(self, tag: str = "r", fail: bool = False, gate: threading.Event | None = None) -> None:
        self.tag, self.fail, self.gate = tag, fail, gate
        self.batches: list[list] = []
        self.lock = threading.Lock()

    def __call__(self, items):
        if self.gate is not None:
            assert self.gate.wait(10), "gate never opened"
        with self.lock:
            self.batches.append(list(items))
        if self.fail:
            raise ValueError(f"boom in a batch of {len(items)}")
        return [(self.tag, item) for item in items]


def test_same_key_requests_are_grouped():
    sizes = []

    async def main():
        batcher = MicroBatcher(max_batch_size=4, max_latency_ms=50, on_batch=lambda key, n: sizes.append((key, n)))
        model = Recorder()
        results = await asyncio.gather(*(batcher.submit("k", i, model) for i in range(10)))
        return batcher, model, results

    batcher, model, results = asyncio.run(main())
    assert results == [("r", i) for i in range(10)]
    assert sorted(item for batch in model.batches for item in batch) == list(range(10))
    assert all(1 <= len(batch) <= 4 for batch in model.batches)
    assert max(len(batch) for batch in model.batches) > 1
    assert sorted(len(b) for b in model.batches) == [2, 4, 4]
    assert sorted(sizes) == sorted(("k", len(b)) for b in model.batches)
    assert batcher.pending == 0


def test_a_lone_request_runs_after_the_latency_window():
    async def main():
        batcher = MicroBatcher(max_batch_size=8, max_latency_ms=5)
        model = Recorder()
        return await asyncio.wait_for(batcher.submit("k", "only", model), 5), model

    result, model = asyncio.run(main())
    assert result == ("r", "only") and model.batches == [["only"]]


def test_keys_are_never_mixed_and_results_go_back_to_their_caller():
    sizes = []

    async def main():
        batcher = MicroBatcher(max_batch_size=3, max_latency_ms=30, on_batch=lambda key, n: sizes.append((key, n)))
        models = {key: Recorder(tag=str(key)) for key in (("vqa", "a", 1), ("vqa", "a", 2), ("vqa", "b", 1))}
        keys = list(models)
        calls = []
        for i in range(21):
            key = keys[i % 3]
            calls.append((key, i, batcher.submit(key, (key, i), models[key])))
            if i % 5 == 4:
                await asyncio.sleep(0)  # interleave with the batcher's tasks
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
    assert any(n > 1 for _, n in sizes)


def test_an_exception_reaches_every_caller_of_the_batch():
    async def main():
        batcher = MicroBatcher(max_batch_size=4, max_latency_ms=30)
        bad, good = Recorder(fail=True), Recorder()
        outcomes = await asyncio.gather(
            *(batcher.submit("bad", i, bad) for i in range(4)),
            *(batcher.submit("good", i, good) for i in range(2)),
            return_exceptions=True,
        )
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
        batcher = MicroBatcher(max_batch_size=3, max_latency_ms=10)
        outcomes = await asyncio.wait_for(
            asyncio.gather(*(batcher.submit("k", i, lambda items: ["just one"]) for i in range(3)),
                           return_exceptions=True),
            5,
        )
        return batcher, outcomes

    batcher, outcomes = asyncio.run(main())
    assert all(isinstance(o, RuntimeError) and "1 results for 3 items" in str(o) for o in outcomes), outcomes
    assert batcher.pending == 0


def test_the_queue_bound_raises_overloaded():
    gate = threading.Event()

    async def main():
        batcher = MicroBatcher(max_batch_size=2, max_latency_ms=1, max_queue=3)
        model = Recorder(gate=gate)
        waiting = [asyncio.ensure_future(batcher.submit("k", i, model)) for i in range(3)]
        await asyncio.sleep(0.05)  # all three queued or running (the model is blocked)
        assert batcher.pending == 3
        with pytest.raises(Overloaded):
            await batcher.submit("k", 3, model)
        with pytest.raises(Overloaded):
            await batcher.submit("other", 0, model)
        with pytest.raises(Overloaded):
            await batcher.run_alone(lambda: "alone")
        gate.set()
        results = await asyncio.wait_for(asyncio.gather(*waiting), 5)
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


def test_on_batch_gets_key_and_size():
    seen = []

    async def main():
        batcher = MicroBatcher(max_batch_size=5, max_latency_ms=30, on_batch=lambda key, n: seen.append((key, n)))
        model = Recorder()
        await asyncio.gather(*(batcher.submit(("vqa", "p", 1), i, model) for i in range(5)))
        await batcher.submit(("vqa", "p", 1), 5, model)
        return model

    model = asyncio.run(main())
    assert seen == [(("vqa", "p", 1), 5), (("vqa", "p", 1), 1)]
    assert [len(b) for b in model.batches] == [5, 1]
