"""OpenAI's completions API over `dept-serve`: `POST /v1/completions`, `GET /v1/models`, `GET /v1/models/{model}`.

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.completions.create(model="sst2", prompt="sentence: a gorgeous, witty film", max_tokens=3)

`model` names a loaded adapter, as in vLLM and LoRAX. Decoding is greedy (`temperature` 0, its default here), as
`/v1/generate` with `num_beams` 1: each choice's `text` and `token_ids` (an extension, as in vLLM) equal
`/v1/generate`'s answer for its prompt, streamed (`stream: true`, server-sent events ending with `data: [DONE]`)
or not. `stop` cuts the text before the first stop string. An option the server cannot honour (sampling, `n` > 1,
`logprobs`, `echo`, ...) is refused with a 400 that says so. Errors come in OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`.
"""
# No `from __future__ import annotations`: FastAPI reads the routes' body types, built in add_openai_routes, at run time.

import asyncio
import json
import time
import uuid
from typing import Annotated, Any, Literal

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from dept_serve.errors import ErrorJSONResponse, UnknownAdapterError
from dept_serve.limits import Limits
from dept_serve.schemas import Text
from dept_serve.service import DePTService

PATHS = ("/v1/completions", "/v1/models")
ENDPOINT = "completions"  # its label in the metrics


# ------------------------------------------------------------------------------------------------------ errors
class OpenAIError(BaseModel):
    message: str
    type: str = Field(description="'invalid_request_error', or 'server_error' for a 500.")
    param: str | None = Field(None, description="The request field at fault, if one is.")
    code: str | None = Field(None, description="'model_not_found' for an unknown model.")


class OpenAIErrorResponse(BaseModel):
    error: OpenAIError


ERRORS = {status: {"model": OpenAIErrorResponse} for status in (400, 404, 413, 500)}


def is_openai_path(path: str) -> bool:
    return any(path == prefix or path.startswith(prefix + "/") for prefix in PATHS)


def openai_error(status: int, message: str, headers: dict | None = None, **extra) -> ErrorJSONResponse:
    """An error in OpenAI's shape. The API has no 422: a request the server cannot take is a 400."""
    status = 400 if status == 422 else status
    param = extra.get("param") or ("prompt" if "input_index" in extra else
                                   "model" if "loaded_adapters" in extra else None)
    code = "model_not_found" if "loaded_adapters" in extra else None
    kind = "server_error" if status >= 500 else "invalid_request_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return ErrorJSONResponse(body, status_code=status, headers=headers)


# ------------------------------------------------------------------------------------------------------ bodies
def _only(allowed: tuple, why: str):
    """A validator that lets only `allowed` through, with a message that says why the rest is refused."""
    def check(value):
        if value not in allowed:
            raise ValueError(f"{value!r} is not supported: {why}")
        return value
    return AfterValidator(check)


StopText = Annotated[Text, Field(min_length=1, max_length=256)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool | None = Field(None, description="Send the usage in a last chunk with no choices.")


def request_model(limits: Limits) -> type[BaseModel]:
    """The body of POST /v1/completions with this server's limits; what it cannot honour, its schema refuses."""
    greedy = "this server decodes greedily (as /v1/generate with num_beams 1): send 0 or leave it out"
    default_max_tokens = min(16, limits.max_new_tokens)

    class CompletionRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        model: str = Field(description="A loaded adapter's name (GET /v1/models).")
        prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=limits.max_inputs)] = Field(
            description="The input text, or a list of them (one choice each), formatted as in training.")
        max_tokens: int | None = Field(default_max_tokens, ge=1, le=limits.max_new_tokens,
                                       description="New tokens at most (OpenAI's default, 16, or this server's limit).")
        temperature: Annotated[float | None, _only((None, 0), greedy)] = Field(
            None, json_schema_extra={"minimum": 0, "maximum": 0}, description=f"0 only: {greedy}.")
        top_p: float | None = Field(None, gt=0, le=1, description="Accepted and unused: decoding is greedy.")
        n: Annotated[int | None, _only((None, 1), "one choice per prompt")] = Field(
            None, json_schema_extra={"minimum": 1, "maximum": 1})
        best_of: Annotated[int | None, _only((None, 1), "one choice per prompt")] = Field(
            None, json_schema_extra={"minimum": 1, "maximum": 1})
        stream: bool | None = Field(False, description="Send the tokens as server-sent events as they come.")
        stream_options: StreamOptions | None = None
        stop: StopText | Annotated[list[StopText], Field(max_length=4)] | None = Field(
            None, description="Up to 4 strings: the text ends before the first that appears (not included).")
        echo: Annotated[bool | None, _only((None, False), "the prompt is not repeated in the answer")] = Field(
            False, json_schema_extra={"enum": [False, None]})
        logprobs: Annotated[int | None, _only((None,), "this server returns no log probabilities")] = Field(
            None, json_schema_extra={"type": "null"})
        suffix: Annotated[str | None, _only((None,), "this server does not insert text")] = Field(
            None, json_schema_extra={"type": "null"})
        presence_penalty: Annotated[float | None, _only((None, 0), greedy)] = Field(
            None, json_schema_extra={"minimum": 0, "maximum": 0})
        frequency_penalty: Annotated[float | None, _only((None, 0), greedy)] = Field(
            None, json_schema_extra={"minimum": 0, "maximum": 0})
        logit_bias: Annotated[dict[str, float] | None, _only((None, {}), greedy)] = Field(
            None, json_schema_extra={"maxProperties": 0})
        seed: int | None = Field(None, description="Accepted and unused: greedy decoding is deterministic.")
        user: str | None = Field(None, description="Accepted and unused.")

    return CompletionRequest


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    text: str = Field(description="As /v1/generate's text: decoded, special tokens removed, stripped, cut at stop.")
    index: int
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = Field(
        description="'stop' at eos or a stop string, 'length' at max_tokens (None in a stream until the end).")
    token_ids: list[int] = Field(description="Extension: the new token ids, as /v1/generate gives them "
                                             "(through eos, or the token that completed a stop string).")


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str = Field(description="The adapter's name: send it as `model`.")
    object: Literal["model"] = "model"
    created: int = Field(description="When the adapter was loaded (Unix time).")
    owned_by: str = "dept-serve"
    parent: str = Field(description="The base model the adapters share.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ------------------------------------------------------------------------------------------------------ text
class ChoiceText:
    """One choice's text as its tokens arrive: /v1/generate's text of the tokens so far (decoded, special tokens
    removed, stripped), cut before the first stop string.

    `add` and `finish` return what may be sent now: new text that later tokens cannot change (not a character
    still incomplete, not the start of a stop string).
    """

    def __init__(self, tokenizer, stop: list[str], eos_token_id: int | None):
        self.tokenizer, self.stop, self.eos_token_id = tokenizer, stop, eos_token_id
        self.token_ids: list[int] = []
        self.text = ""
        self.sent = ""
        self.finish_reason: str | None = None

    def add(self, token: int) -> str:
        if self.finish_reason is not None:
            return ""  # its row goes on in its batch; this choice is complete
        self.token_ids.append(token)
        self.text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True).strip()
        cut = min((i for i in (self.text.find(s) for s in self.stop) if i >= 0), default=None)
        if cut is not None:
            self.text, self.finish_reason = self.text[:cut], "stop"
            return self._send(self.text)
        if token == self.eos_token_id:
            self.finish_reason = "stop"
            return self._send(self.text)
        return self._send(self._settled(self.text))

    def complete(self, output: dict) -> None:
        """The whole choice at once, from /v1/generate's output for its prompt (cut at a stop string if any)."""
        if not self.stop:
            self.token_ids, self.text = list(output["token_ids"]), output["text"]
            self.finish_reason = "stop" if self.token_ids[-1:] == [self.eos_token_id] else "length"
            return
        for token in output["token_ids"]:
            self.add(token)
        self.finish()

    def finish(self) -> str:
        """At the end of its row: the rest of the text; `finish_reason` is 'length' unless it stopped."""
        if self.finish_reason is None:
            self.finish_reason = "length"
        return self._send(self.text)

    def _settled(self, text: str) -> str:
        text = text.rstrip("\ufffd")  # bytes of a character still to come
        for held in range(min(len(text), max(map(len, self.stop), default=1) - 1), 0, -1):
            if any(stop.startswith(text[-held:]) for stop in self.stop):
                return text[:-held]  # may be the start of a stop string
        return text

    def _send(self, text: str) -> str:
        if not text.startswith(self.sent):  # a later token changed earlier text (decoding cleanup): wait for more
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta


# ------------------------------------------------------------------------------------------------------ routes
def add_openai_routes(app: FastAPI, service: DePTService) -> None:
    """POST /v1/completions, GET /v1/models and GET /v1/models/{model} on `app`."""
    CompletionRequest = request_model(service.limits)  # noqa: N806 - a class
    default_max_tokens = CompletionRequest.model_fields["max_tokens"].default

    def card(name: str) -> dict:
        return {"id": name, "object": "model", "created": service.engine.adapters[name].loaded_at,
                "owned_by": "dept-serve", "parent": service.engine.model_name_or_path}

    @app.get("/v1/models", response_model=ModelList, tags=["OpenAI"], summary="The loaded adapters, as OpenAI models.")
    async def list_models():
        return {"object": "list", "data": [card(name) for name in service.loaded()]}

    @app.get("/v1/models/{model}", response_model=ModelCard, responses=ERRORS, tags=["OpenAI"],
             summary="One loaded adapter, as an OpenAI model.")
    async def retrieve_model(model: str):
        if model not in service.loaded():
            raise UnknownAdapterError(model, service.loaded())
        return card(model)

    @app.post("/v1/completions", response_model=Completion, responses={
        **ERRORS, 200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                        "description": "A completion, or with stream: true its chunks as server-sent events."}},
        tags=["OpenAI"], summary="OpenAI's completions: `model` is an adapter's name; greedy decoding.")
    async def completions(body: CompletionRequest):
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        max_tokens = default_max_tokens if body.max_tokens is None else body.max_tokens
        answer = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                  "model": body.model}
        eos = service.engine.tokenizer.eos_token_id
        choices = [ChoiceText(service.engine.tokenizer, stop, eos) for _ in prompts]
        start = time.perf_counter()
        with service.metrics.counting(ENDPOINT, service.metrics_label(body.model)):
            adapter = service.adapter_for(body.model, "generate")
            service.check_generation_limits(max_tokens)
            key = ("generate", max_tokens, 1)
            if not body.stream:
                job = await service.submit(adapter, key, prompts)
                for choice, row in zip(choices, await job.rows):
                    choice.complete(row.future.result())
                service.metrics.latency.labels(ENDPOINT, adapter.name).observe(time.perf_counter() - start)
                return {**answer, "choices": [_choice(i, c.text, c.token_ids, c.finish_reason)
                                              for i, c in enumerate(choices)],
                        "usage": _usage(job.input_ids, choices)}
            tokens: asyncio.Queue = asyncio.Queue()
            job = await service.submit(adapter, key, prompts, on_token=lambda i, token: tokens.put_nowait((i, token)))
        job.rows.add_done_callback(lambda _: tokens.put_nowait(None))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_events(answer, job, tokens, choices, include_usage), media_type="text/event-stream")


def _choice(index: int, text: str, token_ids: list[int], finish_reason: str | None) -> dict:
    return {"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason, "token_ids": token_ids}


def _usage(input_ids: list[list[int]], choices: list[ChoiceText]) -> dict:
    prompt, completion = sum(map(len, input_ids)), sum(len(c.token_ids) for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _event(data: Any) -> str:
    return f"data: {json.dumps(data)}\n\n"


async def _events(answer: dict, job, tokens: asyncio.Queue, choices: list[ChoiceText], include_usage: bool):
    """The server-sent events of a streamed completion: a chunk per new token, a last one per choice with its
    finish_reason, the usage if asked, then `data: [DONE]`. A client that leaves drops its rows from the queue."""
    try:
        while (item := await tokens.get()) is not None:
            index, token = item
            choice = choices[index]
            if choice.finish_reason is not None:
                continue
            text = choice.add(token)
            yield _event({**answer, "choices": [_choice(index, text, [token], choice.finish_reason)]})
        try:
            job.rows.result()
        except Exception as err:  # a failed batch: the stream has begun, so the error is its last event
            yield _event({"error": {"message": f"Internal error ({type(err).__name__}): {err}", "type": "server_error",
                                    "param": None, "code": None}})
            return
        for index, choice in enumerate(choices):
            if choice.finish_reason is None:
                text = choice.finish()
                yield _event({**answer, "choices": [_choice(index, text, [], choice.finish_reason)]})
        if include_usage:
            yield _event({**answer, "choices": [], "usage": _usage(job.input_ids, choices)})
        yield "data: [DONE]\n\n"
    finally:
        if not job.rows.done():
            job.rows.cancel()
