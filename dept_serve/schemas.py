"""The JSON bodies of the API, as pydantic models (they make the OpenAPI spec at /openapi.json).

The request models carry the server's limits (inputs per request, `max_new_tokens`, `num_beams`), so the spec
states what this server accepts; `request_models(limits)` builds them.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema

from dept_serve.limits import Limits

ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9_\-]{1,64}$"
# Standard base64 (RFC 4648 alphabet, '=' padding, no whitespace) of a non-empty file: what the server decodes.
BASE64_PATTERN = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{4}|[A-Za-z0-9+/]{3}=|[A-Za-z0-9+/]{2}==)$"


def valid_unicode(text: str) -> str:
    """The text, if it is valid Unicode: JSON's escapes can carry a lone surrogate (`"\\ud800"`), which no
    tokenizer can read and no UTF-8 can encode."""
    try:
        text.encode("utf-8")  # in C, fast enough for a whole body on the event loop
    except UnicodeEncodeError as err:
        raise ValueError(f"holds a lone surrogate (U+{ord(text[err.start]):04X}) at character {err.start}, which "
                         "is not valid Unicode: send UTF-8 text (a JSON \\u escape must not encode half a pair)") from None
    return text


def base64_file(data: str) -> bytes:
    """The bytes of a base64-encoded file: exactly the strings `BASE64_PATTERN` matches are taken (checked without
    the regex, which takes a second on a 16 MiB body, on the event loop)."""
    try:
        if not data or len(data) % 4 or not data.isascii():
            raise binascii.Error
        return base64.b64decode(data, validate=True)  # the alphabet, and '=' only as the last one or two
    except binascii.Error:
        raise ValueError("is not valid base64: send the file's bytes base64-encoded (standard alphabet A-Z a-z 0-9 + "
                         "/, '=' padding to a multiple of 4 characters, no whitespace)") from None


Text = Annotated[str, AfterValidator(valid_unicode)]
Base64File = Annotated[str, AfterValidator(base64_file), WithJsonSchema(
    {"type": "string", "pattern": BASE64_PATTERN, "contentEncoding": "base64",
     "description": "An image file (JPEG, PNG, ...), base64-encoded."})]


class Timing(BaseModel):
    queue_ms: float = Field(description="Longest wait of the request's inputs before their batch started.")
    compute_ms: float = Field(description="Compute time of the batches the request's inputs ran in.")
    total_ms: float = Field(description="From arrival to answer.")
    batch_sizes: list[int] = Field(description="Rows in the batch of each input (all adapters together).")


class GeneratedOutput(BaseModel):
    text: str = Field(description="The decoded generation, special tokens removed.")
    token_ids: list[int] = Field(description="The generated token ids, through the first eos.")


class GenerateResponse(BaseModel):
    adapter: str
    outputs: list[GeneratedOutput]
    timing: Timing


class ScoreOutput(BaseModel):
    label: str | None = Field(description="The most probable label (None for a regression head).")
    probabilities: dict[str, float] | None = Field(description="Each label's probability (softmax of the head).")
    score: float | None = Field(description="The regression head's output (None for a classifier).")


class ScoreResponse(BaseModel):
    adapter: str
    outputs: list[ScoreOutput]
    timing: Timing


class AdapterInfo(BaseModel):
    name: str
    path: str
    modality: str = Field(description="'text' or 'vl'.")
    tasks: list[str] = Field(description="The tasks it was trained on (empty for official DePT checkpoints).")
    task_type: str = Field(description="'seq2seq', 'causal' or 'cls'.")
    endpoint: str = Field(description="Where to send its inputs: /v1/generate or /v1/score.")
    num_virtual_tokens: int
    r: int
    max_length: int = Field(description="The longest input it takes, in tokens.")
    label_words: list[str] | None
    accepts_images: bool = Field(description="VL adapters: whether uploaded images work (else feature_ids).")


class AdapterList(BaseModel):
    base_model: str
    adapters: list[AdapterInfo]


class LoadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=ADAPTER_NAME_PATTERN, description="The name requests will use.")
    path: str = Field(min_length=1, max_length=4096, description="The adapter directory, relative to --adapter_root.")


class ErrorResponse(BaseModel):
    error: str = Field(description="What is wrong and how to fix it.")
    loaded_adapters: list[str] | None = None
    max_length: int | None = None
    detail: Any = None


class Health(BaseModel):
    status: str
    adapters: int
    queue_depth: int


@dataclass(frozen=True)
class RequestModels:
    generate: type[BaseModel]
    score: type[BaseModel]


def request_models(limits: Limits) -> RequestModels:
    """The /v1/generate and /v1/score request bodies with this server's limits."""
    def inputs_field():
        return Field(min_length=1, max_length=limits.max_inputs,
                     description="The input texts, formatted as in training (e.g. 'sentence: ...', 'vqa: ...'). "
                                 "Each is refused (422) over its adapter's max_length tokens, and before it is "
                                 "tokenized over max_length times the tokenizer's longest token, in characters.")

    class GenerateRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        adapter: str = Field(description="A loaded adapter's name (GET /v1/adapters).")
        inputs: list[Text] = inputs_field()
        max_new_tokens: int = Field(min(20, limits.max_new_tokens), ge=1, le=limits.max_new_tokens)
        num_beams: int = Field(1, ge=1, le=limits.max_num_beams, description="1 is greedy decoding.")
        images: list[Base64File] | None = Field(
            None, max_length=limits.max_inputs,
            description="VL adapters: one base64-encoded image file per input (JPEG, PNG, ...).")
        feature_ids: list[str] | None = Field(
            None, max_length=limits.max_inputs,
            description="VL adapters: one image id of the server's --feature_file per input.")

    class ScoreRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        adapter: str = Field(description="A loaded classifier adapter's name.")
        inputs: list[Text] = inputs_field()

    return RequestModels(GenerateRequest, ScoreRequest)
