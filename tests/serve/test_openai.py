"""The OpenAI-compatible routes, through the real `openai` client against live servers on loopback: completions
(streamed and not) equal /v1/generate token for token, for T5 and LLaMA adapters, two per server."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from transformers import T5ForConditionalGeneration

from dept_serve import ServingEngine
from tests.conftest import T5_TOKENIZER_DIR, tiny_t5_config
from tests.serve.conftest import TEXTS, on_loopback, save_adapter, save_base, t5_engine

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("serve_openai")]  # shares module-scoped runs: one worker (--dist loadgroup)

NEW_TOKENS = 8
LIMITS = {"max_new_tokens": 12, "max_inputs": 8, "max_wait_ms": 20}
ADAPTERS = ("long_prompt", "short_prompt")


@pytest.fixture(scope="module")
def t5_server(t5_adapters):
    with on_loopback(t5_engine(t5_adapters, ADAPTERS), **LIMITS) as url:
        yield url


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    """Two decoder-only adapters, one of them in its own recorded causal template."""
    root = tmp_path_factory.mktemp("serve_llama_openai")
    base = save_base("causal", root / "llama")
    adapters = {"long_prompt": save_adapter("causal", base, root / "long_prompt", seed=0, num_virtual_tokens=8, r=4,
                                            max_length=32, causal_template="question: {source} answer : "),
                "short_prompt": save_adapter("causal", base, root / "short_prompt", seed=1, num_virtual_tokens=2, r=1,
                                             max_length=32)}
    with on_loopback(ServingEngine.load(str(base), adapters, device="cpu"), **LIMITS) as url:
        yield url


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def _generate(url: str, adapter: str, texts: list[str], max_new_tokens: int = NEW_TOKENS) -> list[dict]:
    response = httpx.post(f"{url}/v1/generate", json={"adapter": adapter, "inputs": texts,
                                                      "max_new_tokens": max_new_tokens}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["outputs"]


def _finish_reason(output: dict, eos_token_id: int = 1) -> str:
    return "stop" if output["token_ids"][-1:] == [eos_token_id] else "length"


def _streamed(client: openai.OpenAI, **request) -> dict[int, dict]:
    """Each choice's streamed text, token ids and finish_reason, by index."""
    choices: dict[int, dict] = {}
    for chunk in client.completions.create(stream=True, **request):
        assert chunk.object == "text_completion" and chunk.model == request["model"]
        for choice in chunk.choices:
            own = choices.setdefault(choice.index, {"text": "", "token_ids": [], "finish_reason": None})
            assert own["finish_reason"] is None  # nothing after a choice's last chunk
            own["text"] += choice.text
            own["token_ids"] += choice.model_extra["token_ids"]
            own["finish_reason"] = choice.finish_reason
    return choices


@pytest.mark.parametrize("server", ["t5_server", "llama_server"])
def test_completions_equal_v1_generate_token_for_token_streamed_or_not(server, request):
    url = request.getfixturevalue(server)
    client = _client(url)
    outputs = {name: _generate(url, name, TEXTS) for name in ADAPTERS}
    assert outputs["long_prompt"] != outputs["short_prompt"]  # two adapters, really apart

    def ask(name: str, stream: bool, prompts):
        if stream:
            return _streamed(client, model=name, prompt=prompts, max_tokens=NEW_TOKENS, temperature=0)
        return client.completions.create(model=name, prompt=prompts, max_tokens=NEW_TOKENS, temperature=0)

    # Both adapters, streamed and not, one prompt or a list, all at once: they share mixed batches.
    jobs = [(name, stream, prompts) for name in ADAPTERS for stream in (False, True)
            for prompts in (TEXTS, *TEXTS)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda job: ask(*job), jobs))
    for (name, stream, prompts), answer in zip(jobs, answers):
        expected = outputs[name] if isinstance(prompts, list) else [outputs[name][TEXTS.index(prompts)]]
        if stream:
            assert sorted(answer) == list(range(len(expected)))
            got = [answer[i] for i in range(len(expected))]
        else:
            assert answer.object == "text_completion" and answer.model == name and answer.id.startswith("cmpl-")
            assert [c.index for c in answer.choices] == list(range(len(expected)))
            got = [{"text": c.text, "token_ids": c.model_extra["token_ids"], "finish_reason": c.finish_reason}
                   for c in answer.choices]
            assert answer.usage.completion_tokens == sum(len(o["token_ids"]) for o in expected)
            assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
        for own, output in zip(got, expected):
            assert own == {"text": output["text"], "token_ids": output["token_ids"],
                           "finish_reason": _finish_reason(output)}, (name, stream, prompts)


def test_a_stream_is_server_sent_events_ending_with_done_and_the_usage_when_asked(t5_server):
    body = {"model": "short_prompt", "prompt": TEXTS[0], "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{t5_server}/v1/completions", json=body, timeout=120) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in events[:-1]]
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == sum(
        len(c["choices"][0]["token_ids"]) for c in chunks[:-1])
    assert usage["usage"]["prompt_tokens"] > 0 and len({c["id"] for c in chunks}) == 1


def test_stop_strings_end_the_text_before_them_streamed_or_not(t5_server):
    client = _client(t5_server)
    outputs = _generate(t5_server, "long_prompt", TEXTS)
    text, output = next((o["text"], o) for o in outputs if len(o["text"].split()) >= 3)
    stop = text.split()[1]
    expected = text[: text.index(stop)]
    answer = client.completions.create(model="long_prompt", prompt=TEXTS[outputs.index(output)], max_tokens=NEW_TOKENS,
                                       stop=[stop, "never appears"])
    (choice,) = answer.choices
    assert choice.text == expected and choice.finish_reason == "stop"
    tokens = choice.model_extra["token_ids"]
    assert tokens == output["token_ids"][: len(tokens)] and len(tokens) < len(output["token_ids"])
    streamed = _streamed(client, model="long_prompt", prompt=TEXTS[outputs.index(output)], max_tokens=NEW_TOKENS,
                         stop=stop)
    assert streamed[0] == {"text": expected, "token_ids": tokens, "finish_reason": "stop"}


def test_models_lists_the_loaded_adapters_in_openais_format(t5_server):
    client = _client(t5_server)
    models = client.models.list().data
    assert [m.id for m in models] == list(ADAPTERS) and {m.object for m in models} == {"model"}
    assert client.models.retrieve("short_prompt").id == "short_prompt"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("no_such_adapter")
    assert missing.value.code == "model_not_found" and "long_prompt" in missing.value.message


@pytest.mark.parametrize("options, param, message", [
    ({"temperature": 0.7}, "temperature", "this server decodes greedily"),
    ({"n": 2}, "n", "one choice per prompt"),
    ({"logprobs": 1}, "logprobs", "no log probabilities"),
    ({"echo": True}, "echo", "not repeated"),
    ({"max_tokens": LIMITS["max_new_tokens"] + 1}, "max_tokens", "less than or equal to 12"),
    ({"prompt": "sentence: " + "great " * 40}, "prompt", "has max_length 32"),
    ({"prompt": [[1, 2, 3]]}, "prompt", "valid string"),
    ({"model": "no_such_adapter"}, "model", "No adapter named 'no_such_adapter'"),
])
def test_what_the_server_cannot_honour_is_refused_in_openais_error_shape(llama_server, options, param, message):
    request = {"model": "short_prompt", "prompt": TEXTS[0], "max_tokens": 4, **options}
    with pytest.raises(openai.APIStatusError) as refused:
        _client(llama_server).completions.create(**request)
    expected_status = 404 if param == "model" else 400
    assert refused.value.status_code == expected_status
    assert refused.value.type == "invalid_request_error" and refused.value.param == param
    assert message in refused.value.message, refused.value.message


@pytest.mark.skipif(not T5_TOKENIZER_DIR.is_dir(), reason="the real T5 tokenizer is not in ../shared/reference")
def test_streamed_text_equals_the_whole_decoding_with_t5s_sentencepiece(tmp_path):
    """With the real T5 tokenizer (spaces inside pieces, cleanup on decoding), the streamed pieces of a random
    tiny T5's output add up to /v1/generate's text."""
    base = tmp_path / "t5"
    torch.manual_seed(0)
    T5ForConditionalGeneration(tiny_t5_config(32128)).save_pretrained(base)
    for name in T5_TOKENIZER_DIR.iterdir():
        shutil.copy(name, base / name.name)
    adapter = save_adapter("seq2seq", base, tmp_path / "adapter", seed=5, num_virtual_tokens=4, r=2, max_length=64)
    prompts = ["sentence: a gorgeous, witty film", "question: what is it? context: it's a cat, isn't it?",
               "premise: 3.5 apples (and pears) hypothesis: \"quoted\" - yes"]
    with on_loopback(ServingEngine.load(str(base), {"t5": adapter}, device="cpu"), max_new_tokens=24) as url:
        outputs = _generate(url, "t5", prompts, max_new_tokens=24)
        streamed = _streamed(_client(url), model="t5", prompt=prompts, max_tokens=24)
    assert sum(len(o["text"].split()) for o in outputs) > 10  # real words came out, not only specials
    for i, output in enumerate(outputs):
        assert streamed[i] == {"text": output["text"], "token_ids": output["token_ids"],
                               "finish_reason": _finish_reason(output)}


def test_model_and_prompt_alone_decode_greedily_up_to_openais_default_or_the_servers_limit(t5_server):
    """No temperature (greedy here, not OpenAI's 1), no max_tokens: 16 new tokens, or this server's 12 at most."""
    (choice,) = _client(t5_server).completions.create(model="long_prompt", prompt=TEXTS[2]).choices
    (output,) = _generate(t5_server, "long_prompt", [TEXTS[2]], max_new_tokens=LIMITS["max_new_tokens"])
    assert (choice.text, choice.model_extra["token_ids"]) == (output["text"], output["token_ids"])
