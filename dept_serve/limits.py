"""The server's limits: what one request may ask for, and how batches form. Plain data, without pydantic, so that
`dept-serve --help` shows their defaults without importing the server (`dept_serve.schemas` puts them in the API's
request models)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, and how batches form."""

    max_inputs: int = 64
    max_new_tokens: int = 256
    max_num_beams: int = 8
    max_body_bytes: int = 16 * 2**20
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
