"""`dept-serve` for real: the console script, uvicorn on 127.0.0.1 on a free port, the Python client, and the
OpenAPI spec fuzzed with schemathesis (no 500s)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from prometheus_client.parser import text_string_to_metric_families
from schemathesis import GenerationMode

from dept_serve import DePTServeClient, DePTServeError
from dept_serve.client import wait_until_healthy
from tests.conftest import free_port
from tests.serve.fixtures import TEXTS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(t5_adapters):
    """The console script next to this Python, serving two adapters (more may be loaded from the root)."""
    base, root, adapters = t5_adapters
    port = free_port()
    script = Path(sys.executable).with_name("dept-serve")
    argv = [str(script), "--model_name_or_path", str(base), "--adapter", f"long_prompt={adapters['long_prompt']}",
            "--adapter", f"short_prompt={adapters['short_prompt']}", "--adapter_root", str(root),
            "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--max_batch_size", "4",
            "--max_inputs", "4", "--max_new_tokens", "6", "--max_num_beams", "2", "--log_level", "warning"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_until_healthy(url, timeout_s=120, process=process)
        except (RuntimeError, TimeoutError) as err:
            process.kill()
            pytest.fail(f"{err}\n{process.communicate()[0][-3000:]}")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_the_console_script_serves_over_loopback_as_offline_generate(server, t5_reference):
    client = DePTServeClient(server)
    answer = client.generate("short_prompt", TEXTS[:3], max_new_tokens=6)
    assert [o["token_ids"] for o in answer["outputs"]] == [t5_reference.generate("short_prompt", t, 6)
                                                           for t in TEXTS[:3]]
    assert client.load_adapter("loaded_live", "update_only")["max_length"] == 20
    live = client.generate("loaded_live", TEXTS[3:4], max_new_tokens=6)
    assert live["outputs"][0]["token_ids"] == t5_reference.generate("update_only", TEXTS[3], 6)
    assert "loaded_live" not in [a["name"] for a in client.unload_adapter("loaded_live")["adapters"]]
    with pytest.raises(DePTServeError, match="No adapter named 'loaded_live'") as refused:
        client.generate("loaded_live", TEXTS[:1])
    assert refused.value.status_code == 404
    assert client.health() == {"status": "ok", "adapters": 2, "queue_depth": 0}

    metrics = httpx.get(f"{server}/metrics").text
    families = {family.name: family for family in text_string_to_metric_families(metrics)}
    assert {"dept_serve_requests", "dept_serve_request_latency_seconds", "dept_serve_batch_size",
            "dept_serve_rows"} <= set(families)
    requests = {tuple(sorted(s.labels.items())): s.value for s in families["dept_serve_requests"].samples
                if s.name == "dept_serve_requests_total"}
    assert requests[(("adapter", "short_prompt"), ("endpoint", "generate"), ("status", "200"))] == 1
    assert requests[(("adapter", "<unknown>"), ("endpoint", "generate"), ("status", "404"))] == 1


def test_fuzzed_requests_never_get_a_server_error(server):
    """Every operation of the spec, with bodies that fit it (positive) and bodies that break it (negative)."""
    schema = schemathesis.openapi.from_url(f"{server}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {operation.label for operation in operations} == {
        "POST /v1/generate", "POST /v1/score", "GET /v1/adapters", "POST /v1/adapters",
        "DELETE /v1/adapters/{name}", "GET /healthz", "GET /metrics"}
    statuses = set()
    for operation in operations:
        for mode in GenerationMode:
            if mode is GenerationMode.NEGATIVE and not operation.body.items:
                continue  # nothing to break: the GET operations take no input, DELETE's name is any string
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                      database=None)
            def fuzz(case):
                response = case.call_and_validate(base_url=server, checks=[schemathesis.checks.not_a_server_error])
                statuses.add(response.status_code)

            fuzz()
    assert {200, 422} <= statuses  # both accepted and refused requests were generated
    assert httpx.get(f"{server}/healthz").status_code == 200
