"""``kunserve bench mesh``: what the serving mesh adds on top of the engine.

One run, same checkpoint, same prompts, one request at a time: first the in-process engine
(``LLMEngine`` stepping in this process, tokens taken as the steps produce them), then the full
stack that ``kunserve up --instances 1`` starts (gateway -> NATS -> router -> worker -> NATS ->
gateway -> SSE), measured by a streaming HTTP client. Prints TTFT p50/p99 and per-token latency
for both and their difference. Then the gateway's request rate: ``max_tokens=1`` requests from
many concurrent clients, the rate at which the stack answers them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from kunserve.launcher import READY_PREFIX
from kunserve.servers import free_port, stop_process


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("mesh", help="full stack vs in-process engine: added TTFT and per-token "
                                    "latency; gateway request rate")
    p.add_argument("--model", default=None, help="checkpoint dir (default: kunserve up's tiny "
                                                 "model)")
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the engine, in "
                                                          "both runs")
    p.add_argument("--rate-clients", type=int, default=32)
    p.add_argument("--rate-seconds", type=float, default=5.0)
    p.add_argument("--json", default=None)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kunserve.launcher import ensure_tiny_model

    with tempfile.TemporaryDirectory(prefix="kunserve-bench-mesh-") as tmp:
        model = args.model or str(ensure_tiny_model(Path(tmp) / "cache"))
        prompts = _prompts(model, args.requests, args.prompt_len)
        print(f"in-process engine: {args.requests} requests ...", flush=True)
        engine = _measure_engine(model, prompts, args.output_len, args.threads)
        print("starting the stack (kunserve up --instances 1) ...", flush=True)
        with _stack(model, Path(tmp), args.threads) as url:
            stack = asyncio.run(_measure_stack(url, prompts, args.output_len))
            print(f"gateway request rate: {args.rate_clients} clients for "
                  f"{args.rate_seconds:.0f}s ...", flush=True)
            rate = asyncio.run(_request_rate(url, args.rate_clients, args.rate_seconds))
    result = {"engine": engine, "stack": stack, "request_rate": rate,
              "requests": args.requests, "prompt_len": args.prompt_len,
              "output_len": args.output_len}
    _print(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def _prompts(model: str, n: int, length: int) -> list[list[int]]:
    import torch

    from kunserve.worker.model_config import ModelConfig

    vocab = ModelConfig.from_dir(model).vocab_size
    gen = torch.Generator().manual_seed(0)
    return torch.randint(5, min(vocab, 1000), (n, length), generator=gen).tolist()


def _summary(ttfts: list[float], itls: list[float]) -> dict[str, float]:
    ttfts = sorted(ttfts)
    return {"ttft_p50_ms": 1e3 * statistics.median(ttfts),
            "ttft_p99_ms": 1e3 * ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
            "itl_mean_ms": 1e3 * statistics.fmean(itls),
            "itl_p50_ms": 1e3 * statistics.median(itls)}


def _measure_engine(model: str, prompts: list[list[int]], output_len: int,
                    threads: int) -> dict[str, float]:
    from kunserve.worker.engine import EngineConfig, LLMEngine
    from kunserve.worker.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(model=model, num_threads=threads))
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    engine.generate(prompts[:1], params)  # warm up
    ttfts, itls = [], []
    for prompt in prompts:
        start = time.perf_counter()
        engine.add_request(prompt, params)
        last = None
        while engine.has_unfinished():
            for _ in engine.step():
                now = time.perf_counter()
                if last is None:
                    ttfts.append(now - start)
                else:
                    itls.append(now - last)
                last = now
    return _summary(ttfts, itls)


class _stack:
    """``kunserve up --instances 1`` as a subprocess; yields the URL once it is ready."""

    def __init__(self, model: str, tmp: Path, threads: int) -> None:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUNSERVE_")}
        env.update(KUNSERVE_STATE_DIR=str(tmp / "state"), HF_HUB_OFFLINE="1")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kunserve.cli", "up", "--model", model, "--instances", "1",
             "--port", str(self.port), "--threads-per-worker", str(threads)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def __enter__(self) -> str:
        for line in self.process.stdout:
            if line.startswith(READY_PREFIX):
                return f"http://127.0.0.1:{self.port}"
        raise RuntimeError("kunserve up exited before it was ready")

    def __exit__(self, *exc) -> None:
        stop_process(self.process, 60)


async def _measure_stack(url: str, prompts: list[list[int]],
                         output_len: int) -> dict[str, float]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        body = {"model": model, "max_tokens": output_len, "temperature": 0, "stream": True,
                "ignore_eos": True}
        await _stream_one(client, {**body, "prompt": prompts[0]})  # warm up
        ttfts, itls = [], []
        for prompt in prompts:
            first, gaps = await _stream_one(client, {**body, "prompt": prompt})
            ttfts.append(first)
            itls.extend(gaps)
    return _summary(ttfts, itls)


async def _stream_one(client: httpx.AsyncClient, body: dict) -> tuple[float, list[float]]:
    start = time.perf_counter()
    times = []
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                times.append(time.perf_counter())
    return times[0] - start, [b - a for a, b in zip(times, times[1:], strict=False)]


async def _request_rate(url: str, clients: int, seconds: float) -> dict[str, float]:
    done = failed = 0
    deadline = time.perf_counter() + seconds
    async with httpx.AsyncClient(base_url=url, timeout=60,
                                 limits=httpx.Limits(max_connections=clients)) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        body = {"model": model, "prompt": [11, 12, 13, 14], "max_tokens": 1}

        async def loop() -> None:
            nonlocal done, failed
            while time.perf_counter() < deadline:
                response = await client.post("/v1/completions", json=body)
                done, failed = (done + 1, failed) if response.status_code == 200 else (
                    done, failed + 1)

        start = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(clients)))
        elapsed = time.perf_counter() - start
    return {"requests_per_s": done / elapsed, "failed": failed, "clients": clients}


def _print(result: dict) -> None:
    e, s = result["engine"], result["stack"]
    print(f"\nmesh vs in-process engine ({result['requests']} sequential requests, prompt "
          f"{result['prompt_len']}, output {result['output_len']} tokens)")
    print(f"{'':>22} {'engine':>9} {'stack':>9} {'added':>9}")
    for key, label in (("ttft_p50_ms", "TTFT p50 (ms)"), ("ttft_p99_ms", "TTFT p99 (ms)"),
                       ("itl_mean_ms", "per token, mean (ms)"),
                       ("itl_p50_ms", "per token, p50 (ms)")):
        print(f"{label:>22} {e[key]:>9.2f} {s[key]:>9.2f} {s[key] - e[key]:>+9.2f}")
    r = result["request_rate"]
    print(f"gateway request rate (max_tokens=1, {r['clients']} clients): "
          f"{r['requests_per_s']:.0f} req/s, {r['failed']} failed")
