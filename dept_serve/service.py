"""The server's logic between HTTP and the engine: checks, batching, and adapters loaded and unloaded live.

Every check that can refuse a request (unknown adapter, wrong endpoint, input over max_length, corrupt image,
unknown feature id) runs before its rows are queued, so a bad request never fails a batch it shares with others.

Inputs are tokenized on a thread of their own (and an input too long for its adapter is refused by its length
in characters before that), so no request ever blocks the event loop that answers the others.

Unloading never touches a request in flight: the adapter stops taking new requests at once (they get a 404),
its queued and running rows finish, and only then is it removed, on the compute thread, between batches.
Loading also runs on the compute thread, so no batch ever sees a half-loaded adapter.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from dept import AdapterMismatchError, ConfigError
from dept.errors import UserError
from dept_serve.batching import DynamicBatcher, QueuedRow
from dept_serve.engine import EngineRow, ServedAdapter, ServingEngine
from dept_serve.errors import (
    ConflictError,
    ForbiddenError,
    InvalidInputError,
    NotFoundError,
    UnknownAdapterError,
)
from dept_serve.limits import Limits
from dept_serve.metrics import UNKNOWN_ADAPTER, ServerMetrics
from dept_vl.images import ImageLoadError, decode_image


class DePTService:
    """Answers generate/score requests in mixed dynamic batches and manages the loaded adapters.

    Args:
        engine: the model side.
        limits: request limits and batching settings.
        adapter_root: the only directory adapters may be loaded from through the API (None: API loading off).
    """

    def __init__(self, engine: ServingEngine, limits: Limits | None = None, adapter_root: str | Path | None = None):
        self.engine = engine
        self.limits = limits or Limits()
        self.adapter_root = Path(adapter_root).resolve() if adapter_root is not None else None
        self.metrics = ServerMetrics()
        self.batcher = DynamicBatcher(self._run_batch, self.limits.max_batch_size, self.limits.max_wait_ms,
                                      on_batch=self.metrics.observe_batch)
        self._in_flight: dict[str, int] = {}  # rows queued or running, per adapter
        self._draining: dict[str, asyncio.Event] = {}  # adapters being unloaded -> set when their rows are done
        self._loading: set[str] = set()
        self.metrics.adapters_loaded.set(len(engine.adapters))
        self._tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dept-serve-tokenize")

    async def start(self) -> None:
        await self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()
        self._tokenizer_thread.shutdown(wait=True)

    # ----------------------------------------------------------------------------------------------- requests
    def loaded(self) -> list[str]:
        return sorted(name for name in self.engine.adapters if name not in self._draining)

    def adapter_for(self, name: str, endpoint: str) -> ServedAdapter:
        """The loaded adapter `name`, if its inputs go to `endpoint` ("generate" or "score"); else a 404 or 422."""
        if name not in self.engine.adapters or name in self._draining:
            raise UnknownAdapterError(name, self.loaded())
        adapter = self.engine.adapters[name]
        if adapter.endpoint != endpoint:
            raise InvalidInputError(f"Adapter {name!r} is a {adapter.config.task_type!r} adapter: send its inputs "
                                    f"to /v1/{adapter.endpoint}, not /v1/{endpoint}.")
        return adapter

    def check_generation_limits(self, max_new_tokens: int, num_beams: int = 1) -> None:
        if max_new_tokens > self.limits.max_new_tokens or num_beams > self.limits.max_num_beams:
            raise InvalidInputError(f"This server allows max_new_tokens <= {self.limits.max_new_tokens} and "
                                    f"num_beams <= {self.limits.max_num_beams}.")

    async def generate(self, request) -> dict:
        self.check_generation_limits(request.max_new_tokens, request.num_beams)
        key = ("generate", request.max_new_tokens, request.num_beams)
        return await self._answer("generate", request, key)

    async def score(self, request) -> dict:
        return await self._answer("score", request, ("score",))

    async def _answer(self, endpoint: str, request, key: Hashable) -> dict:
        start = time.perf_counter()
        with self.metrics.counting(endpoint, self.metrics_label(request.adapter)):
            adapter = self.adapter_for(request.adapter, endpoint)
            job = await self.submit(adapter, key, request.inputs, request)
            rows = await job.rows
            answer = {"adapter": adapter.name, "outputs": [row.future.result() for row in rows],
                      "timing": _timing(rows, start)}
            self.metrics.latency.labels(endpoint, adapter.name).observe(time.perf_counter() - start)
            return answer

    def metrics_label(self, name: str) -> str:
        """The adapter label of a request in the metrics (one label for every unknown name)."""
        return name if name in self.engine.adapters else UNKNOWN_ADAPTER

    async def submit(self, adapter: ServedAdapter, key: Hashable, texts: list[str], request=None,
                     on_token: Callable[[int, int], None] | None = None) -> Job:
        """Check, tokenize and queue `texts` for `adapter`; returns as soon as they are queued, with their ids.

        Every refusal is raised here, before any row is queued. `request` brings a VL request's images or
        feature ids; `on_token(input_index, token_id)` (streaming) hears each new token, on the event loop.
        """
        self._enter(adapter.name, len(texts))  # before any await: an unload now waits for these rows
        try:
            ids = await asyncio.get_running_loop().run_in_executor(self._tokenizer_thread, self.engine.encode,
                                                                   adapter, texts)
            visuals = await self._visuals(adapter, request, len(texts))
            rows = [EngineRow(adapter.name, row_ids, visual, self._token_callback(on_token, i))
                    for i, (row_ids, visual) in enumerate(zip(ids, visuals))]
            queued = asyncio.ensure_future(self.batcher.submit(key, rows))
        except BaseException:
            self._leave(adapter.name, len(texts))
            raise
        queued.add_done_callback(lambda _: self._leave(adapter.name, len(texts)))
        return Job(adapter, ids, queued)

    @staticmethod
    def _token_callback(on_token, index: int):
        """`on_token` for one row, called from the compute thread and run on the event loop."""
        if on_token is None:
            return None
        loop = asyncio.get_running_loop()
        return lambda token: loop.call_soon_threadsafe(on_token, index, token)

    async def _visuals(self, adapter: ServedAdapter, request, count: int) -> list:
        """Each input's (features, boxes) for a VL adapter, from its uploaded image or its feature id."""
        images, feature_ids = getattr(request, "images", None), getattr(request, "feature_ids", None)
        if self.engine.modality != "vl":
            if images or feature_ids:
                raise InvalidInputError("This server's base model reads text only: drop images and feature_ids.")
            return [None] * count
        if request is None:
            raise InvalidInputError(f"Adapter {adapter.name!r} reads an image with each input: send it to "
                                    "/v1/generate with images or feature_ids.")
        if (images is None) == (feature_ids is None):
            raise InvalidInputError(f"Adapter {adapter.name!r} reads an image with each input: send either images "
                                    "(base64 files) or feature_ids, one per input.")
        given = images if images is not None else feature_ids
        if len(given) != count:
            raise InvalidInputError(f"{count} inputs but {len(given)} "
                                    f"{'images' if images is not None else 'feature_ids'}: send one per input.")
        if feature_ids is not None:
            return await self.batcher.on_compute_thread(self.engine.stored_features, feature_ids)
        try:
            decoded = await asyncio.gather(*(asyncio.to_thread(decode_image, data, f"images[{i}]")
                                             for i, data in enumerate(images)))
        except ImageLoadError as err:
            raise InvalidInputError(f"{err}. Send a JPEG, PNG or other image file, base64-encoded.") from None
        return await self.batcher.on_compute_thread(self.engine.image_features_for, adapter, decoded)

    def _run_batch(self, key: Hashable, rows: list[EngineRow]) -> list[dict]:
        """On the compute thread: one mixed batch."""
        if key[0] == "generate":
            return self.engine.generate(rows, max_new_tokens=key[1], num_beams=key[2])
        return self.engine.score(rows)

    def _enter(self, name: str, count: int) -> None:
        self._in_flight[name] = self._in_flight.get(name, 0) + count

    def _leave(self, name: str, count: int) -> None:
        self._in_flight[name] -= count
        if self._in_flight[name] == 0:
            del self._in_flight[name]
            if name in self._draining:
                self._draining[name].set()

    # ----------------------------------------------------------------------------------------------- adapters
    def resolve_adapter_path(self, path: str) -> Path:
        """The adapter directory `path` names under --adapter_root; anything outside (`..`, absolute paths,
        symlinks out of it) is refused."""
        if self.adapter_root is None:
            raise ForbiddenError("Loading adapters through the API is off: start dept-serve with --adapter_root DIR "
                                 "to allow adapters under DIR.")
        try:
            candidate = (self.adapter_root / path).resolve()
        except (OSError, ValueError) as err:
            raise InvalidInputError(f"Invalid adapter path {path!r}: {err}") from None
        if candidate != self.adapter_root and self.adapter_root not in candidate.parents:
            raise ForbiddenError(f"Adapter path {path!r} leads outside --adapter_root ({self.adapter_root}): only "
                                 "adapters under it can be loaded through the API.")
        return candidate

    async def load_adapter(self, name: str, path: str) -> ServedAdapter:
        directory = self.resolve_adapter_path(path)
        if name in self.engine.adapters or name in self._loading or name in self._draining:
            raise ConflictError(f"An adapter named {name!r} is already loaded (or being loaded or unloaded): "
                                f"DELETE /v1/adapters/{name} first, or choose another name.",
                                loaded_adapters=self.loaded())
        self._loading.add(name)
        try:
            adapter = await self.batcher.on_compute_thread(self.engine.add_adapter, name, directory)
        except FileNotFoundError as err:
            raise NotFoundError(str(err)) from None
        except (AdapterMismatchError, ConfigError, UserError, ValueError) as err:
            raise InvalidInputError(f"Adapter {name!r} from {path!r} was refused: {err}") from None
        finally:
            self._loading.discard(name)
        self.metrics.adapters_loaded.set(len(self.engine.adapters))
        return adapter

    async def unload_adapter(self, name: str) -> None:
        if name not in self.engine.adapters or name in self._draining:
            raise UnknownAdapterError(name, self.loaded())
        drained = self._draining[name] = asyncio.Event()
        if name not in self._in_flight:
            drained.set()
        try:
            await drained.wait()
            await self.batcher.on_compute_thread(self.engine.remove_adapter, name)
        finally:
            del self._draining[name]
        self.metrics.adapters_loaded.set(len(self.engine.adapters))


@dataclass
class Job:
    """Queued rows of one request: their adapter, their input ids, and `rows` (done once all are answered)."""

    adapter: ServedAdapter
    input_ids: list[list[int]]
    rows: asyncio.Future  # -> list[QueuedRow]; each row's `future` holds its result


def _timing(rows: list[QueuedRow], start: float) -> dict:
    batches = {row.started: row.compute_s for row in rows}
    return {"queue_ms": 1000 * max(row.started - row.enqueued for row in rows),
            "compute_ms": 1000 * sum(batches.values()), "total_ms": 1000 * (time.perf_counter() - start),
            "batch_sizes": [row.batch_size for row in rows]}
