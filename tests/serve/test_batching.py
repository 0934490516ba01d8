"""Dynamic batching without a model: how rows gather, split by key, and survive a failing batch."""

from __future__ import annotations

import asyncio
import time

import pytest

from dept_serve.batching import DynamicBatcher


class Recorder:
    """A run_batch that records each batch (key, payloads) and answers payload * 10."""

    def __init__(self, fail_on=None, delay_s=0.0):
        self.batches, self.fail_on, self.delay_s = [], fail_on, delay_s

    def __call__(self, key, payloads):
        self.batches.append((key, list(payloads)))
        time.sleep(self.delay_s)
        if self.fail_on in payloads:
            raise RuntimeError(f"payload {self.fail_on} broke the batch")
        return [payload * 10 for payload in payloads]


async def _with_batcher(recorder, coroutine_function, **kwargs):
    batcher = DynamicBatcher(recorder, **kwargs)
    await batcher.start()
    try:
        return await coroutine_function(batcher)
    finally:
        await batcher.stop()


def test_concurrent_requests_gather_into_batches_of_at_most_max_batch_size():
    recorder = Recorder()

    async def submit_all(batcher):
        return await asyncio.gather(*(batcher.submit("k", [i]) for i in range(10)))

    rows = asyncio.run(_with_batcher(recorder, submit_all, max_batch_size=4, max_wait_ms=200))
    assert [row.future.result() for (row,) in rows] == [10 * i for i in range(10)]
    assert [len(payloads) for _, payloads in recorder.batches] == [4, 4, 2]  # full batches, then the rest
    assert sorted(p for _, payloads in recorder.batches for p in payloads) == list(range(10))  # none lost or twice
    assert [row.batch_size for (row,) in rows] == [4] * 8 + [2] * 2


def test_a_lone_request_waits_at_most_max_wait_ms():
    recorder = Recorder()

    async def one(batcher):
        start = time.perf_counter()
        (row,) = await batcher.submit("k", [1])
        return time.perf_counter() - start, row

    waited, row = asyncio.run(_with_batcher(recorder, one, max_batch_size=8, max_wait_ms=50))
    assert 0.045 <= row.started - row.enqueued and waited < 2  # it waited for company, then ran alone
    assert recorder.batches == [("k", [1])]


def test_rows_with_different_keys_never_share_a_batch():
    recorder = Recorder()

    async def submit_all(batcher):
        return await asyncio.gather(*(batcher.submit(("generate", i % 2), [i]) for i in range(6)))

    asyncio.run(_with_batcher(recorder, submit_all, max_batch_size=8, max_wait_ms=100))
    assert sorted(recorder.batches) == [(("generate", 0), [0, 2, 4]), (("generate", 1), [1, 3, 5])]


def test_a_failing_batch_fails_its_requests_only_and_the_batcher_goes_on():
    recorder = Recorder(fail_on=3)

    async def submit_all(batcher):
        first = await asyncio.gather(*(batcher.submit("k", [i]) for i in range(4)), return_exceptions=True)
        after = await batcher.submit("k", [7])
        return first, after

    first, after = asyncio.run(_with_batcher(recorder, submit_all, max_batch_size=4, max_wait_ms=100))
    assert all(isinstance(result, RuntimeError) and "payload 3" in str(result) for result in first)
    assert after[0].future.result() == 70


def test_rows_queued_during_a_batch_join_the_next_one_at_once():
    recorder = Recorder(delay_s=0.2)

    async def staggered(batcher):
        first = asyncio.create_task(batcher.submit("k", [0]))
        await asyncio.sleep(0.05)  # the first batch is running now
        rest = await asyncio.gather(*(batcher.submit("k", [i]) for i in range(1, 4)))
        return await first, rest

    asyncio.run(_with_batcher(recorder, staggered, max_batch_size=8, max_wait_ms=0))
    assert [payloads for _, payloads in recorder.batches] == [[0], [1, 2, 3]]


@pytest.mark.parametrize("kwargs, message", [({"max_batch_size": 0, "max_wait_ms": 1}, "max_batch_size"),
                                             ({"max_batch_size": 1, "max_wait_ms": -1}, "max_wait_ms")])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DynamicBatcher(Recorder(), **kwargs)
