"""Tiny saved bases with four adapters each, and an in-process server to call over ASGI."""

from __future__ import annotations

import contextlib
from pathlib import Path

import httpx
import pytest

from dept_serve import DePTService, Limits, ServingEngine, create_app
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
