"""`dept-serve`: many DePT adapters over one frozen base model, over HTTP, in mixed dynamic batches.

The layers, each usable alone: `ServingEngine` (the model: tokenizing, mixed batches through
`dept.MultiAdapterModel`), `DePTService` (checks, dynamic batching, live loading and unloading), `create_app`
(the FastAPI routes; `dept_serve.openai_api` adds OpenAI's completions and models), `dept_serve.cli` (the command
line) and `DePTServeClient` (a Python client).
"""

from dept_serve.app import create_app
from dept_serve.client import DePTServeClient, DePTServeError
from dept_serve.engine import EngineRow, ServingEngine
from dept_serve.schemas import Limits
from dept_serve.service import DePTService

__all__ = ["DePTServeClient", "DePTServeError", "DePTService", "EngineRow", "Limits", "ServingEngine", "create_app"]
