"""Load test of `dept-serve` on loopback: mixed adapters vs one adapter at a time vs one request at a time.

    python scripts/bench_serve.py --output_dir bench_results/serve            # CPU, ~3-5 min on 2 cores
    python scripts/bench_serve.py --device cuda --d_model 512 --num_layers 6 --output_dir out_gpu

A T5 with random weights (the sizes below) and four DePT adapters are saved to a scratch directory, a
`dept-serve` process is started on 127.0.0.1, and `--clients` concurrent clients (closed loop: each sends its
next request when the last is answered) send `--requests` one-input requests. Phases:

- mixed: request i goes to adapter i % 4, so batches mix adapters;
- single adapter: the same requests, grouped by adapter, one adapter after another (no mixing, same clients and
  batch limit);
- one at a time: the same requests to a server started with --max_batch_size 1;
- live: the mixed phase again while a fifth adapter is loaded, used and unloaded over and over;
- same batch: one full batch timed in-process, mixed over the 4 adapters vs all rows on one adapter, for each
  adapter (the cost of mixing at exactly the same batch size, which closed-loop clients cannot hold fixed; a
  mixed batch pads every row's prompt slots to the longest m among its adapters).

Reported: requests/s, p50/p99 latency, the mean batch size (from the server's /metrics), failed requests, and
requests whose answer differs from the one-at-a-time server's (batch of one: the offline answer). Written to
`results.json` and `results.md` in --output_dir (never overwritten without --overwrite).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families
from tiny_models import build_word_tokenizer, tiny_t5_config
from transformers import T5ForConditionalGeneration

from dept import DePTConfig, get_dept_model
from dept_serve.client import wait_until_healthy

WORDS = ("the a movie film was is great dull boring wonderful terrible acting actors plot story music scene "
         "long short funny sad good bad best worst really quite very not at all and but with of to in").split()
ADAPTERS = {"sst2_like": dict(num_virtual_tokens=40, r=8, max_length=64),
            "rte_like": dict(num_virtual_tokens=20, r=16, max_length=64),
            "pt_like": dict(num_virtual_tokens=60, r=0, max_length=64),
            "update_like": dict(num_virtual_tokens=4, r=32, max_length=64)}
LIVE = "live_like"


def build_models(directory: Path, d_model: int, num_layers: int) -> tuple[Path, dict[str, Path]]:
    tokenizer = build_word_tokenizer([" ".join(WORDS), "sentence:"], directory / "base")
    torch.manual_seed(0)
    config = tiny_t5_config(len(tokenizer), d_model=d_model, d_kv=64, d_ff=4 * d_model, num_layers=num_layers,
                            num_decoder_layers=num_layers, num_heads=max(d_model // 64, 1))
    base = T5ForConditionalGeneration(config)
    with torch.no_grad():
        base.lm_head.weight[0] = 0  # random weights favour the pad token: let the answers differ
    base.save_pretrained(directory / "base")
    adapters = {}
    for seed, (name, sizes) in enumerate({**ADAPTERS, LIVE: ADAPTERS["rte_like"]}.items()):
        model = get_dept_model(T5ForConditionalGeneration.from_pretrained(directory / "base"),
                               DePTConfig(prompt_init="vocab", init_seed=seed, **sizes), tokenizer)
        with torch.no_grad():
            model.prompt_encoder.lora_embedding_B.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed))
        adapters[name] = model.save_pretrained(directory / "adapters" / name)
    return directory / "base", adapters


def batch_level(base: Path, adapters: dict[str, Path], texts: list[str], args) -> dict:
    """Compute time of one full batch (`--max_batch_size` rows, without HTTP), mixed over the 4 adapters vs all
    rows on one adapter, for each adapter: the cost of mixing at exactly the same batch size. Every row generates
    exactly `--max_new_tokens` tokens, so no run stops early on its adapter's answers. Median of 5 after a warm-up."""
    from dept_serve import EngineRow, ServingEngine

    engine = ServingEngine.load(str(base), {name: adapters[name] for name in ADAPTERS}, device=args.device)
    names = list(ADAPTERS)
    ids = engine.encode(engine.adapters[names[0]], texts[: args.max_batch_size])
    batches = {"mixed": [EngineRow(names[i % len(names)], row) for i, row in enumerate(ids)]}
    batches.update({name: [EngineRow(name, row) for row in ids] for name in names})
    times = {}
    for label, rows in batches.items():
        engine.generate(rows, args.max_new_tokens, 1, min_new_tokens=args.max_new_tokens)
        samples = []
        for _ in range(5):
            start = time.perf_counter()
            engine.generate(rows, args.max_new_tokens, 1, min_new_tokens=args.max_new_tokens)
            samples.append(time.perf_counter() - start)
        times[label] = statistics.median(samples)
    single = statistics.mean(times[name] for name in names)
    return {"batch_size": len(ids), "mixed_s": times["mixed"], "single_s": single,
            "single_s_by_adapter": {name: times[name] for name in names},
            "mixed_throughput_vs_single": single / times["mixed"]}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A `dept-serve` process on 127.0.0.1."""

    def __init__(self, base: Path, adapters: dict[str, Path], args, max_batch_size: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "dept_serve.cli", "--model_name_or_path", str(base),
                "--adapter_root", str(adapters[LIVE].parent), "--host", "127.0.0.1", "--port", str(self.port),
                "--max_batch_size", str(max_batch_size), "--max_wait_ms", str(args.max_wait_ms),
                "--device", args.device, "--log_level", "warning"]
        for name in ADAPTERS:
            argv += ["--adapter", f"{name}={adapters[name]}"]
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        self.process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            wait_until_healthy(self.url, timeout_s=300, process=self.process)
        except (RuntimeError, TimeoutError) as err:
            self.process.kill()
            raise RuntimeError(f"{err}\n{self.process.communicate()[1][-3000:]}") from None

    def batch_stats(self) -> tuple[float, float]:
        """(sum, count) of the server's batch-size histogram."""
        text = httpx.get(f"{self.url}/metrics").text
        (family,) = [f for f in text_string_to_metric_families(text) if f.name == "dept_serve_batch_size"]
        values = {sample.name: sample.value for sample in family.samples}
        return values["dept_serve_batch_size_sum"], values["dept_serve_batch_size_count"]

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


async def run_phase(url: str, requests: list[tuple[str, str]], clients: int, max_new_tokens: int,
                    live: bool = False) -> dict:
    """Send the requests from `clients` closed-loop clients; returns latencies, answers, failures, wall time."""
    queue = list(enumerate(requests))
    answers: dict[int, list[int]] = {}
    latencies, failures = [], []
    live_answers = 0
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        async def client():
            while queue:
                index, (adapter, text) = queue.pop(0)
                start = time.perf_counter()
                response = await http.post("/v1/generate", json={"adapter": adapter, "inputs": [text],
                                                                 "max_new_tokens": max_new_tokens})
                latencies.append(time.perf_counter() - start)
                if response.status_code == 200:
                    answers[index] = response.json()["outputs"][0]["token_ids"]
                else:
                    failures.append((index, response.status_code, response.text[:200]))

        async def load_and_unload():
            nonlocal live_answers
            while not stop.is_set():
                for response in [await http.post("/v1/adapters", json={"name": LIVE, "path": LIVE})]:
                    if response.status_code != 201:
                        failures.append(("load", response.status_code, response.text[:200]))
                used = await asyncio.gather(*(http.post("/v1/generate", json={
                    "adapter": LIVE, "inputs": [requests[i][1]], "max_new_tokens": max_new_tokens}) for i in range(4)))
                unloaded = await http.delete(f"/v1/adapters/{LIVE}")
                for response in [*used, unloaded]:
                    if response.status_code != 200:
                        failures.append(("live", response.status_code, response.text[:200]))
                live_answers += len(used)

        start = time.perf_counter()
        cycler = asyncio.create_task(load_and_unload()) if live else None
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - start
        if cycler is not None:
            stop.set()
            await cycler
    return {"wall_s": wall, "latencies": latencies, "answers": answers, "failures": failures,
            "live_requests": live_answers}


def summarize(name: str, phase: dict, batch_before, batch_after, reference: dict[int, list[int]] | None,
              total: int) -> dict:
    latencies = sorted(phase["latencies"])
    batches = batch_after[1] - batch_before[1]
    wrong = sum(phase["answers"].get(i) != reference[i] for i in reference) if reference is not None else 0
    return {
        "phase": name, "requests": total, "answered": len(phase["answers"]), "failed": len(phase["failures"]),
        "lost": total - len(phase["answers"]) - sum(isinstance(f[0], int) for f in phase["failures"]),
        "wrong_vs_one_at_a_time": wrong, "requests_per_s": total / phase["wall_s"], "wall_s": phase["wall_s"],
        "p50_ms": 1000 * statistics.median(latencies), "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
        "mean_batch_size": (batch_after[0] - batch_before[0]) / batches if batches else 0.0,
        "live_adapter_requests": phase["live_requests"], "failures": phase["failures"][:5],
    }


def markdown(report: dict) -> str:
    rows = ["| phase | requests/s | p50 ms | p99 ms | mean batch | failed | lost | wrong |", "|---|---|---|---|---|---|---|---|"]
    for r in report["phases"]:
        rows.append(f"| {r['phase']} | {r['requests_per_s']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
                    f"{r['mean_batch_size']:.1f} | {r['failed']} | {r['lost']} | {r['wrong_vs_one_at_a_time']} |")
    targets = report["targets"]
    lines = [f"# dept-serve load test ({report['setup']['device']}, {report['setup']['machine']})", "",
             f"{report['setup']['clients']} concurrent clients, {report['setup']['requests']} one-input requests, "
             f"4 adapters, T5 d_model={report['setup']['d_model']} x {report['setup']['num_layers']} layers "
             f"(random weights), max_new_tokens={report['setup']['max_new_tokens']}, "
             f"--max_batch_size {report['setup']['max_batch_size']} --max_wait_ms {report['setup']['max_wait_ms']}.",
             "", *rows, "",
             f"- mixed / single adapter throughput: {targets['mixed_vs_single_adapter']:.2f} (target >= 0.9): "
             f"{'met' if targets['mixed_vs_single_adapter'] >= 0.9 else 'NOT met'}",
             f"- the same batch of {report['same_batch']['batch_size']} rows, without HTTP: mixed over 4 adapters "
             f"{1000 * report['same_batch']['mixed_s']:.0f} ms, one adapter {1000 * report['same_batch']['single_s']:.0f} ms "
             f"(mean over the 4; by adapter: "
             f"{', '.join(f'{k} {1000 * v:.0f}' for k, v in report['same_batch']['single_s_by_adapter'].items())}): "
             f"mixed throughput {targets['mixed_vs_single_adapter_same_batch']:.2f}x single (target >= 0.9): "
             f"{'met' if targets['mixed_vs_single_adapter_same_batch'] >= 0.9 else 'NOT met'}",
             f"- mixed / one at a time throughput: {targets['mixed_vs_one_at_a_time']:.2f} (target >= 2): "
             f"{'met' if targets['mixed_vs_one_at_a_time'] >= 2 else 'NOT met'}",
             f"- requests failed, lost or answered differently from the one-at-a-time server: "
             f"{targets['failed_lost_or_wrong']}",
             f"- live phase: {report['phases'][-1]['live_adapter_requests']} requests to an adapter loaded and "
             "unloaded during the load, failures counted above"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--max_batch_size", type=int, default=32)
    parser.add_argument("--max_wait_ms", type=float, default=10)
    parser.add_argument("--max_new_tokens", type=int, default=8)
    parser.add_argument("--d_model", type=int, default=256)
    parser.add_argument("--num_layers", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    output = Path(args.output_dir)
    if (output / "results.json").exists() and not args.overwrite:
        raise SystemExit(f"{output}/results.json exists: pass --overwrite or choose another --output_dir.")

    rng = random.Random(args.seed)
    texts = ["sentence: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30))) for _ in range(args.requests)]
    names = list(ADAPTERS)
    mixed = [(names[i % len(names)], text) for i, text in enumerate(texts)]
    by_adapter = [[i for i, (name, _) in enumerate(mixed) if name == adapter] for adapter in names]

    with tempfile.TemporaryDirectory() as scratch:
        base, adapters = build_models(Path(scratch), args.d_model, args.num_layers)
        same_batch = batch_level(base, adapters, texts, args)
        phases = []
        one = Server(base, adapters, args, max_batch_size=1)
        try:
            asyncio.run(run_phase(one.url, mixed[: args.clients], args.clients, args.max_new_tokens))  # warm-up
            before = one.batch_stats()
            single_server = asyncio.run(run_phase(one.url, mixed, args.clients, args.max_new_tokens))
            reference = single_server["answers"]
            one_at_a_time = summarize("one request at a time (--max_batch_size 1)", single_server, before,
                                      one.batch_stats(), None, len(mixed))
        finally:
            one.close()
        server = Server(base, adapters, args, max_batch_size=args.max_batch_size)
        try:
            asyncio.run(run_phase(server.url, mixed[: 2 * args.clients], args.clients, args.max_new_tokens))
            before = server.batch_stats()
            result = asyncio.run(run_phase(server.url, mixed, args.clients, args.max_new_tokens))
            phases.append(summarize("mixed: 4 adapters in shared batches", result, before, server.batch_stats(),
                                    reference, len(mixed)))
            before = server.batch_stats()
            grouped = {"wall_s": 0.0, "latencies": [], "answers": {}, "failures": [], "live_requests": 0}
            for indices in by_adapter:  # one adapter after another
                part = asyncio.run(run_phase(server.url, [mixed[i] for i in indices], args.clients,
                                             args.max_new_tokens))
                grouped["wall_s"] += part["wall_s"]
                grouped["latencies"] += part["latencies"]
                grouped["answers"].update({indices[j]: answer for j, answer in part["answers"].items()})
                grouped["failures"] += part["failures"]
            phases.append(summarize("single adapter: one adapter at a time", grouped, before, server.batch_stats(),
                                    reference, len(mixed)))
            phases.append(one_at_a_time)
            before = server.batch_stats()
            live = asyncio.run(run_phase(server.url, mixed, args.clients, args.max_new_tokens, live=True))
            phases.append(summarize("mixed, while an adapter is loaded and unloaded", live, before,
                                    server.batch_stats(), reference, len(mixed)))
        finally:
            server.close()

    throughput = {p["phase"]: p["requests_per_s"] for p in phases}
    mixed_rate = phases[0]["requests_per_s"]
    report = {
        "setup": {**{k: getattr(args, k) for k in ("requests", "clients", "max_batch_size", "max_wait_ms",
                                                     "max_new_tokens", "d_model", "num_layers", "device")},
                  "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                  "torch_threads": torch.get_num_threads()},
        "phases": phases,
        "same_batch": same_batch,
        "targets": {"mixed_vs_single_adapter": mixed_rate / phases[1]["requests_per_s"],
                    "mixed_vs_one_at_a_time": mixed_rate / phases[2]["requests_per_s"],
                    "mixed_vs_single_adapter_same_batch": same_batch["mixed_throughput_vs_single"],
                    "failed_lost_or_wrong": sum(p["failed"] + p["lost"] + p["wrong_vs_one_at_a_time"] for p in phases)},
        "throughput": throughput,
    }
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (output / "results.md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
