"""What a replay needs to know of the stack before it builds its requests: the model, its
context, its vocabulary, the KV capacity, and how fast it serves under load.

- Model and context: ``GET /v1/models`` (``id``, ``max_model_len``); the vocabulary from the
  checkpoint's ``config.json`` when the model's ``root`` is a directory here.
- KV capacity in tokens: ``GET /v1/cluster`` (admin token) — the sum of ``blocks_total`` over
  the block tables (solo instances and group leaders) × the block size (16 unless the stack
  was started with another).
- ``warm_up``: a few short requests before a replay on a fresh stack.
- Speed (``measure_speed``): one request alone gives the prefill time per prompt token
  (TTFT / prompt length); then as many concurrent requests of the median shape as fill
  ``load`` of the capacity give the TPOT (their median) under that load, and the compute an
  output token costs there (TPOT over the requests each instance ran at once).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from kunserve.bench.cluster_monitor import kv_blocks
from kunserve.bench.kv_demand import ServiceSpeed
from kunserve.bench.loadgen import make_client, stream_request
from kunserve.bench.request_record import RequestRecord, Status
from kunserve.bench.workload import BenchRequest, Shape, make_requests

DEFAULT_BLOCK_SIZE = 16
FALLBACK_VOCAB = 1000
MAX_PROBE_CONCURRENCY = 64


@dataclass(frozen=True)
class StackInfo:
    model: str
    max_model_len: int
    vocab_size: int
    capacity_tokens: int | None  # None: not readable (no admin token)
    instances: int | None


async def fetch_stack_info(url: str, admin_token: str | None,
                           block_size: int = DEFAULT_BLOCK_SIZE) -> StackInfo:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        response = await client.get("/v1/models")
        response.raise_for_status()
        card = response.json()["data"][0]
        capacity = instances = None
        if admin_token:
            response = await client.get(
                "/v1/cluster", headers={"Authorization": f"Bearer {admin_token}"})
            if response.status_code == 401:
                raise ValueError("GET /v1/cluster refused the admin token (401)")
            response.raise_for_status()
            members = response.json()["instances"]
            capacity = kv_blocks(members)[1] * block_size
            instances = len(members)
    return StackInfo(model=card["id"], max_model_len=int(card["max_model_len"]),
                     vocab_size=_vocab_size(card.get("root")), capacity_tokens=capacity,
                     instances=instances)


def _vocab_size(root: str | None) -> int:
    try:
        return int(json.loads((Path(root) / "config.json").read_text())["vocab_size"])
    except (TypeError, OSError, ValueError, KeyError):
        return FALLBACK_VOCAB


async def measure_speed(url: str, model: str, shapes: list[Shape], capacity_tokens: int,
                        vocab_size: int, load: float, seed: int = 0,
                        instances: int = 1) -> ServiceSpeed:
    """The service speed at ``load`` (a fraction of the KV capacity of ``instances``) with
    requests of the median shape of ``shapes`` (already length-scaled)."""
    inp = max(1, round(statistics.median(s.input_tokens for s in shapes)))
    out = max(2, round(statistics.median(s.output_tokens for s in shapes)))
    k = int(min(MAX_PROBE_CONCURRENCY, max(1, round(load * capacity_tokens / (inp + out / 2)))))
    async with make_client(url, request_timeout_s=300) as client:
        alone = await _probe(client, model, [Shape(0.0, inp, 2)], vocab_size, seed)
        crowd = await _probe(client, model, [Shape(0.0, inp, out)] * k, vocab_size, seed + 1)
    tpots = [r.tpot_s for r in crowd if r.tpot_s is not None]
    if not alone[0].ttft_s or not tpots:
        raise ValueError("the speed probe's requests failed: " +
                         "; ".join({r.error or "" for r in alone + crowd}))
    tpot = statistics.median(tpots)
    return ServiceSpeed(prefill_s_per_token=alone[0].ttft_s / inp, tpot_s=tpot,
                        decode_s_per_token=tpot * max(1, instances) / k)


async def _probe(client: httpx.AsyncClient, model: str, shapes: list[Shape], vocab_size: int,
                 seed: int) -> list[RequestRecord]:
    requests: list[BenchRequest] = make_requests(shapes, vocab_size, seed=1_000_003 + seed)
    records = [RequestRecord(r.index, 0.0, r.input_tokens, r.output_tokens) for r in requests]
    t0 = time.perf_counter()
    await asyncio.gather(*(stream_request(client, model, r, rec, t0, 300)
                           for r, rec in zip(requests, records, strict=True)))
    return [r for r in records if r.status is Status.OK] or records


async def warm_up(url: str, model: str, vocab_size: int, requests: int = 2) -> None:
    """A few short requests, so that a fresh stack's first replayed ones do not pay for its
    first steps (each policy's stack gets the same)."""
    async with make_client(url, request_timeout_s=120) as client:
        await _probe(client, model, [Shape(0.0, 32, 4)] * requests, vocab_size, seed=-1)
