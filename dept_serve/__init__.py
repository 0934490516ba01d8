"""`dept-serve`: many DePT adapters over one frozen base model, over HTTP, in mixed dynamic batches.

The layers, each usable alone: `ServingEngine` (the model: tokenizing, mixed batches through
`dept.MultiAdapterModel`), `DePTService` (checks, dynamic batching, live loading and unloading), `create_app`
(the FastAPI routes; `dept_serve.openai_api` adds OpenAI's completions and models), `dept_serve.cli` (the command
line) and `DePTServeClient` (a Python client).

Each is imported on first use (`from dept_serve import ServingEngine`): FastAPI and the base models' code cost
more than `import torch`, and `dept-serve --help` needs neither.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dept.extras import LazyModule
from dept_serve.limits import Limits

if TYPE_CHECKING:
    from dept_serve.app import create_app
    from dept_serve.client import DePTServeClient, DePTServeError
    from dept_serve.engine import EngineRow, ServingEngine
    from dept_serve.service import DePTService

_MODULES = {
    "create_app": LazyModule("dept_serve.app"),
    "DePTServeClient": LazyModule("dept_serve.client"),
    "DePTServeError": LazyModule("dept_serve.client"),
    "EngineRow": LazyModule("dept_serve.engine"),
    "ServingEngine": LazyModule("dept_serve.engine"),
    "DePTService": LazyModule("dept_serve.service"),
}


def __getattr__(name: str):
    if name in _MODULES:
        return getattr(_MODULES[name], name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DePTServeClient", "DePTServeError", "DePTService", "EngineRow", "Limits", "ServingEngine", "create_app"]
