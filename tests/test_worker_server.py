"""The worker service on real NATS and Redis: token-exact streaming, one message per step,
aborts that free KV, errors that do not stop it, its load key, traces, and a clean SIGTERM."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from pathlib import Path

import msgspec
import pytest
import torch
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from kunserve.protocol import (
    AbortRequest,
    GenerateRequest,
    InstanceLoad,
    RedisKeys,
    RequestUpdate,
    Sampling,
    Subjects,
    decode,
    encode,
)
from kunserve.telemetry import inject_headers, setup_tracing
from kunserve.worker.engine import EngineConfig, LLMEngine
from kunserve.worker.sampling_params import SamplingParams
from kunserve.worker.server import SHUTDOWN_ERROR, WorkerServer
from kunserve.worker.settings import WorkerSettings

pytest_plugins = ["tests.mesh_fixtures"]

ENGINE = dict(max_num_seqs=16, max_num_batched_tokens=256)


def make_settings(nats_url: str, redis_url: str, model: str, **overrides) -> WorkerSettings:
    return WorkerSettings(nats_url=nats_url, redis_url=redis_url, model=model,
                          instance_id=f"w-{uuid.uuid4().hex[:8]}", threads=1,
                          **{**ENGINE, **overrides})


@pytest.fixture
async def worker(nats_server, redis_url, mesh_model_dir):
    threads = torch.get_num_threads()  # the engine thread sets 1: give the others theirs back
    exporter = InMemorySpanExporter()
    server = WorkerServer(make_settings(nats_server.url, redis_url, mesh_model_dir,
                                        liveness_ttl_ms=600), span_exporter=exporter)
    await server.start()
    server.exporter = exporter
    yield server
    await server.stop()
    torch.set_num_threads(threads)


def make_request(prompt: list[int], max_tokens: int = 12, **sampling) -> GenerateRequest:
    sampling = {"temperature": 0.0, "ignore_eos": True, **sampling}
    return GenerateRequest(request_id=uuid.uuid4().hex, prompt_token_ids=prompt,
                           sampling=Sampling(max_tokens=max_tokens, **sampling))


class Stream:
    """The updates of one request, as the gateway sees them."""

    def __init__(self, request: GenerateRequest) -> None:
        self.request = request
        self.updates: list[RequestUpdate] = []
        self.done = asyncio.Event()
        self.got_tokens = asyncio.Event()

    async def subscribe(self, nc) -> None:
        async def on_update(msg):
            self.updates.append(decode(msg.data, RequestUpdate))
            if self.updates[-1].token_ids:
                self.got_tokens.set()
            if self.updates[-1].finished:
                self.done.set()

        self.sub = await nc.subscribe(Subjects.updates(self.request.request_id), cb=on_update)

    async def finished(self, timeout: float = 20.0, worker=None) -> list[RequestUpdate]:
        """The updates once the last came; on a timeout, what ``worker`` (an in-process
        ``WorkerServer``) knew of the request, to tell a lost request from a lost update."""
        try:
            await asyncio.wait_for(self.done.wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"request {self.request.request_id} did not end within "
                                 f"{timeout} s; updates so far: {self.updates}"
                                 + (f"; {worker_state(worker)}" if worker else "")) from None
        await self.sub.unsubscribe()
        return self.updates

    @property
    def token_ids(self) -> list[int]:
        return [t for u in self.updates for t in u.token_ids]


def worker_state(server) -> str:
    outlet = server._engine._outlet
    return (f"worker accepting={server._accepting}, tracking {sorted(server._active)}, "
            f"engine thread alive={server._engine._thread.is_alive()}, NATS connected="
            f"{server.nc.is_connected}, update connection connected="
            f"{outlet.nc is not None and outlet.nc.is_connected}")


async def send(nc, worker_id: str, request: GenerateRequest, headers=None) -> Stream:
    stream = Stream(request)
    await stream.subscribe(nc)
    await nc.publish(Subjects.worker_generate(worker_id), encode(request), headers=headers)
    return stream


async def read_load(rclient, instance_id: str) -> InstanceLoad | None:
    fields = await rclient.hgetall(RedisKeys.load(instance_id))
    if not fields:
        return None
    return msgspec.convert({k.decode(): v.decode() for k, v in fields.items()}, InstanceLoad,
                           strict=False)


async def wait_for_load(rclient, instance_id: str, check, timeout: float = 3.0) -> InstanceLoad:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        load = await read_load(rclient, instance_id)
        if load is not None and check(load):
            return load
        assert asyncio.get_running_loop().time() < deadline, f"load never matched: {load}"
        await asyncio.sleep(0.02)


# -- streaming ------------------------------------------------------------------------------
async def test_greedy_tokens_match_the_engine_one_message_per_step(worker, nc, mesh_model_dir):
    prompts = [[5, 6, 7, 8], list(range(20, 57)), [300, 17, 402, 9, 9, 9, 88]]
    requests = [make_request(p, max_tokens=12) for p in prompts]
    streams = [await send(nc, worker.instance_id, r) for r in requests]
    for s in streams:
        await s.finished()
    reference = LLMEngine(EngineConfig(model=mesh_model_dir, **ENGINE)).generate(
        prompts, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    for stream, ref in zip(streams, reference, strict=True):
        updates = stream.updates
        assert updates[0].accepted and not updates[0].token_ids
        assert updates[0].num_prompt_tokens == len(stream.request.prompt_token_ids)
        assert stream.token_ids == ref.token_ids and len(ref.token_ids) == 12
        assert "".join(u.text for u in updates) == ref.text
        # every step adds one token to each request: one message per step, not per character
        assert len(updates) == 12 + 1
        assert [u.num_output_tokens for u in updates[1:]] == list(range(1, 13))
        assert [u.finished for u in updates] == [False] * 12 + [True]
        assert updates[-1].finish_reason == "length" and updates[-1].error is None
        assert {u.instance_id for u in updates} == {worker.instance_id}


async def test_the_trace_continues_from_the_message_headers(worker, nc):
    tracing = setup_tracing("test-router")
    with tracing.get_tracer("test").start_as_current_span("router.dispatch") as parent:
        headers = inject_headers()
    stream = await send(nc, worker.instance_id, make_request([5, 6, 7], max_tokens=3), headers)
    await stream.finished()
    (span,) = [s for s in worker.exporter.get_finished_spans() if s.name == "worker.generate"]
    assert span.context.trace_id == parent.get_span_context().trace_id
    assert span.parent.span_id == parent.get_span_context().span_id
    assert span.attributes["kunserve.request_id"] == stream.request.request_id
    assert span.attributes["kunserve.num_output_tokens"] == 3
    assert [e.name for e in span.events] == ["accepted", "first_token"]


# -- aborts and errors ----------------------------------------------------------------------
async def test_abort_frees_the_request_blocks(worker, nc, rclient):
    stream = await send(nc, worker.instance_id, make_request(list(range(5, 70)),
                                                             max_tokens=1500))
    await asyncio.wait_for(stream.got_tokens.wait(), 10)
    busy = await wait_for_load(rclient, worker.instance_id, lambda x: x.blocks_used > 0)
    assert busy.running == 1
    await nc.publish(Subjects.ABORT, encode(AbortRequest(request_id=stream.request.request_id)))
    updates = await stream.finished()
    assert updates[-1].finished and updates[-1].finish_reason == "abort"
    assert len(stream.token_ids) < 1500
    idle = await wait_for_load(rclient, worker.instance_id,
                               lambda x: x.blocks_used == 0 and x.running == 0)
    assert idle.blocks_total == busy.blocks_total


async def test_an_abort_that_overtakes_its_request_still_aborts_it(worker, nc):
    request = make_request([5, 6, 7], max_tokens=1500)
    await nc.publish(Subjects.ABORT, encode(AbortRequest(request_id=request.request_id)))
    await nc.flush()
    await asyncio.sleep(0.05)
    updates = await (await send(nc, worker.instance_id, request)).finished()
    assert updates[-1].finish_reason == "abort"
    assert sum(len(u.token_ids) for u in updates) < 1500


async def test_a_bad_request_gets_an_error_and_the_worker_keeps_serving(worker, nc, rclient):
    reserved = RedisKeys.reserved(worker.instance_id)
    bad = make_request([5, 6, 7], max_tokens=4, temperature=5.0)
    too_long = make_request(list(range(5, 400)) * 6, max_tokens=4)  # 2370 > max_model_len
    good = make_request([5, 6, 7], max_tokens=4)
    for r in (bad, too_long, good):  # as the router would have reserved them
        await rclient.hincrby(reserved, "tokens", len(r.prompt_token_ids) + 4)
        await rclient.hincrby(reserved, "requests", 1)
    bad_updates = await (await send(nc, worker.instance_id, bad)).finished()
    long_updates = await (await send(nc, worker.instance_id, too_long)).finished()
    good_updates = await (await send(nc, worker.instance_id, good)).finished()
    assert len(bad_updates) == 1 and bad_updates[0].finish_reason == "error"
    assert "temperature" in bad_updates[0].error
    assert len(long_updates) == 1 and "maximum context length" in long_updates[0].error
    assert bad_updates[0].invalid_request and long_updates[0].invalid_request  # 400s
    assert good_updates[0].accepted and len(good_updates) == 5
    assert good_updates[-1].finish_reason == "length"
    await asyncio.sleep(0.2)  # the releases ride on the next load write
    assert await rclient.hgetall(reserved) == {b"tokens": b"0", b"requests": b"0"}


async def test_a_prompt_longer_than_the_kv_cache_is_the_requests_error(nats_server, redis_url,
                                                                       mesh_model_dir, nc):
    """A budget whose KV cache holds fewer tokens than the context: a prompt that fits the
    context but not the cache is refused as the request's error (the gateway's 400)."""
    memory = LLMEngine(EngineConfig(model=mesh_model_dir, **ENGINE)).memory_report()
    budget = memory["parameter_bytes"] + memory["reserve_bytes"] + 4 * memory["block_bytes"]
    settings = make_settings(nats_server.url, redis_url, mesh_model_dir, liveness_ttl_ms=600,
                             memory_per_instance=budget)
    threads = torch.get_num_threads()
    server = WorkerServer(settings)
    await server.start()
    try:
        capacity = server.memory_report["blocks_total"] * 16
        assert capacity == 64
        too_big = make_request(list(range(5, 5 + capacity)), max_tokens=2)
        fits = make_request(list(range(5, 5 + capacity - 8)), max_tokens=2)
        refused = await (await send(nc, settings.instance_id, too_big)).finished(worker=server)
        served = await (await send(nc, settings.instance_id, fits)).finished(worker=server)
    finally:
        await server.stop()
        torch.set_num_threads(threads)
    assert len(refused) == 1 and refused[0].invalid_request
    assert refused[0].error == (f"the prompt needs {capacity + 1} tokens of KV cache but this "
                                f"instance holds only {capacity}")
    assert served[-1].finish_reason == "length" and not served[-1].invalid_request


# -- load key --------------------------------------------------------------------------------
async def test_load_key_is_kept_alive_when_idle_and_deleted_on_stop(nats_server, redis_url,
                                                                     mesh_model_dir, rclient):
    settings = make_settings(nats_server.url, redis_url, mesh_model_dir, liveness_ttl_ms=300)
    threads = torch.get_num_threads()
    server = WorkerServer(settings)
    await server.start()
    try:
        key = RedisKeys.load(settings.instance_id)
        load = await read_load(rclient, settings.instance_id)
        assert load.blocks_total == server.memory_report["blocks_total"] > 0
        assert load.blocks_used == 0 and load.block_size == 16
        assert 0 < await rclient.pttl(key) <= 300
        assert await rclient.sismember(RedisKeys.INSTANCES, settings.instance_id)
        await asyncio.sleep(1.0)  # > 3 TTLs of idling: refreshed every ttl/3
        assert await rclient.exists(key)
    finally:
        await server.stop()
        torch.set_num_threads(threads)
    assert not await rclient.exists(key)


async def test_a_long_step_keeps_the_load_key_and_a_hung_engine_lets_it_lapse(
        nats_server, redis_url, mesh_model_dir, nc, rclient, monkeypatch):
    # one step made long on purpose: the engine thread busy, as in a 2,048-token prefill of a
    # larger model on a CPU (the key used to be written only between steps, so the gateways
    # failed a live instance's requests over after liveness_ttl_ms)
    delays = []
    step = LLMEngine.step

    def long_step(engine):
        if delays:
            time.sleep(delays.pop())
        return step(engine)

    monkeypatch.setattr(LLMEngine, "step", long_step)
    settings = make_settings(nats_server.url, redis_url, mesh_model_dir, liveness_ttl_ms=600,
                             engine_stall_s=2.0)  # a refresh every 0.2 s: 0.4 s of slack
    threads = torch.get_num_threads()
    server = WorkerServer(settings)
    await server.start()
    key = RedisKeys.load(settings.instance_id)

    async def key_lapsed_while(stream: Stream) -> bool:
        lapsed = False
        while not stream.done.is_set():
            lapsed |= not await rclient.exists(key)
            await asyncio.sleep(0.02)
        return lapsed

    prompt = [5, 6, 7, 8]
    try:
        delays.append(1.6)  # 2.7 TTLs, under engine_stall_s: alive all along
        stream = await send(nc, settings.instance_id, make_request(prompt, max_tokens=4))
        assert not await key_lapsed_while(stream)
        first = stream.token_ids
        delays.append(3.5)  # over engine_stall_s: presumed hung, the key lapses ...
        stream = await send(nc, settings.instance_id, make_request(prompt, max_tokens=4))
        assert await key_lapsed_while(stream)
        assert stream.token_ids == first
        await wait_for_load(rclient, settings.instance_id, lambda load: True)  # ... then back
    finally:
        await server.stop()
        torch.set_num_threads(threads)
    reference = LLMEngine(EngineConfig(model=mesh_model_dir, **ENGINE)).generate(
        [prompt], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    assert first == reference[0].token_ids


# -- the process -----------------------------------------------------------------------------
def child_pids(pid: int) -> set[int]:
    children = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        children.update(int(c) for c in (task / "children").read_text().split())
    return children


async def test_sigterm_drains_in_flight_requests_and_exits_zero(spawn_workers, nc, rclient):
    (proc,) = spawn_workers(["sigterm-w"], drain_timeout_s=0.5)
    stream = await send(nc, "sigterm-w", make_request([5, 6, 7], max_tokens=1900))
    await asyncio.wait_for(stream.got_tokens.wait(), 10)
    children = child_pids(proc.process.pid)
    code = await asyncio.to_thread(proc.stop, 15)
    assert code == 0, proc.log()
    updates = await stream.finished(5)
    assert updates[-1].finish_reason == "abort" and updates[-1].error == SHUTDOWN_ERROR
    assert not await rclient.exists(RedisKeys.load("sigterm-w"))
    assert all(not Path(f"/proc/{c}").exists() for c in children)
    assert "Traceback" not in proc.log()


def test_a_bad_checkpoint_exits_2_with_the_reason(tmp_path):
    out = subprocess.run([sys.executable, "-m", "kunserve.worker", "--model",
                          str(tmp_path / "missing")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert "does not exist" in out.stderr and "Traceback" not in out.stderr, out.stderr
