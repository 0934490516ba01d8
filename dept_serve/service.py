"""The server's logic between HTTP and the engine: checks, batching, and adapters loaded and unloaded live.

Every check that can refuse a request (unknown adapter, wrong endpoint, input over max_length, corrupt image,
unknown feature id) runs before its rows are queued, so a bad request never fails a batch it shares with others.

Unloading never touches a request in flight: the adapter stops taking new requests at once (they get a 404),
its queued and running rows finish, and only then is it removed, on the compute thread, between batches.
Loading also runs on the compute thread, so no batch ever sees a half-loaded adapter.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Hashable
from pathlib import Path

from dept import AdapterMismatchError, ConfigError
from dept_serve.batching import DynamicBatcher, QueuedRow
from dept_serve.engine import EngineRow, ServedAdapter, ServingEngine
from dept_serve.errors import (
    ConflictError,
    ForbiddenError,
    InvalidInputError,
    NotFoundError,
    ServeError,
    UnknownAdapterError,
)
from dept_serve.metrics import UNKNOWN_ADAPTER, ServerMetrics
from dept_serve.schemas import Limits
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

    async def start(self) -> None:
        await self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()

    # ----------------------------------------------------------------------------------------------- requests
    def loaded(self) -> list[str]:
        return sorted(name for name in self.engine.adapters if name not in self._draining)

    def _adapter(self, name: str, endpoint: str) -> ServedAdapter:
        if name not in self.engine.adapters or name in self._draining:
            raise UnknownAdapterError(name, self.loaded())
        adapter = self.engine.adapters[name]
        if adapter.endpoint != endpoint:
            raise InvalidInputError(f"Adapter {name!r} is a {adapter.config.task_type!r} adapter: send its inputs "
                                    f"to /v1/{adapter.endpoint}, not /v1/{endpoint}.")
        return adapter

    async def generate(self, request) -> dict:
        if request.max_new_tokens > self.limits.max_new_tokens or request.num_beams > self.limits.max_num_beams:
            raise InvalidInputError(f"This server allows max_new_tokens <= {self.limits.max_new_tokens} and "
                                    f"num_beams <= {self.limits.max_num_beams}.")
        key = ("generate", request.max_new_tokens, request.num_beams)
        return await self._answer("generate", request, key)

    async def score(self, request) -> dict:
        return await self._answer("score", request, ("score",))

    async def _answer(self, endpoint: str, request, key: Hashable) -> dict:
        start = time.perf_counter()
        label = request.adapter if request.adapter in self.engine.adapters else UNKNOWN_ADAPTER
        status = 500
        try:
            adapter = self._adapter(request.adapter, endpoint)
            self._enter(adapter.name, len(request.inputs))  # before any await: an unload now waits for us
            try:
                ids = self.engine.encode(adapter, request.inputs)
                visuals = await self._visuals(adapter, request)
                rows = await self.batcher.submit(key, [EngineRow(adapter.name, row_ids, visual)
                                                       for row_ids, visual in zip(ids, visuals)])
            finally:
                self._leave(adapter.name, len(request.inputs))
            answer = {"adapter": adapter.name, "outputs": [row.future.result() for row in rows],
                      "timing": _timing(rows, start)}
            status = 200
            self.metrics.latency.labels(endpoint, label).observe(time.perf_counter() - start)
            return answer
        except ServeError as err:
            status = err.status_code
            raise
        finally:
            self.metrics.requests.labels(endpoint, label, str(status)).inc()

    async def _visuals(self, adapter: ServedAdapter, request) -> list:
        """Each input's (features, boxes) for a VL adapter, from its uploaded image or its feature id."""
        images, feature_ids = getattr(request, "images", None), getattr(request, "feature_ids", None)
        if self.engine.modality != "vl":
            if images or feature_ids:
                raise InvalidInputError("This server's base model reads text only: drop images and feature_ids.")
            return [None] * len(request.inputs)
        if (images is None) == (feature_ids is None):
            raise InvalidInputError(f"Adapter {adapter.name!r} reads an image with each input: send either images "
                                    "(base64 files) or feature_ids, one per input.")
        given = images if images is not None else feature_ids
        if len(given) != len(request.inputs):
            raise InvalidInputError(f"{len(request.inputs)} inputs but {len(given)} "
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
        except (AdapterMismatchError, ConfigError, ValueError) as err:
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


def _timing(rows: list[QueuedRow], start: float) -> dict:
    batches = {row.started: row.compute_s for row in rows}
    return {"queue_ms": 1000 * max(row.started - row.enqueued for row in rows),
            "compute_ms": 1000 * sum(batches.values()), "total_ms": 1000 * (time.perf_counter() - start),
            "batch_sizes": [row.batch_size for row in rows]}
