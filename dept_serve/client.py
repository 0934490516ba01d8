"""A small Python client for `dept-serve` (httpx), one method per endpoint.

    >>> client = DePTServeClient("http://127.0.0.1:8000")  # doctest: +SKIP
    >>> client.generate("sst2", ["sentence: a gorgeous, witty film"], max_new_tokens=3)["outputs"][0]["text"]  # doctest: +SKIP
    '1'
"""

from __future__ import annotations

import base64
import subprocess
import time
from pathlib import Path

import httpx


class DePTServeError(RuntimeError):
    """A refused request: `status_code` and the server's JSON answer (`body["error"]` says why)."""

    def __init__(self, status_code: int, body: dict):
        super().__init__(f"{status_code}: {body.get('error', body)}")
        self.status_code, self.body = status_code, body


class DePTServeClient:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", timeout: float = 60.0, client: httpx.Client | None = None):
        self.http = client or httpx.Client(base_url=base_url, timeout=timeout)

    def _call(self, method: str, path: str, **kwargs) -> dict:
        response = self.http.request(method, path, **kwargs)
        body = response.json()
        if response.status_code >= 400:
            raise DePTServeError(response.status_code, body)
        return body

    def generate(self, adapter: str, inputs: list[str], max_new_tokens: int | None = None, num_beams: int = 1,
                 images: list[str | Path | bytes] | None = None, feature_ids: list[str] | None = None) -> dict:
        """Generate for each input; VL adapters take one image (a path or the file's bytes) or feature id each.
        `max_new_tokens=None` takes the server's default (20, or its limit if lower)."""
        body = {"adapter": adapter, "inputs": inputs, "num_beams": num_beams}
        if max_new_tokens is not None:
            body["max_new_tokens"] = max_new_tokens
        if images is not None:
            body["images"] = [base64.b64encode(image if isinstance(image, bytes) else Path(image).read_bytes()).decode()
                              for image in images]
        if feature_ids is not None:
            body["feature_ids"] = feature_ids
        return self._call("POST", "/v1/generate", json=body)

    def score(self, adapter: str, inputs: list[str]) -> dict:
        return self._call("POST", "/v1/score", json={"adapter": adapter, "inputs": inputs})

    def adapters(self) -> dict:
        return self._call("GET", "/v1/adapters")

    def load_adapter(self, name: str, path: str) -> dict:
        """Load the adapter at `path`, relative to the server's --adapter_root."""
        return self._call("POST", "/v1/adapters", json={"name": name, "path": path})

    def unload_adapter(self, name: str) -> dict:
        return self._call("DELETE", f"/v1/adapters/{name}")

    def health(self) -> dict:
        return self._call("GET", "/healthz")


def wait_until_healthy(url: str, timeout_s: float = 120, process: subprocess.Popen | None = None) -> None:
    """Wait until the server at `url` answers /healthz; fail early if its `process` exits first."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"dept-serve exited with status {process.returncode} before answering at {url}.")
        if time.monotonic() > deadline:
            raise TimeoutError(f"dept-serve did not answer at {url} within {timeout_s:.0f} s.")
        time.sleep(0.2)
