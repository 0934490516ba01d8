"""Errors that become JSON answers: each carries its HTTP status and, where it helps, more fields."""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import JSONResponse


class ErrorJSONResponse(JSONResponse):
    """A JSON error answer, ASCII-escaped: it may quote what the client sent, and that can be a lone surrogate
    (JSON's `"\\ud800"`) that UTF-8 cannot encode, so the answer must never depend on it encoding."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


class ServeError(Exception):
    """A request the server refuses; `status_code` and `extra` go into the JSON error answer."""

    status_code = 400

    def __init__(self, message: str, **extra):
        super().__init__(message)
        self.message = message
        self.extra = extra


class UnknownAdapterError(ServeError):
    """The request names an adapter that is not loaded; the answer lists the loaded ones."""

    status_code = 404

    def __init__(self, name: str, loaded: list[str]):
        super().__init__(f"No adapter named {name!r} is loaded. Loaded adapters: {loaded}. Load one with "
                         "POST /v1/adapters.", loaded_adapters=loaded)


class InvalidInputError(ServeError):
    """An input the adapter cannot take: too long for its max_length, the wrong kind, a corrupt image."""

    status_code = 422


class ConflictError(ServeError):
    status_code = 409


class ForbiddenError(ServeError):
    status_code = 403


class NotFoundError(ServeError):
    status_code = 404
