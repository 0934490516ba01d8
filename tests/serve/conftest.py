"""Tiny bases and DePT adapters saved the real way, the same adapters run the offline way (the reference a server
must match), an in-process server to call over ASGI, and one on loopback."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn

from dept import DePTConfig, DePTModel, get_dept_model
from dept_nlp.modeling import load_model, load_tokenizer
from dept_nlp.preprocess import CAUSAL_TEMPLATE, encode_source
from dept_serve import DePTService, Limits, ServingEngine, create_app
from tests.conftest import ADAPTER_SIZES, free_port, save_tiny_model

WORDS = [
    "the movie was great and the actors were wonderful",
    "a dull and boring film with terrible acting",
    "sentence: premise: hypothesis: question: context: what color is the sky blue red green",
    "vqa: gqa: caption: what shape is on the left circle square triangle",
]
TEXTS = [
    "sentence: the movie was great",
    "sentence: a dull and boring film with terrible acting",
    "premise: the sky is blue hypothesis: the sky is red",
    "question: what color is the sky?",
    "sentence: wonderful actors",
]


def save_base(family: str, directory: Path, **config) -> Path:
    return save_tiny_model(family, directory, WORDS, **config)


def save_adapter(family: str, base_dir: Path, directory: Path, seed: int, label_words=("0", "1"),
                 causal_template: str | None = None, **sizes) -> Path:
    """A train-free stand-in for a trained adapter: its own P, a non-zero B (and for classifiers its own head),
    saved with the training_task.json that dept-train writes (with `causal_template` where one is given)."""
    base = load_model(str(base_dir), family)
    tokenizer = load_tokenizer(str(base_dir))
    config = DePTConfig(prompt_init="vocab", init_seed=seed, task_type=family, **sizes)
    model = get_dept_model(base, config, tokenizer)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.prompt_encoder.lora_embedding_B.normal_(0, 0.5, generator=generator)
        if family == "cls":
            base.classifier.weight.normal_(0, 1.0, generator=generator)
    model.save_pretrained(directory)
    record = {"task_names": ["sst2"], "modality": "text", "label_words": list(label_words), "model_family": family,
              "model_name_or_path": str(base_dir), "causal_template": causal_template}
    (directory / "training_task.json").write_text(json.dumps(record))
    return directory


def save_adapters(family: str, base_dir: Path, root: Path, sizes: dict | None = None) -> dict[str, Path]:
    return {name: save_adapter(family, base_dir, root / name, seed, **size)
            for seed, (name, size) in enumerate((sizes or ADAPTER_SIZES).items())}


class OfflineReference:
    """The same adapters run the offline way: one DePTModel per adapter on its own base, one input at a time
    (decoder-only: without the prompt KV cache, the path the cached one must match; in the template given in
    `causal_templates`, else the default)."""

    def __init__(self, family: str, base_dir: Path, adapters: dict[str, Path],
                 causal_templates: dict[str, str] | None = None):
        self.family = family
        self.tokenizer = load_tokenizer(str(base_dir))
        self.models = {name: DePTModel.from_pretrained(load_model(str(base_dir), family), path)
                       for name, path in adapters.items()}
        self.causal_templates = causal_templates or {}

    def inputs(self, text: str, causal_template: str = CAUSAL_TEMPLATE) -> dict:
        ids = torch.tensor([encode_source(self.tokenizer, self.family, text, causal_template)])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    @torch.no_grad()
    def generate(self, adapter: str, text: str, max_new_tokens: int, num_beams: int = 1) -> list[int]:
        uncached = {"use_prompt_cache": False} if self.family == "causal" else {}  # the reference path
        inputs = self.inputs(text, self.causal_templates.get(adapter, CAUSAL_TEMPLATE))
        output = self.models[adapter].generate(**inputs, max_new_tokens=max_new_tokens,
                                               num_beams=num_beams, do_sample=False, new_tokens_only=True,
                                               pad_token_id=self.tokenizer.pad_token_id, **uncached)[0].tolist()
        if self.family == "seq2seq":
            output = output[1:]  # the decoder's start token
        eos = self.tokenizer.eos_token_id
        return output[: output.index(eos) + 1] if eos in output else output

    @torch.no_grad()
    def probabilities(self, adapter: str, text: str) -> list[float]:
        return torch.softmax(self.models[adapter](**self.inputs(text)).logits[0].float(), dim=-1).tolist()


@pytest.fixture(scope="session")
def t5_adapters(tmp_path_factory):
    """(base dir, adapter root, {name: dir}) for a tiny T5; the adapters live under the root."""
    root = tmp_path_factory.mktemp("serve_t5")
    base = save_base("seq2seq", root / "base")
    return base, root / "adapters", save_adapters("seq2seq", base, root / "adapters")


@pytest.fixture(scope="session")
def t5_reference(t5_adapters):
    base, _, adapters = t5_adapters
    return OfflineReference("seq2seq", base, adapters)


def t5_engine(t5_adapters, names=None) -> ServingEngine:
    base, _, adapters = t5_adapters
    chosen = {name: path for name, path in adapters.items() if names is None or name in names}
    return ServingEngine.load(str(base), chosen, device="cpu")


@contextlib.asynccontextmanager
async def served(engine: ServingEngine, adapter_root: Path | None = None, **limits):
    """(service, client): the app over ASGI, its batcher running, as the app's lifespan would start it."""
    service = DePTService(engine, Limits(**limits), adapter_root=adapter_root)
    app = create_app(service)
    await service.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://dept-serve") as client:
            yield service, client
    finally:
        await service.stop()


@contextlib.contextmanager
def on_loopback(engine: ServingEngine, adapter_root: Path | None = None, **limits) -> Iterator[str]:
    """The app served by uvicorn on 127.0.0.1 (a free port) from a thread of this process; yields its URL."""
    server = uvicorn.Server(uvicorn.Config(create_app(DePTService(engine, Limits(**limits), adapter_root)),
                                           host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
