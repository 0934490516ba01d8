"""Bad input gets a clear JSON error, is refused before any compute, and leaves the server healthy."""

from __future__ import annotations

import asyncio
import json
import os

import pytest
from transformers import T5ForConditionalGeneration

from dept import DePTConfig, get_dept_model
from dept_serve.cli import main
from tests.conftest import tiny_t5_config
from tests.serve.conftest import served, t5_engine
from tests.serve.fixtures import TEXTS


class ForwardCounter:
    """Counts forward passes of the base model's encoder, to prove a refusal computed nothing."""

    def __init__(self, engine):
        self.calls = 0
        engine.base_model.get_encoder().register_forward_hook(self._count)

    def _count(self, *args):
        self.calls += 1


def _run(coroutine_function, engine, **kwargs):
    async def main():
        async with served(engine, **kwargs) as (service, client):
            result = await coroutine_function(service, client)
            health = await client.get("/healthz")
            assert health.status_code == 200 and health.json()["status"] == "ok"  # still healthy afterwards
            return result
    return asyncio.run(main())


def test_unknown_adapter_is_a_404_listing_the_loaded_ones(t5_adapters):
    async def call(service, client):
        return await client.post("/v1/generate", json={"adapter": "sst3", "inputs": ["sentence: fine"]})

    response = _run(call, t5_engine(t5_adapters, ["long_prompt", "short_prompt"]))
    assert response.status_code == 404
    body = response.json()
    assert body["loaded_adapters"] == ["long_prompt", "short_prompt"]
    assert "'sst3'" in body["error"] and "long_prompt" in body["error"]


def test_an_input_over_the_adapters_max_length_is_a_422_naming_it_and_nothing_runs(t5_adapters):
    engine = t5_engine(t5_adapters)
    counter = ForwardCounter(engine)

    async def call(service, client):
        too_long = "sentence: " + "the movie was great " * 4  # 18 tokens > short_prompt's 16
        return await client.post("/v1/generate", json={"adapter": "short_prompt", "inputs": [TEXTS[0], too_long]})

    response = _run(call, engine)
    assert response.status_code == 422
    body = response.json()
    assert body["max_length"] == 16 and "max_length 16" in body["error"] and "inputs[1]" in body["error"]
    assert counter.calls == 0  # the request's valid first input did not run either


def test_a_body_over_the_limit_is_a_413_and_the_next_request_is_answered(t5_adapters):
    async def call(service, client):
        big = await client.post("/v1/generate", json={"adapter": "long_prompt", "inputs": ["sentence: great" * 300]})

        async def chunks():  # no content-length: the limit must hold on a streamed body too
            for _ in range(10):
                yield b" " * 500

        streamed = await client.post("/v1/generate", content=chunks(), headers={"content-type": "application/json"})
        fine = await client.post("/v1/generate", json={"adapter": "long_prompt", "inputs": [TEXTS[0]]})
        return big, streamed, fine

    big, streamed, fine = _run(call, t5_engine(t5_adapters), max_body_bytes=2000)
    for response in (big, streamed):
        assert response.status_code == 413
        assert "2000 bytes" in response.json()["error"]
    assert fine.status_code == 200


def test_requests_that_do_not_fit_the_schema_or_the_adapter_kind_are_422s(t5_adapters):
    async def call(service, client):
        return [await client.post("/v1/generate", json=body) for body in (
            {"adapter": "long_prompt", "inputs": []},
            {"adapter": "long_prompt", "inputs": ["x"], "max_new_tokens": 0},
            {"adapter": "long_prompt", "inputs": ["x"], "temperature": 2},
            {"adapter": "long_prompt", "inputs": ["x"], "feature_ids": ["img"]},
        )] + [await client.post("/v1/score", json={"adapter": "long_prompt", "inputs": ["x"]}),
              await client.post("/v1/generate", content=b"{not json", headers={"content-type": "application/json"})]

    responses = _run(call, t5_engine(t5_adapters))
    assert [r.status_code for r in responses] == [422] * 6
    errors = [r.json()["error"] for r in responses]
    assert "inputs" in errors[0] and "max_new_tokens" in errors[1] and "temperature" in errors[2]
    assert "reads text only" in errors[3]
    assert "send its inputs to /v1/generate" in errors[4]


def _other_base_adapter(directory):
    """An adapter attached to a T5 with another d (16, not 32): it fits no adapter of the served base."""
    model = get_dept_model(T5ForConditionalGeneration(tiny_t5_config(40, d_model=16)),
                           DePTConfig(num_virtual_tokens=2, r=2, max_length=16, prompt_init="random"))
    return model.save_pretrained(directory)


def test_an_adapter_for_another_base_or_modality_is_refused_at_load_before_any_compute(t5_adapters, tmp_path):
    root = tmp_path / "root"
    _other_base_adapter(root / "other_d")
    vl = _other_base_adapter(root / "vl_adapter")
    (vl / "training_task.json").write_text(json.dumps({"task_names": ["vqa"], "modality": "vl", "feat_dim": 16}))
    engine = t5_engine(t5_adapters)
    counter = ForwardCounter(engine)

    async def call(service, client):
        responses = [await client.post("/v1/adapters", json={"name": name, "path": name})
                     for name in ("other_d", "vl_adapter")]
        return responses, (await client.get("/v1/adapters")).json()

    (other_d, vl_response), listed = _run(call, engine, adapter_root=root)
    assert other_d.status_code == vl_response.status_code == 422
    assert "token_dim=16" in other_d.json()["error"] and "token_dim=32" in other_d.json()["error"]
    assert "is a vl adapter" in vl_response.json()["error"]
    assert counter.calls == 0
    assert sorted(a["name"] for a in listed["adapters"]) == sorted(engine.adapters)
    assert "other_d" not in engine.multi.adapters


def test_no_path_outside_the_adapter_root_can_be_loaded(t5_adapters, tmp_path):
    base, _, adapters = t5_adapters
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(adapters["long_prompt"], root / "escape")  # a symlink out of the root is outside it too
    (root / "sub").mkdir()

    async def call(service, client):
        paths = ["../" + adapters["long_prompt"].name, str(adapters["long_prompt"]), "escape", "sub/../../x",
                 "nul\u0000byte"]
        return [await client.post("/v1/adapters", json={"name": "x", "path": path}) for path in paths]

    responses = _run(call, t5_engine(t5_adapters, ["short_prompt"]), adapter_root=root)
    assert [r.status_code for r in responses[:4]] == [403] * 4
    assert all("outside --adapter_root" in r.json()["error"] for r in responses[:4])
    assert responses[4].status_code == 422

    async def without_root(service, client):
        return await client.post("/v1/adapters", json={"name": "x", "path": "long_prompt"})

    refused = _run(without_root, t5_engine(t5_adapters, ["short_prompt"]))
    assert refused.status_code == 403 and "--adapter_root" in refused.json()["error"]


def test_loading_under_a_taken_name_is_a_409_and_a_missing_dir_a_404(t5_adapters):
    _, root, _ = t5_adapters

    async def call(service, client):
        taken = await client.post("/v1/adapters", json={"name": "long_prompt", "path": "short_prompt"})
        missing = await client.post("/v1/adapters", json={"name": "fresh", "path": "no_such_adapter"})
        gone = await client.delete("/v1/adapters/no_such_adapter")
        return taken, missing, gone

    taken, missing, gone = _run(call, t5_engine(t5_adapters), adapter_root=root)
    assert taken.status_code == 409 and "already loaded" in taken.json()["error"]
    assert missing.status_code == 404 and "does not exist" in missing.json()["error"]
    assert gone.status_code == 404 and gone.json()["loaded_adapters"]


@pytest.mark.parametrize("argv, message", [
    (["--adapter", "no_equals_sign"], "NAME=DIR"),
    (["--adapter", "a=x", "--adapter", "a=y"], "unique"),
    (["--max_batch_size", "0"], "--max_batch_size must be >= 1"),
    (["--max_wait_ms", "-1"], "--max_wait_ms must be >= 0"),
])
def test_bad_flags_fail_at_parse_time(argv, message, capsys):
    assert main(["--model_name_or_path", "m", *argv]) == 2  # the console contract: one line, exit status 2
    assert message in capsys.readouterr().err
