"""Served outputs equal offline `generate` (greedy tokens, exactly) and offline scores (to 1e-5), whatever the
batch mixes."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dept_serve import ServingEngine
from tests.conftest import save_tiny_model
from tests.serve.conftest import (
    ADAPTER_SIZES,
    TEXTS,
    WORDS,
    OfflineReference,
    save_adapter,
    save_adapters,
    save_base,
    served,
    t5_engine,
)

NEW_TOKENS = 6


def _metric(text: str, name: str) -> dict:
    """{(sample name, labels): value} of one metric family in a Prometheus text page."""
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == name]
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}


async def _generate_concurrently(engine, requests, **limits):
    async with served(engine, **limits) as (_, client):
        responses = await asyncio.gather(*(
            client.post("/v1/generate", json={"adapter": name, "inputs": inputs, "max_new_tokens": NEW_TOKENS})
            for name, inputs in requests))
        return responses, (await client.get("/metrics")).text


def _assert_equal_to_offline(requests, responses, reference):
    outputs = []
    for (name, inputs), response in zip(requests, responses):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["adapter"] == name and len(body["outputs"]) == len(inputs)
        for text, output in zip(inputs, body["outputs"]):
            expected = reference.generate(name, text, NEW_TOKENS)
            assert output["token_ids"] == expected, (name, text)
            assert output["text"] == reference.tokenizer.decode(expected, skip_special_tokens=True).strip()
            outputs.append(tuple(expected))
    assert len(set(outputs)) > 1  # the adapters really differ, so a row routed to the wrong one would show


def test_mixed_batches_of_concurrent_requests_answer_as_offline_generate_on_t5(t5_adapters, t5_reference):
    requests = [(name, [text]) for text in TEXTS for name in ADAPTER_SIZES]  # 20 one-input requests, 4 adapters
    responses, metrics = asyncio.run(_generate_concurrently(t5_engine(t5_adapters), requests, max_batch_size=8,
                                                            max_wait_ms=100))
    _assert_equal_to_offline(requests, responses, t5_reference)
    batch_sizes = [response.json()["timing"]["batch_sizes"][0] for response in responses]
    assert max(batch_sizes) == 8 and sum(batch_sizes) > len(requests)  # rows really shared batches, up to the cap
    adapters_per_batch = _metric(metrics, "dept_serve_batch_adapters")
    mean_adapters = adapters_per_batch[("dept_serve_batch_adapters_sum", ())] / \
        adapters_per_batch[("dept_serve_batch_adapters_count", ())]
    assert mean_adapters > 1  # and mixed adapters
    rows = _metric(metrics, "dept_serve_rows")
    assert {labels[0][1]: value for (_, labels), value in rows.items()} == dict.fromkeys(ADAPTER_SIZES, len(TEXTS))


@pytest.mark.slow
def test_decoder_only_adapters_are_served_with_the_prompt_cache_as_offline_uncached_generate(tmp_path):
    base = save_base("causal", tmp_path / "llama")
    adapters = save_adapters("causal", base, tmp_path / "adapters")
    engine = ServingEngine.load(str(base), adapters, device="cpu")
    requests = [(name, TEXTS[i:i + 2]) for i, name in enumerate(ADAPTER_SIZES)] * 2  # several inputs per request
    responses, _ = asyncio.run(_generate_concurrently(engine, requests, max_batch_size=6, max_wait_ms=100))
    _assert_equal_to_offline(requests, responses, OfflineReference("causal", base, adapters))
    caches = engine.multi.model.prompt_caches
    for name, config in engine.multi.adapters.items():  # each prompt's KV cache was computed once, for all batches
        generation = caches[name].generation if name in caches else 0
        assert generation == (config.num_virtual_tokens > 0), name


def test_classifier_scores_equal_offline_probabilities(tmp_path):
    base = save_base("cls", tmp_path / "bert")
    adapters = save_adapters("cls", base, tmp_path / "adapters")
    reference = OfflineReference("cls", base, adapters)
    engine = ServingEngine.load(str(base), adapters, device="cpu")

    async def score_all():
        async with served(engine, max_wait_ms=100) as (_, client):
            return await asyncio.gather(*(client.post("/v1/score", json={"adapter": name, "inputs": TEXTS})
                                          for name in ADAPTER_SIZES))

    labels = set()
    for name, response in zip(ADAPTER_SIZES, asyncio.run(score_all())):
        assert response.status_code == 200, response.text
        for text, output in zip(TEXTS, response.json()["outputs"]):
            expected = reference.probabilities(name, text)
            served_probabilities = [output["probabilities"][label] for label in ("0", "1")]
            assert served_probabilities == pytest.approx(expected, abs=1e-5, rel=0)
            assert output["label"] == str(max(range(2), key=expected.__getitem__))
            labels.add(output["label"])
    assert labels == {"0", "1"}  # both labels occur, so the heads really differ


def test_a_decoder_only_adapter_is_served_in_the_causal_template_it_was_trained_with(tmp_path):
    """Its training_task.json records `--causal_template "Review: {source} => "`: served outputs equal offline
    generation in that template, token for token, and differ from the default template's."""
    template = "Review: {source} => "
    base = save_tiny_model("causal", tmp_path / "llama", [*WORDS, template.format(source="")])
    adapters = {"review": save_adapter("causal", base, tmp_path / "review", seed=3, causal_template=template,
                                       num_virtual_tokens=4, r=2, max_length=24),
                "official": save_adapter("causal", base, tmp_path / "official", seed=3,  # the same P, A and B
                                         num_virtual_tokens=4, r=2, max_length=24)}
    requests = [(name, [text]) for name in adapters for text in TEXTS]
    responses, _ = asyncio.run(_generate_concurrently(ServingEngine.load(str(base), adapters, device="cpu"),
                                                      requests, max_wait_ms=100))
    reference = OfflineReference("causal", base, adapters, causal_templates={"review": template})
    served_tokens = {}
    for (name, (text,)), response in zip(requests, responses):
        assert response.status_code == 200, response.text
        served_tokens[name, text] = response.json()["outputs"][0]["token_ids"]
        assert served_tokens[name, text] == reference.generate(name, text, NEW_TOKENS), (name, text)
    # The two adapters are one adapter in two templates: the template alone changes the answers.
    assert sum(served_tokens["review", text] != served_tokens["official", text] for text in TEXTS) >= 3
