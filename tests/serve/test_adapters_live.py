"""Adapters load and unload at run time, under concurrent load, with no failed request."""

from __future__ import annotations

import asyncio

from tests.serve.conftest import TEXTS, served, t5_engine

NEW_TOKENS = 4


def test_load_and_unload_during_concurrent_load_fail_no_request(t5_adapters, t5_reference):
    _, root, _ = t5_adapters
    stable = ["long_prompt", "short_prompt"]
    answers: list[tuple[str, str, object]] = []

    async def ask(client, name, text):
        response = await client.post("/v1/generate", json={"adapter": name, "inputs": [text],
                                                           "max_new_tokens": NEW_TOKENS})
        answers.append((name, text, response))
        return response

    async def traffic(client, stop):
        """A steady stream of requests for the adapters that stay loaded."""
        i = 0
        while not stop.is_set():
            await asyncio.gather(*(ask(client, name, TEXTS[(i + k) % len(TEXTS)]) for k, name in enumerate(stable)))
            i += 1

    async def main():
        async with served(t5_engine(t5_adapters, stable), adapter_root=root, max_batch_size=4,
                          max_wait_ms=20) as (service, client):
            stop = asyncio.Event()
            background = asyncio.create_task(traffic(client, stop))
            for _ in range(2):  # load, use, unload while in flight, then the same name again
                loaded = await client.post("/v1/adapters", json={"name": "hot", "path": "update_only"})
                assert loaded.status_code == 201, loaded.text
                assert "hot" in [a["name"] for a in (await client.get("/v1/adapters")).json()["adapters"]]
                in_flight = [asyncio.create_task(ask(client, "hot", text)) for text in TEXTS]
                while service._in_flight.get("hot", 0) < len(TEXTS):  # every one is queued or running
                    await asyncio.sleep(0.001)
                unloaded = await client.delete("/v1/adapters/hot")
                assert unloaded.status_code == 200 and "hot" not in [a["name"] for a in unloaded.json()["adapters"]]
                for response in await asyncio.gather(*in_flight):
                    assert response.status_code == 200, response.text  # in flight at the unload: answered
                after = await client.post("/v1/generate", json={"adapter": "hot", "inputs": [TEXTS[0]]})
                assert after.status_code == 404 and "hot" not in after.json()["loaded_adapters"]
                assert "hot" not in service.engine.multi.adapters
            stop.set()
            await background

    asyncio.run(main())
    names = {"hot": "update_only"}
    for name, text, response in answers:
        assert response.status_code == 200, response.text
        expected = t5_reference.generate(names.get(name, name), text, NEW_TOKENS)
        assert response.json()["outputs"][0]["token_ids"] == expected, (name, text)
    assert sum(name == "hot" for name, _, _ in answers) == 2 * len(TEXTS)
    assert sum(name != "hot" for name, _, _ in answers) >= 4
