"""Dynamic batching: rows of concurrent requests gather into batches, whatever their adapters.

A batch starts with the oldest queued row and takes every row that arrives within `max_wait_ms` of it, up to
`max_batch_size` rows (rows queued while the previous batch ran join at once). Rows that cannot share a
forward pass (another endpoint, other `max_new_tokens` or `num_beams`) carry another key and run as their own
sub-batch. Batches run one at a time on one thread, the compute thread, which also loads and unloads adapters,
so the model is never touched by two threads at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any


@dataclass
class QueuedRow:
    """One row waiting for a batch; `future` receives its result."""

    key: Hashable
    payload: Any
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)
    started: float = 0.0  # when its batch began
    compute_s: float = 0.0
    batch_size: int = 0


@dataclass
class BatchRecord:
    """What `on_batch` hears about each batch run."""

    key: Hashable
    rows: list[QueuedRow]
    compute_s: float


class DynamicBatcher:
    """Gathers queued rows into batches and runs `run_batch(key, payloads) -> results` on the compute thread.

    Args:
        run_batch: synchronous; returns one result per payload, in order.
        max_batch_size: most rows in one batch.
        max_wait_ms: longest a batch's first row waits for more rows.
        on_batch: called (on the event loop) after each batch, e.g. for metrics.
    """

    def __init__(self, run_batch: Callable[[Hashable, list[Any]], list[Any]], max_batch_size: int,
                 max_wait_ms: float, on_batch: Callable[[BatchRecord], None] | None = None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}.")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}.")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.on_batch = on_batch
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dept-serve-compute")
        self._queue: asyncio.Queue[QueuedRow] | None = None
        self._task: asyncio.Task | None = None

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._loop(), name="dept-serve-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self.executor.shutdown(wait=True)

    async def on_compute_thread(self, function: Callable, *args):
        """Run `function(*args)` on the compute thread, between batches (adapter loading and unloading)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)

    async def submit(self, key: Hashable, payloads: list[Any]) -> list[QueuedRow]:
        """Queue the rows of one request and wait for all of them; returns the rows with their timings.

        A failed batch raises its error here, in every request that had a row in it.
        """
        if self._queue is None:
            raise RuntimeError("The batcher is not started: await start() first.")
        loop = asyncio.get_running_loop()
        rows = [QueuedRow(key, payload, loop.create_future()) for payload in payloads]
        for row in rows:
            self._queue.put_nowait(row)
        await asyncio.gather(*(row.future for row in rows))
        return rows

    async def _collect(self) -> list[QueuedRow]:
        batch = [await self._queue.get()]
        deadline = time.perf_counter() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return [row for row in batch if not row.future.done()]  # a cancelled request leaves its rows

    async def _loop(self) -> None:
        while True:
            batch = await self._collect()
            groups: dict[Hashable, list[QueuedRow]] = {}
            for row in batch:
                groups.setdefault(row.key, []).append(row)
            for key, rows in groups.items():
                await self._run(key, rows)

    async def _run(self, key: Hashable, rows: list[QueuedRow]) -> None:
        start = time.perf_counter()
        for row in rows:
            row.started, row.batch_size = start, len(rows)
        try:
            results = await self.on_compute_thread(self.run_batch, key, [row.payload for row in rows])
            if len(results) != len(rows):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(rows)} rows.")
        except Exception as err:  # handed to every waiting request; the loop goes on
            for row in rows:
                if not row.future.done():
                    row.future.set_exception(err)
            return
        compute_s = time.perf_counter() - start
        for row, result in zip(rows, results):
            row.compute_s = compute_s
            if not row.future.done():
                row.future.set_result(result)
        if self.on_batch is not None:
            self.on_batch(BatchRecord(key, rows, compute_s))
