"""Bad input gets a clear JSON error, is refused before any compute, and leaves the server healthy."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import T5ForConditionalGeneration

from dept import DePTConfig, get_dept_model
from dept.errors import FlagError
from dept_serve import ServingEngine
from dept_serve.cli import build_app, main, parse_args
from dept_serve.engine import same_base
from dept_serve.errors import InvalidInputError
from dept_serve.schemas import BASE64_PATTERN, base64_file
from tests.conftest import tiny_t5_config
from tests.serve.conftest import TEXTS, save_adapter, save_base, served, t5_engine


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


# ------------------------------------------------------------------------------------------ issue 21: hostile input
def _official_dir(directory, weights: bytes):
    """An official-format adapter (config + adapter_model.bin) for the tiny T5 (d 32), with these weight bytes."""
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text(json.dumps({
        "peft_type": "PROMPT_TUNING_LORA", "task_type": "SEQ_2_SEQ_LM", "num_virtual_tokens": 4, "r": 2,
        "max_length": 16, "lora_alpha": 8, "token_dim": 32}))
    (directory / "adapter_model.bin").write_bytes(weights)
    return directory


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_a_damaged_official_adapter_is_a_422_naming_the_file_and_what_is_wrong(t5_adapters, tmp_path):
    whole = _torch_bytes({"prompt_embeddings": torch.zeros(4, 32), "prompt_encoder.lora_embedding_A": torch.zeros(16, 2),
                          "prompt_encoder.lora_embedding_B": torch.zeros(2, 32)})
    _official_dir(tmp_path / "fine", whole)
    _official_dir(tmp_path / "truncated", whole[: len(whole) // 2])
    _official_dir(tmp_path / "a_list", _torch_bytes([torch.zeros(4, 32)]))
    _official_dir(tmp_path / "not_tensors", _torch_bytes({"prompt_embeddings": [0.0, 1.0]}))

    async def call(service, client):
        return {name: await client.post("/v1/adapters", json={"name": name, "path": name})
                for name in ("truncated", "a_list", "not_tensors", "fine")}

    responses = _run(call, t5_engine(t5_adapters, ["short_prompt"]), adapter_root=tmp_path)
    assert responses["fine"].status_code == 201, responses["fine"].text  # the format itself is served
    for name, what in [("truncated", "is damaged (RuntimeError"), ("a_list", "holds a list, not a dict of tensors"),
                       ("not_tensors", "prompt_embeddings (list)")]:
        assert responses[name].status_code == 422, responses[name].text
        error = responses[name].json()["error"]
        assert str(tmp_path / name / "adapter_model.bin") in error and what in error, error


def _adapter_on_another_base(tmp_path):
    """An adapter trained on a second tiny T5: same d, vocabulary and model type, other weights (seed 1)."""
    other = save_base("seq2seq", tmp_path / "other_base", seed=1)
    return save_adapter("seq2seq", other, tmp_path / "root" / "other_base_adapter", seed=7,
                        num_virtual_tokens=3, r=2, max_length=16)


def test_an_adapter_for_another_base_of_the_same_shape_is_refused_unless_allowed(t5_adapters, tmp_path):
    base, _, adapters = t5_adapters
    adapter = _adapter_on_another_base(tmp_path)
    with pytest.raises(FlagError, match="--allow_other_base") as refused:  # at start-up: an --adapter to fix
        build_app(parse_args(["--model_name_or_path", str(base), "--adapter", f"other={adapter}"]))
    assert f"trained on the base model {str(tmp_path / 'other_base')!r}" in str(refused.value)
    assert "other" in ServingEngine.load(str(base), {"other": adapter}, allow_other_base=True).adapters

    async def call(service, client):
        return await client.post("/v1/adapters", json={"name": "other", "path": adapter.name})

    refused = _run(call, t5_engine(t5_adapters, ["short_prompt"]), adapter_root=tmp_path / "root")
    assert refused.status_code == 422 and "--allow_other_base" in refused.json()["error"]
    allowed_engine = t5_engine(t5_adapters, ["short_prompt"])
    allowed_engine.allow_other_base = True
    assert _run(call, allowed_engine, adapter_root=tmp_path / "root").status_code == 201
    assert "other" in allowed_engine.adapters
    same = save_adapter("seq2seq", base, tmp_path / "root" / "same", seed=8, num_virtual_tokens=2, r=2, max_length=16)
    assert "same" in ServingEngine.load(str(base) + "/", {"same": same}).adapters  # the same directory, spelt apart


@pytest.mark.parametrize("recorded, served, same", [
    ("t5-base", "t5-base", True),
    ("t5-base", "google-t5/t5-base", True),  # the hub's legacy id and its namespaced one
    ("google-t5/t5-base", "/models/t5-base", True),  # a local copy under the model's name
    ("t5-base", "/cache/hub/models--google-t5--t5-base/snapshots/abc123", True),
    ("t5-base", "t5-large", False),
    ("google-t5/t5-base", "someone/t5-base", False),
])
def test_base_names_match_across_hub_ids_copies_and_cache_snapshots(recorded, served, same):
    assert same_base(recorded, served) is same


def test_two_different_directories_are_different_bases_whatever_their_names(tmp_path):
    (tmp_path / "a" / "base").mkdir(parents=True)
    (tmp_path / "b" / "base").mkdir(parents=True)
    assert not same_base(str(tmp_path / "a" / "base"), str(tmp_path / "b" / "base"))
    assert same_base(str(tmp_path / "a" / "base"), str(tmp_path / "a" / ".." / "a" / "base"))


def test_a_lone_surrogate_is_a_422_naming_where_it_is(t5_adapters):
    async def call(service, client):
        raw = b'{"adapter": "long_prompt", "inputs": ["sentence: fine", "a \\ud800 b"]}'
        name = b'{"adapter": "long_\\udc00", "inputs": ["x"], "\\ud83d": 1}'  # echoed in the answer: must not break it
        return [await client.post("/v1/generate", content=body, headers={"content-type": "application/json"})
                for body in (raw, name)]

    surrogate, echoed = _run(call, t5_engine(t5_adapters))
    assert surrogate.status_code == 422
    assert "inputs.1: holds a lone surrogate (U+D800) at character 2" in surrogate.json()["error"]
    assert echoed.status_code == 422 and "error" in json.loads(echoed.content.decode("utf-8"))


def test_an_adapter_path_over_the_file_systems_name_limit_is_a_404(t5_adapters, tmp_path):
    async def call(service, client):
        return [await client.post("/v1/adapters", json={"name": "x", "path": path})
                for path in ("a" * 300, "sub/" + "b" * 300 + "/c")]

    too_long, under_missing = _run(call, t5_engine(t5_adapters, ["short_prompt"]), adapter_root=tmp_path)
    assert too_long.status_code == 404 and "cannot be read: File name too long" in too_long.json()["error"]
    assert under_missing.status_code == 404 and "does not exist" in under_missing.json()["error"]


def test_inputs_are_tokenized_off_the_event_loop_and_a_huge_one_is_refused_before_tokenizing(t5_adapters):
    engine = t5_engine(t5_adapters, ["short_prompt"])
    threads = []
    tokenizer = engine._request_tokenizer
    engine._request_tokenizer = lambda *args, **kwargs: threads.append(threading.current_thread()) or tokenizer(
        *args, **kwargs)
    max_chars = engine.max_input_chars(engine.adapters["short_prompt"])
    assert max_chars == 16 * (max(map(len, tokenizer.get_vocab())) + 1)

    async def call(service, client):
        loop_thread = threading.current_thread()
        fine = await client.post("/v1/generate", json={"adapter": "short_prompt", "inputs": [TEXTS[0]]})
        tokenized = list(threads)
        huge = await client.post("/v1/generate", json={"adapter": "short_prompt", "inputs": ["a" * (max_chars + 1)]})
        return loop_thread, fine, tokenized, huge

    loop_thread, fine, tokenized, huge = _run(call, engine)
    assert fine.status_code == 200 and tokenized and all(t is not loop_thread for t in tokenized)
    assert {t.name.split("_")[0] for t in tokenized} == {"dept-serve-tokenize"}
    assert huge.status_code == 422 and len(threads) == len(tokenized)  # refused with no tokenizer call
    body = huge.json()
    assert body["num_characters"] == max_chars + 1 and body["max_characters"] == max_chars
    assert f"{max_chars + 1} characters" in body["error"] and "max_length is 16 tokens" in body["error"]


def test_an_input_at_the_character_bound_is_still_judged_by_its_tokens(t5_adapters):
    """The bound only refuses what cannot fit: the longest word repeated up to max_length tokens is taken, and a
    text of exactly max_chars characters is tokenized and refused by its token count."""
    engine = t5_engine(t5_adapters, ["short_prompt"])
    adapter = engine.adapters["short_prompt"]
    longest = max(engine.tokenizer.get_vocab(), key=len)
    fits = " ".join([longest] * 15)  # 15 tokens + eos = max_length 16
    assert len(engine.encode(adapter, [fits])[0]) == 16
    with pytest.raises(InvalidInputError, match="tokens, but adapter 'short_prompt' has max_length 16"):
        engine.encode(adapter, ["a " * (engine.max_input_chars(adapter) // 2)])


def test_unparsable_bodies_are_400s_with_the_error_field_and_the_spec_says_so(t5_adapters):
    async def call(service, client):
        bodies = [b'{"adapter": "\xff"}', b"[" * 100_000]  # not UTF-8; nested past Python's recursion limit
        answers = [await client.post(path, content=body, headers={"content-type": "application/json"})
                   for body in bodies for path in ("/v1/generate", "/v1/adapters")]
        return answers, (await client.get("/openapi.json")).json()

    answers, spec = _run(call, t5_engine(t5_adapters, ["short_prompt"]))
    assert [a.status_code for a in answers] == [400] * 4
    assert "not valid UTF-8" in answers[0].json()["error"] and "too deeply" in answers[2].json()["error"]
    for path in ("/v1/generate", "/v1/score", "/v1/adapters"):
        assert spec["paths"][path]["post"]["responses"]["400"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorResponse"}


def test_options_answers_each_paths_methods_and_other_methods_are_405s_with_allow(t5_adapters):
    async def call(service, client):
        return {(method, path): await client.request(method, path)
                for method, path in [("OPTIONS", "/v1/adapters"), ("OPTIONS", "/v1/adapters/x"),
                                     ("OPTIONS", "/v1/generate"), ("PUT", "/v1/adapters"),
                                     ("GET", "/v1/generate"), ("OPTIONS", "/no/such/path")]}

    answers = _run(call, t5_engine(t5_adapters, ["short_prompt"]))
    assert answers["OPTIONS", "/v1/adapters"].status_code == 204
    assert answers["OPTIONS", "/v1/adapters"].headers["allow"] == "GET, OPTIONS, POST"  # two routes, one path
    assert answers["OPTIONS", "/v1/adapters/x"].headers["allow"] == "DELETE, OPTIONS"
    assert answers["OPTIONS", "/v1/generate"].headers["allow"] == "OPTIONS, POST"
    put = answers["PUT", "/v1/adapters"]
    assert put.status_code == 405 and put.headers["allow"] == "GET, OPTIONS, POST"
    assert "PUT is not allowed on /v1/adapters: use GET, POST" in put.json()["error"]
    assert answers["GET", "/v1/generate"].status_code == 405
    assert answers["OPTIONS", "/no/such/path"].status_code == 404 and "error" in answers["OPTIONS", "/no/such/path"].json()


def test_invalid_base64_images_are_refused_as_invalid_base64_by_the_spec_and_the_server(t5_adapters):
    async def call(service, client):
        answers = [await client.post("/v1/generate", json={"adapter": "long_prompt", "inputs": ["x"], "images": [image]})
                   for image in ("%%%", "QUJD=", "QUJDRA", "QU JD", "")]
        return answers, (await client.get("/openapi.json")).json()

    answers, spec = _run(call, t5_engine(t5_adapters, ["long_prompt"]))
    for answer in answers:
        assert answer.status_code == 422 and "images.0: is not valid base64" in answer.json()["error"], answer.text
    schema = spec["components"]["schemas"]["GenerateRequest"]["properties"]["images"]["anyOf"][0]["items"]
    assert schema["pattern"] == BASE64_PATTERN and schema["contentEncoding"] == "base64"
    for data in (b"x", b"xy", b"xyz", bytes(range(256))):  # every padding, every byte: the pattern takes them
        encoded = base64.b64encode(data).decode()
        assert re.fullmatch(BASE64_PATTERN, encoded) and base64_file(encoded) == data


def _near_base64():
    """Valid encodings, the same with one character changed, added or dropped, and free text of its characters."""
    encoded = st.binary(max_size=10).map(lambda data: base64.b64encode(data).decode())
    characters = "QUJDRAab09+/=%- \n\u00e9"
    edited = st.tuples(encoded, st.integers(0, 20), st.sampled_from(characters), st.sampled_from(["put", "add", "drop"]))
    return st.one_of(encoded, edited.map(lambda e: _edit(*e)), st.text(alphabet=characters, max_size=12))


def _edit(text: str, at: int, character: str, how: str) -> str:
    at = min(at, len(text))
    return text[:at] + ("" if how == "drop" else character) + text[at + (how != "add"):]


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(_near_base64())
def test_the_server_takes_exactly_the_base64_the_spec_pattern_admits(data):
    try:
        base64_file(data)
        taken = True
    except ValueError:
        taken = False
    assert taken == bool(re.fullmatch(BASE64_PATTERN, data))
