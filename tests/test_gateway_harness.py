"""What the gateway tests share (no tests here): real nats-server and redis-server, a tiny
checkpoint, a fake mesh that plays router and worker on the real subjects, and ways to run the
gateway in-process (ASGI) or on a real port (uvicorn thread).

The fake mesh is written against ``kunserve.protocol`` only, so the gateway is tested against
the wire contract, not against the router's or worker's code.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import msgspec
import nats
import redis.asyncio as aioredis
import uvicorn
from tokenizers import Tokenizer

from kunserve.gateway.app import create_app
from kunserve.gateway.settings import GatewaySettings
from kunserve.protocol import (
    AbortRequest,
    GenerateRequest,
    InstanceLoad,
    RedisKeys,
    RequestUpdate,
    Subjects,
    decode,
    encode,
)
from kunserve.servers import ServerProcess, free_port, start_nats, start_redis

MODEL_NAME = "tiny-llama"
# what the fake worker "generates": one token per update, cycling through these ids
SCRIPT_TEXT = "Hello world, the mesh is speaking."


@dataclass
class Servers:
    nats: ServerProcess
    redis: ServerProcess


@functools.cache
def servers() -> Servers:
    """One nats-server and one redis-server for the whole test process."""
    found = Servers(start_nats(), start_redis())
    atexit.register(found.nats.stop)
    atexit.register(found.redis.stop)
    return found


@functools.cache
def model_dir() -> str:
    from kunserve.tiny_model import make_tiny_model

    root = tempfile.TemporaryDirectory(prefix="kunserve-gateway-test-")
    atexit.register(root.cleanup)
    return str(make_tiny_model(Path(root.name) / MODEL_NAME, layers=2, hidden_size=64,
                               heads=4, kv_heads=2, intermediate_size=128, vocab_size=512))


def make_settings(tmp_path: Path, **overrides) -> GatewaySettings:
    values = dict(model=model_dir(), nats_url=servers().nats.url, redis_url=servers().redis.url,
                  database_url=f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}",
                  max_model_len=256, max_queued_tokens=4096, dispatch_timeout_s=5.0,
                  request_timeout_s=5.0)
    return GatewaySettings(**{**values, **overrides})


# -- the fake mesh ---------------------------------------------------------------------------
@dataclass
class Received:
    request: GenerateRequest
    headers: dict[str, str]


@dataclass
class FakeMesh:
    """Router + one worker. ``mode``: ``stream`` (script tokens, one update each, then
    finish), ``hold`` (accept, then wait for an abort), ``no_worker`` (the router's "no live
    worker instance"), ``error`` (the worker fails after one token). ``answer_delay_s``: the
    router answers that much after the worker's updates start (a router slow to answer)."""

    instance_id: str = "fake-0"
    mode: str = "stream"
    token_delay_s: float = 0.0
    answer_delay_s: float = 0.0
    received: list[Received] = field(default_factory=list)
    aborts: list[AbortRequest] = field(default_factory=list)
    aborted: asyncio.Event = field(default_factory=asyncio.Event)

    async def __aenter__(self) -> FakeMesh:
        tokenizer = Tokenizer.from_file(str(Path(model_dir()) / "tokenizer.json"))
        self.script = tokenizer.encode(SCRIPT_TEXT).ids
        self._decode = tokenizer.decode
        self.nc = await nats.connect(servers().nats.url)
        await self.nc.subscribe(Subjects.GENERATE, queue=Subjects.ROUTER_QUEUE, cb=self._generate)
        await self.nc.subscribe(Subjects.ABORT, cb=self._abort)
        await self.nc.flush()
        self.redis = aioredis.from_url(servers().redis.url)
        self._held: dict[str, asyncio.Event] = {}
        return self

    async def __aexit__(self, *exc) -> None:
        await self.nc.drain()
        await self.redis.aclose()

    async def set_load(self, **fields) -> None:
        load = InstanceLoad(instance_id=self.instance_id, **fields)
        await self.redis.hset(RedisKeys.load(self.instance_id),
                              mapping=msgspec.structs.asdict(load))

    def expected_tokens(self, max_tokens: int) -> tuple[list[int], str]:
        ids = [self.script[i % len(self.script)] for i in range(max_tokens)]
        return ids, "".join(self._decode([t]) for t in ids)

    async def _generate(self, msg) -> None:
        request = decode(msg.data, GenerateRequest)
        self.received.append(Received(request, dict(msg.headers or {})))
        rid = request.request_id
        if self.mode == "no_worker":
            await msg.respond(b"")
            await self._send(RequestUpdate(request_id=rid, instance_id="", finished=True,
                                           finish_reason="error",
                                           error="no live worker instance"))
            return
        if self.mode == "rejected":  # as a worker whose KV cache cannot hold the prompt
            await msg.respond(self.instance_id.encode())
            await self._send(RequestUpdate(
                request_id=rid, instance_id=self.instance_id, finished=True,
                finish_reason="error", invalid_request=True,
                error="the prompt needs 9 tokens of KV cache but this instance holds only 8",
                num_prompt_tokens=len(request.prompt_token_ids)))
            return
        if not self.answer_delay_s:
            await msg.respond(self.instance_id.encode())
        await self._send(RequestUpdate(request_id=rid, instance_id=self.instance_id,
                                       accepted=True))
        asyncio.get_running_loop().create_task(self._run(request))
        if self.answer_delay_s:
            await asyncio.sleep(self.answer_delay_s)
            await msg.respond(self.instance_id.encode())

    async def _run(self, request: GenerateRequest) -> None:
        # as a worker counts: a failover's streamed tail (resumed_tokens) is output
        rid, resumed = request.request_id, request.resumed_tokens
        n_prompt = len(request.prompt_token_ids) - resumed
        if self.mode == "hold":
            self._held[rid] = asyncio.Event()
            await self._held[rid].wait()
            await self._send(RequestUpdate(request_id=rid, instance_id=self.instance_id,
                                           finished=True, finish_reason="abort",
                                           num_prompt_tokens=n_prompt))
            return
        ids, _ = self.expected_tokens(request.sampling.max_tokens)
        for i, token in enumerate(ids):
            if self.token_delay_s:
                await asyncio.sleep(self.token_delay_s)
            last = i == len(ids) - 1
            failed = self.mode == "error" and i == 1
            await self._send(RequestUpdate(
                request_id=rid, instance_id=self.instance_id,
                token_ids=[] if failed else [token], text="" if failed else self._decode([token]),
                finished=last or failed,
                finish_reason="error" if failed else ("length" if last else None),
                error="CUDA error: out of memory" if failed else None,
                num_prompt_tokens=n_prompt,
                num_output_tokens=resumed + i + (0 if failed else 1)))
            if failed:
                return

    async def _abort(self, msg) -> None:
        abort = decode(msg.data, AbortRequest)
        self.aborts.append(abort)
        self.aborted.set()
        if abort.request_id in self._held:
            self._held.pop(abort.request_id).set()

    async def _send(self, update: RequestUpdate) -> None:
        await self.nc.publish(Subjects.updates(update.request_id), encode(update))


async def clear_redis() -> None:
    client = aioredis.from_url(servers().redis.url)
    await client.flushdb()
    await client.aclose()


# -- running the gateway ---------------------------------------------------------------------
@asynccontextmanager
async def gateway_client(settings: GatewaySettings, span_exporter=None
                         ) -> AsyncIterator[tuple[object, httpx.AsyncClient]]:
    """The app in-process (lifespan run here), with an httpx client on ASGI. ASGI transport
    buffers whole responses: use ``served_gateway`` to read a stream as it comes."""
    app = create_app(settings, span_exporter)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway",
                                     timeout=30) as client:
            yield app, client


@contextmanager
def served_gateway(settings: GatewaySettings, span_exporter=None):
    """The app behind a real uvicorn on a free port, in a thread; yields its base URL."""
    app = create_app(settings, span_exporter)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(15)


def sse_payloads(body: str) -> list[str]:
    """The ``data:`` payloads of an SSE body, checking the framing on the way: every event is
    exactly ``data: <payload>\\n\\n`` and nothing else is in the body."""
    assert body.endswith("\n\n"), repr(body[-20:])
    events = body[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events
    return [e.removeprefix("data: ") for e in events]
