"""Tiny saved bases with four adapters each, an in-process server to call over ASGI, and one on loopback."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from dept_serve import DePTService, Limits, ServingEngine, create_app
from tests.conftest import free_port
from tests.serve.fixtures import OfflineReference, save_adapters, save_base


@pytest.fixture(scope="session")
def t5_adapters(tmp_path_factory):
    """(base dir, adapter root, {name: dir}) for a tiny T5; the adapters live under the root."""
    root = tmp_path_factory.mktemp("serve_t5")
    base = save_base("seq2seq", root / "base")
    return base, root / "adapters", save_adapters("seq2seq", base, root / "adapters")


@pytest.fixture(scope="session")
def t5_reference(t5_adapters):
    base, _, adapters = t5_adapters
    return OfflineReference("seq2seq", base, adapters)


def t5_engine(t5_adapters, names=None) -> ServingEngine:
    base, _, adapters = t5_adapters
    chosen = {name: path for name, path in adapters.items() if names is None or name in names}
    return ServingEngine.load(str(base), chosen, device="cpu")


@contextlib.asynccontextmanager
async def served(engine: ServingEngine, adapter_root: Path | None = None, **limits):
    """(service, client): the app over ASGI, its batcher running, as the app's lifespan would start it."""
    service = DePTService(engine, Limits(**limits), adapter_root=adapter_root)
    app = create_app(service)
    await service.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://dept-serve") as client:
            yield service, client
    finally:
        await service.stop()


@contextlib.contextmanager
def on_loopback(engine: ServingEngine, adapter_root: Path | None = None, **limits) -> Iterator[str]:
    """The app served by uvicorn on 127.0.0.1 (a free port) from a thread of this process; yields its URL."""
    server = uvicorn.Server(uvicorn.Config(create_app(DePTService(engine, Limits(**limits), adapter_root)),
                                           host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
