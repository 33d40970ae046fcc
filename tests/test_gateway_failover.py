"""A request whose worker dies mid-stream goes on elsewhere, and the client sees nothing of it.

First against a scripted mesh on the real nats-server and redis-server (the wire contract, in
detail: what the resubmission carries, stale updates of an abandoned attempt, a group leader
taking over the stream, the failover cap); then on the real stack (``kunserve up --instances
2``), where a worker process is SIGKILLed under streaming greedy requests and every request
must still give exactly transformers' greedy tokens.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from unittest.mock import MagicMock

import httpx
import msgspec
import nats
import psutil
import pytest
import redis.asyncio as aioredis
from opentelemetry.sdk.trace import TracerProvider
from test_gateway_harness import (
    MODEL_NAME,
    clear_redis,
    gateway_client,
    make_settings,
    servers,
    sse_payloads,
)

from kunserve.gateway.admission import AdmissionController
from kunserve.gateway.generation import Generation
from kunserve.gateway.metrics import GatewayMetrics
from kunserve.gateway.request_tracker import Arrival, RequestTracker
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
from kunserve.worker.engine import EngineConfig, LLMEngine
from kunserve.worker.sampling_params import SamplingParams
from tests.conftest import hf_greedy, make_prompts
from tests.stack import Up, running_stack

PROMPT = [5, 17, 42]


def next_token(context: list[int]) -> int:
    """The scripted model: deterministic in the whole context, like greedy decoding, so a
    resubmission with the streamed tokens as prompt continues the very same sequence."""
    return 3 + (sum(context) * 31 + len(context)) % 400


def scripted_output(prompt: list[int], n: int) -> list[int]:
    context = list(prompt)
    for _ in range(n):
        context.append(next_token(context))
    return context[len(prompt):]


@dataclass
class Worker:
    """``dies_after``: tokens it streams before it dies (stops, and its load key goes);
    ``lingers``: it only seems dead (its key goes, as in a long stall) and streams on;
    ``hand_over_to``: from the 3rd token on its updates come from that instance (a group's
    leader after a drop), and from the 5th it has no load key of its own; ``holds_back``:
    each token's text goes out with the next token (as a worker holds back a stop string's
    prefix), so a death loses the last one's. Like a worker, it sends the text of a
    resubmission's streamed tokens (``resumed_tokens``) again first."""

    instance_id: str
    dies_after: int | None = None
    lingers: bool = False
    hand_over_to: str | None = None
    holds_back: bool = False


@dataclass
class ScriptedMesh:
    """Router and workers of the real subjects: the router hands requests to ``workers`` in
    turn; each worker streams ``next_token`` every ``token_delay_s``."""

    workers: list[Worker]
    token_delay_s: float = 0.02
    received: list[tuple[str, GenerateRequest]] = field(default_factory=list)
    aborts: list[str] = field(default_factory=list)

    async def __aenter__(self) -> ScriptedMesh:
        await clear_redis()
        self.redis = aioredis.from_url(servers().redis.url)
        for worker in self.workers:
            await self.set_live(worker.instance_id)
        self.nc = await nats.connect(servers().nats.url)
        await self.nc.subscribe(Subjects.GENERATE, queue=Subjects.ROUTER_QUEUE, cb=self._route)
        await self.nc.subscribe(Subjects.ABORT, cb=self._abort)
        await self.nc.flush()
        self._tasks: set[asyncio.Task] = set()
        return self

    async def __aexit__(self, *exc) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.nc.close()
        await self.redis.aclose()

    async def set_live(self, instance_id: str) -> None:
        load = InstanceLoad(instance_id=instance_id, blocks_total=100)
        await self.redis.hset(RedisKeys.load(instance_id), mapping=msgspec.structs.asdict(load))

    async def _route(self, msg) -> None:
        request = decode(msg.data, GenerateRequest)
        worker = self.workers[len(self.received) % len(self.workers)]
        self.received.append((worker.instance_id, request))
        await msg.respond(worker.instance_id.encode())
        task = asyncio.get_running_loop().create_task(self._serve(worker, request))
        self._tasks.add(task)

    async def _serve(self, worker: Worker, request: GenerateRequest) -> None:
        rid, prompt = request.request_id, request.prompt_token_ids
        await self._send(RequestUpdate(request_id=rid, instance_id=worker.instance_id,
                                       accepted=True))
        output = scripted_output(prompt, request.sampling.max_tokens)
        sender = worker.instance_id
        resumed = prompt[len(prompt) - request.resumed_tokens:]
        held = "".join(f"<{t}>" for t in resumed)  # their text, sent again first
        for i, token in enumerate(output):
            if i == worker.dies_after:
                await self.redis.delete(RedisKeys.load(worker.instance_id))
                if not worker.lingers:
                    return
            if worker.hand_over_to and i == 2:
                sender = worker.hand_over_to
            if worker.hand_over_to and i == 4:  # the leader's updates are in by now
                await self.redis.delete(RedisKeys.load(worker.instance_id))
            await asyncio.sleep(self.token_delay_s)
            last = i == len(output) - 1
            text, held = (held, f"<{token}>") if worker.holds_back and not last else (
                held + f"<{token}>", "")
            await self._send(RequestUpdate(
                request_id=rid, instance_id=sender, token_ids=[token], text=text,
                finished=last, finish_reason="length" if last else None,
                # as a worker counts: a resubmission's streamed tail is output
                num_prompt_tokens=len(prompt) - request.resumed_tokens,
                num_output_tokens=request.resumed_tokens + i + 1))

    async def _abort(self, msg) -> None:
        self.aborts.append(decode(msg.data, AbortRequest).request_id)

    async def _send(self, update: RequestUpdate) -> None:
        await self.nc.publish(Subjects.updates(update.request_id), encode(update))


def settings(tmp_path, **overrides):
    return make_settings(tmp_path, failover_check_s=0.05, **overrides)


async def stream(client, max_tokens: int, seed: int | None = 7) -> tuple[list[int], str, dict]:
    """A streaming completion of PROMPT: the token ids, the text and the usage it got;
    fails on an error event."""
    response = await client.post("/v1/completions", json={
        "model": MODEL_NAME, "prompt": PROMPT, "max_tokens": max_tokens, "stream": True,
        "seed": seed, "return_token_ids": True, "stream_options": {"include_usage": True}})
    assert response.status_code == 200, response.text
    events = [json.loads(p) for p in sse_payloads(response.text)[:-1]]
    assert not [e for e in events if "error" in e], events
    choices = [c for e in events for c in e["choices"]]
    ids = [t for c in choices for t in c.get("token_ids") or []]
    assert choices[-1]["finish_reason"] == "length"
    return ids, "".join(c["text"] for c in choices), events[-1]["usage"]


async def test_the_rest_is_resubmitted_and_the_stream_goes_on(tmp_path):
    n = 12
    async with ScriptedMesh([Worker("w-a", dies_after=4), Worker("w-b")]) as mesh, \
            gateway_client(settings(tmp_path)) as (_, client):
        ids, text, usage = await stream(client, n)
        metrics = (await client.get("/metrics")).text
    expected = scripted_output(PROMPT, n)
    assert ids == expected  # nothing lost, nothing repeated
    assert text == "".join(f"<{t}>" for t in expected)
    assert usage == {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": n + 3}
    [(_, first), (instance, second)] = mesh.received
    assert instance == "w-b"
    assert second.request_id == f"{first.request_id}-r1"
    assert second.prompt_token_ids == PROMPT + expected[:4]
    assert second.sampling == msgspec.structs.replace(first.sampling, max_tokens=n - 4)
    assert second.sampling.seed == 7
    assert first.request_id in mesh.aborts  # in case the presumed dead one still runs it
    assert "kunserve:failovers_total 1.0" in metrics


async def test_text_the_lost_worker_held_back_reaches_the_client_once(tmp_path):
    """w-a sends each token's text one token late (held back, as for a stop string's prefix)
    and dies with the 4th token's text unsent; w-b sends the 4 streamed tokens' text again
    first: the gateway skips what the client has, so the client gets every token's text
    exactly once."""
    n = 12
    async with ScriptedMesh([Worker("w-a", dies_after=4, holds_back=True), Worker("w-b")]) \
            as mesh, gateway_client(settings(tmp_path)) as (_, client):
        ids, text, _ = await stream(client, n)
    expected = scripted_output(PROMPT, n)
    assert ids == expected
    assert text == "".join(f"<{t}>" for t in expected)
    assert mesh.received[1][1].resumed_tokens == 4


async def test_a_worker_only_presumed_dead_cannot_interleave_its_tokens(tmp_path):
    """w-a's key expires but it streams on, fast: whatever of it arrives once the gateway
    gave it up must be dropped, not mixed into the new attempt's stream."""
    n = 40
    async with ScriptedMesh([Worker("w-a", dies_after=3, lingers=True), Worker("w-b")],
                            token_delay_s=0.005) as mesh, \
            gateway_client(settings(tmp_path)) as (_, client):
        ids, _, _ = await stream(client, n)
    assert ids == scripted_output(PROMPT, n)
    assert [instance for instance, _ in mesh.received] == ["w-a", "w-b"]


class InMemoryMesh:
    """``MeshClient``'s surface, in memory: each submitted attempt is taken by ``w-<n>``, which
    answers ``accepted`` at once; the test delivers the rest itself."""

    connected = True

    def __init__(self) -> None:
        self.deliver: dict[str, Callable[[bytes], None]] = {}
        self.submitted: list[GenerateRequest] = []

    def receive_updates(self, wire_id, deliver) -> None:
        self.deliver[wire_id] = deliver

    def stop_updates(self, wire_id) -> None:
        self.deliver.pop(wire_id)

    async def submit(self, request, headers):
        self.submitted.append(request)
        instance_id = f"w-{len(self.submitted)}"
        self.send(request.request_id, instance_id, accepted=True)
        answer = asyncio.get_running_loop().create_future()
        answer.set_result(instance_id)
        return answer

    def send(self, request_id: str, instance_id: str, **fields) -> None:
        self.deliver[request_id](encode(RequestUpdate(request_id=request_id,
                                                      instance_id=instance_id, **fields)))

    def abort(self, request_id, reason) -> None:
        pass


async def test_a_request_its_holder_lost_is_resubmitted_and_one_it_no_longer_holds_is_not():
    """A group member whose group broke says it lost the requests it had handed to the
    (dead) leader (``lost``): the request it still holds for the gateway is resubmitted; a
    ``lost`` from an instance the request no longer follows changes nothing."""
    mesh = InMemoryMesh()
    admission = AdmissionController(10, 10_000)
    tracker = RequestTracker("r", Arrival.now(), MODEL_NAME, 3, True, MagicMock(),
                             GatewayMetrics(MODEL_NAME, admission),
                             TracerProvider().get_tracer("t").start_span("s"))
    request = GenerateRequest(request_id="r", prompt_token_ids=PROMPT,
                              sampling=Sampling(max_tokens=6, seed=7))
    generation = Generation(request, mesh, tracker, admission.try_admit(3), 5, 5,
                            max_failovers=1)
    await generation.start({})
    updates = generation.updates()
    mesh.send("r", "w-1", token_ids=[10])
    assert (await anext(updates)).token_ids == [10]
    mesh.send("r", "w-9", lost=True)  # not its holder: ignored
    mesh.send("r", "w-1", token_ids=[11])
    assert (await anext(updates)).token_ids == [11]
    assert len(mesh.submitted) == 1
    mesh.send("r", "w-1", lost=True)  # its holder: resubmitted with what streamed
    third = asyncio.ensure_future(anext(updates))
    while len(mesh.submitted) < 2:
        await asyncio.sleep(0)
    assert mesh.submitted[-1].request_id == "r-r1"
    assert mesh.submitted[-1].prompt_token_ids == PROMPT + [10, 11]
    assert mesh.submitted[-1].resumed_tokens == 2
    mesh.send("r-r1", "w-2", token_ids=[12])
    assert (await third).token_ids == [12]
    generation.close()


async def test_updates_queued_behind_the_loss_are_dropped():
    """A slow client leaves updates queued; the worker, only presumed dead, sends more after
    the gateway gave it up: those (token 999) never reach the client, the new attempt's do."""
    mesh, admission = InMemoryMesh(), AdmissionController(10, 10_000)
    tracker = RequestTracker("r", Arrival.now(), MODEL_NAME, 3, True, MagicMock(),
                             GatewayMetrics(MODEL_NAME, admission),
                             TracerProvider().get_tracer("t").start_span("s"))
    request = GenerateRequest(request_id="r", prompt_token_ids=PROMPT,
                              sampling=Sampling(max_tokens=4))
    generation = Generation(request, mesh, tracker, admission.try_admit(3), 5, 5,
                            max_failovers=1)
    await generation.start({})
    mesh.send("r", "w-1", token_ids=[10])
    mesh.send("r", "w-1", token_ids=[11])
    generation.instance_lost()
    mesh.send("r", "w-1", token_ids=[999])
    mesh.send("r", "w-1", token_ids=[999], finished=True, finish_reason="length")
    updates = generation.updates()
    got = [(await anext(updates)).token_ids for _ in range(2)]
    third = asyncio.ensure_future(anext(updates))
    while len(mesh.submitted) < 2:  # the loss is reached: resubmitted
        await asyncio.sleep(0)
    assert mesh.submitted[-1].request_id == "r-r1"
    assert mesh.submitted[-1].prompt_token_ids == PROMPT + [10, 11]
    assert mesh.submitted[-1].sampling.max_tokens == 2
    assert mesh.submitted[-1].resumed_tokens == 2  # the prompt's tail is output
    mesh.send("r-r1", "w-2", token_ids=[12])
    mesh.send("r-r1", "w-2", token_ids=[13], finished=True, finish_reason="length",
              num_prompt_tokens=3, num_output_tokens=4)  # a worker counts the tail as output
    got += [(await third).token_ids] + [update.token_ids async for update in updates]
    assert got == [[10], [11], [12], [13]]
    assert (generation.num_prompt_tokens, generation.num_output_tokens) == (3, 4)
    assert generation.instance_id == "w-2"


async def test_the_watch_follows_the_instance_the_updates_come_from(tmp_path):
    """After a drop the group's leader streams the request: the instance that first took it
    may then have no load key of its own, and the request must not fail over for that."""
    n = 12
    async with ScriptedMesh([Worker("w-a", hand_over_to="w-lead"), Worker("w-lead")]) as mesh, \
            gateway_client(settings(tmp_path)) as (_, client):
        ids, _, _ = await stream(client, n)
        metrics = (await client.get("/metrics")).text
    assert ids == scripted_output(PROMPT, n)
    assert len(mesh.received) == 1
    assert "kunserve:failovers_total 0.0" in metrics


async def test_without_failovers_the_request_fails_at_once(tmp_path):
    async with ScriptedMesh([Worker("w-a", dies_after=2), Worker("w-b")]) as mesh, \
            gateway_client(settings(tmp_path, max_failovers=0)) as (_, client):
        started = time.monotonic()
        response = await client.post("/v1/completions", json={
            "model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 8, "stream": True})
        elapsed = time.monotonic() - started
    payloads = sse_payloads(response.text)
    error = json.loads(payloads[-2])["error"]
    assert "instance w-a died while serving the request" in error["message"]
    assert error["type"] == "service_unavailable_error"
    assert elapsed < 3  # not the 5 s request timeout
    assert len(mesh.received) == 1


# -- the real stack ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stack(model_dirs, tmp_path_factory):
    model_dir = model_dirs["llama-gqa"]
    state = tmp_path_factory.mktemp("state")
    with running_stack(model_dir, state) as (up, url):
        yield {"url": url, "up": up, "model_dir": model_dir, "ledger": state / "ledger.db"}


def worker_process(up: Up, instance_id: str) -> psutil.Process:
    for process in up.descendants():
        try:
            if process.environ().get("KUNSERVE_INSTANCE_ID") == instance_id:
                return process
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    raise AssertionError(f"no process serves {instance_id}")


def test_a_killed_worker_loses_no_request(stack):
    """Streams on both workers, greedy and seeded-sampled with penalties; worker-0 is
    SIGKILLed once each has streamed a few tokens. Every client gets, in one stream and
    without error, what an uninterrupted run gives: transformers' greedy tokens, and for a
    seeded request the engine's own tokens for that seed (the resubmission says how many
    streamed tokens are output: its random stream and penalties go on where they were)."""
    max_tokens = 300
    kinds = ["greedy", "seeded", "seeded", "greedy", "greedy", "seeded", "seeded", "greedy"]
    prompts = make_prompts(len(kinds), 512, seed=11, lengths=[8, 13, 21, 5, 34, 17, 11, 26])
    model = httpx.get(f"{stack['url']}/v1/models", timeout=10).json()["data"][0]["id"]
    streamed = [0] * len(kinds)

    def sampling(i: int) -> dict:
        if kinds[i] == "greedy":
            return {"temperature": 0}
        return {"temperature": 1.0, "seed": 100 + i, "presence_penalty": 0.5,
                "frequency_penalty": 0.3}

    async def one(client: httpx.AsyncClient, i: int) -> tuple[list[int], list[dict], str]:
        body = {"model": model, "prompt": prompts[i], "max_tokens": max_tokens,
                "ignore_eos": True, "stream": True, "return_token_ids": True, **sampling(i)}
        ids, errors, response_id = [], [], ""
        async with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line.removeprefix("data: "))
                errors += [event["error"]] if "error" in event else []
                response_id = event.get("id", response_id)
                for choice in event.get("choices", []):
                    ids += choice.get("token_ids") or []
                streamed[i] = len(ids)
        return ids, errors, response_id

    async def kill_when_all_stream() -> None:
        while min(streamed) < 5:
            await asyncio.sleep(0.005)
        worker_process(stack["up"], "worker-0").send_signal(signal.SIGKILL)

    async def run():
        async with httpx.AsyncClient(base_url=stack["url"], timeout=120) as client:
            results = await asyncio.gather(*(one(client, i) for i in range(len(kinds))),
                                           kill_when_all_stream())
            metrics = (await client.get("/metrics")).text
        return results[:-1], metrics

    results, metrics = asyncio.run(run())
    engine = LLMEngine(EngineConfig(model=stack["model_dir"]))
    for i, (prompt, (ids, errors, _)) in enumerate(zip(prompts, results, strict=True)):
        assert errors == []
        if kinds[i] == "greedy":
            assert ids == hf_greedy(stack["model_dir"], prompt, max_tokens), i
        else:
            params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, **sampling(i))
            assert ids == engine.generate([prompt], params)[0].token_ids, i
    # the ledger keeps each request's first dispatch: a seeded one was on worker-0
    deadline = time.monotonic() + 10
    while True:
        with sqlite3.connect(stack["ledger"]) as db:
            rows = dict(db.execute("SELECT request_id, dispatch_instance FROM requests"))
        first = [next((inst for rid, inst in rows.items() if rid in response_id), None)
                 for _, _, response_id in results]
        if None not in first or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert "worker-0" in {inst for inst, kind in zip(first, kinds, strict=True)
                          if kind == "seeded"}, first
    failovers = [line for line in metrics.splitlines()
                 if line.startswith("kunserve:failovers_total")]
    assert failovers and float(failovers[0].split()[-1]) >= 1, "worker-0 held none of them"
