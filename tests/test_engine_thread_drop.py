"""The engine thread's part of an overlapped drop: two ``EngineThread``s in this process, each
with a real engine, joined over real gloo links by ``GroupCommand("join")`` as the worker
server sends it; only the outlet is a recorder (the NATS side is tested by
``test_worker_drop.py``).

Rank 1's half of the KV exchange is held back until the test releases it. Meanwhile the
leader must take a new request but not run it (the requests whose KV moves go first), turn an
abort of a request whose KV is moving into ``Aborted`` (and never run it again), and keep its
join pending: the command is done, with the exchange's phases, only once the KV is in place
(``ExchangeDone``). Then every request's tokens, across both instances, are transformers'
greedy tokens."""

from __future__ import annotations

import contextlib
import datetime
import threading
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor

import pytest
import torch.distributed as dist

from kunserve.worker.engine import RequestOutput
from kunserve.worker.engine_thread import (
    AbortCommand,
    Aborted,
    Accepted,
    AddCommand,
    Adopted,
    EngineThread,
    GroupCommand,
)
from kunserve.worker.pipeline import kv_transfer
from kunserve.worker.pipeline.stage_link import StageLink
from kunserve.worker.sampling_params import SamplingParams
from kunserve.worker.settings import WorkerSettings
from tests.conftest import hf_greedy, make_prompts

HOST = "127.0.0.1"
MAX_TOKENS = 48  # a request must still run when the group forms
LLAMA = dict(arch="llama", layers=4, hidden_size=64, heads=4, kv_heads=2,
             intermediate_size=128, vocab_size=512, seed=9)


class Recorder:
    """An outlet that keeps every event (appended on the engine thread, read by the test)."""

    def __init__(self) -> None:
        self.events: list = []

    async def open(self) -> None:
        pass

    async def emit(self, event) -> None:
        self.events.append(event)

    async def close(self) -> None:
        pass

    def outputs(self) -> list[RequestOutput]:
        return [o for e in list(self.events) if isinstance(e, list) for o in e]

    def tokens(self, rid: str) -> list[int]:
        return [t for o in self.outputs() if o.request_id == rid for t in o.new_token_ids]

    def finished(self, rid: str) -> bool:
        return any(o.finished for o in self.outputs() if o.request_id == rid)


def wait_for(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    from kunserve.tiny_model import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("thread-drop") / "llama4", **LLAMA))


@pytest.fixture
def rank1_exchange_held(monkeypatch):
    """Rank 1's ``KVMove.finish`` waits for the returned event (ranks share this process)."""
    release = threading.Event()
    finish = kv_transfer.KVMove.finish

    def held(self):
        if self._link is not None and self._link.rank == 1:
            release.wait(60)
        return finish(self)

    monkeypatch.setattr(kv_transfer.KVMove, "finish", held)
    return release


def links(port: int, prefix: str) -> list[StageLink]:
    """Both ranks' link of one group (each rank's constructor waits for the other, through a
    store client of its own: one client cannot wait for two threads at once)."""
    def join(rank: int) -> StageLink:
        store = dist.TCPStore(HOST, port, is_master=False,
                              timeout=datetime.timedelta(seconds=60))
        return StageLink(dist.PrefixStore(prefix, store), rank, 2, 1, timeout_s=30,
                         bind_host=HOST)

    with ThreadPoolExecutor(2) as pool:
        made = [pool.submit(join, rank) for rank in range(2)]
        return [f.result(timeout=60) for f in made]


@contextlib.contextmanager
def joined_pair(model: str, own: dict[int, dict[str, list[int]]], params: SamplingParams,
                release: threading.Event, leader_late_s: float = 0.0,
                seen: dict | None = None):
    """Two engine threads (ranks 0 and 1) serve their ``own`` requests solo for 3 tokens
    each, then join one group as the worker server commands it; yields once the leader has
    adopted every request (rank 1's exchange still held back until ``release``): the
    outlets, the threads and the join commands. Stops both threads on the way out."""
    outlets = [Recorder(), Recorder()]
    threads = [EngineThread(WorkerSettings(model=model, instance_id=name, threads=1), outlet)
               for name, outlet in zip("ab", outlets, strict=True)]
    for thread in threads:
        thread.start().result(timeout=60)
    try:
        # the links first: forming them takes long enough on a loaded machine for a request
        # to finish solo, and then nothing of it would move
        store = dist.TCPStore(HOST, 0, is_master=True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=60))
        serving, layers = links(store.port, "g"), links(store.port, "g/layers")
        joins = [GroupCommand("join", Future(), link=serving[r], group_id="g",
                              layer_link=layers[r]) for r in range(2)]
        for rank, requests in own.items():
            for rid, prompt in requests.items():
                threads[rank].add(AddCommand(rid, prompt, params, 0))
        wait_for(lambda: all(len(outlets[r].tokens(rid)) >= 3
                             for r, requests in own.items() for rid in requests),
                 "three tokens of every request, solo")
        if leader_late_s:  # rank 1 gets the commit first: it serves on solo meanwhile
            threads[1].add(joins[1])
            before = {rid: len(outlets[1].tokens(rid)) for rid in own[1]}
            time.sleep(leader_late_s)
            if seen is not None:
                seen["solo_tokens_while_waiting"] = {
                    rid: len(outlets[1].tokens(rid)) - n for rid, n in before.items()}
            threads[0].add(joins[0])
        else:
            for rank in range(2):
                threads[rank].add(joins[rank])
        joins[1].done.result(timeout=60)  # a follower is done once it serves its stage
        wait_for(lambda: all(any(isinstance(e, Adopted) and e.request_id == rid
                                 for e in outlets[0].events) for rid in own[1]),
                 "the leader adopting rank 1's requests")
        done_solo = [rid for r, requests in own.items() for rid in requests
                       if outlets[r].finished(rid)]
        assert not done_solo, f"finished solo before the drop: {done_solo}"
        yield outlets, threads, joins
    finally:
        release.set()
        for thread in threads:
            thread.stop(timeout=10)


def test_the_leader_takes_and_aborts_requests_while_the_kv_moves(model, rank1_exchange_held):
    prompts = make_prompts(4, vocab=500, seed=11, lengths=[9, 23, 14, 30])
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    own = {0: {"a0": prompts[0], "a1": prompts[1]}, 1: {"b0": prompts[2]}}
    with joined_pair(model, own, params, rank1_exchange_held) as (outlets, threads, joins):
        moved = {rid: len(outlets[0].tokens(rid)) for rid in ("a0", "a1")}
        moved["b0"] = 0  # its tokens so far came from rank 1

        threads[0].add(AddCommand("q0", prompts[3], params, 0))  # arrives during the exchange
        threads[0].add(AbortCommand("a1"))  # its KV is moving
        wait_for(lambda: any(isinstance(e, Accepted) and e.request_id == "q0"
                             for e in outlets[0].events), "the new request taken")
        wait_for(lambda: any(isinstance(e, Aborted) and e.request_id == "a1"
                             for e in outlets[0].events), "the abort of a held request")
        time.sleep(0.3)  # ample for q0's prefill (a few ms), had it been run
        assert not outlets[0].tokens("q0")  # the held requests go first: nothing runs
        threads[0].add(AddCommand("bad", [10**6], params, 0))  # not a token id: refused
        wait_for(lambda: outlets[0].finished("bad"), "the refused request's error, at once")
        bad = [o for o in outlets[0].outputs() if o.request_id == "bad"]
        assert bad[-1].finish_reason == "error" and "token" in bad[-1].error
        assert not joins[0].done.done()  # the leader's join waits for the KV
        assert {rid: len(outlets[0].tokens(rid)) for rid in moved} == moved  # held: no tokens

        released_at = len(outlets[0].outputs())
        rank1_exchange_held.set()
        phases = joins[0].done.result(timeout=60)
        assert phases["exchange"] > 0 and phases["total"] >= phases["exchange"]
        for rid in ("a0", "b0", "q0"):
            wait_for(lambda rid=rid: outlets[0].finished(rid), f"{rid} to finish")
        assert len(outlets[0].tokens("a1")) == moved["a1"]  # never ran again
        outputs = outlets[0].outputs()
        first = {rid: next(i for i, o in enumerate(outputs)
                           if o.request_id == rid and o.new_token_ids
                           and (rid == "q0" or i >= released_at))
                 for rid in ("a0", "b0", "q0")}
        assert max(first["a0"], first["b0"]) < first["q0"]  # the moved requests went first
    merged = defaultdict(list)
    for outlet in (outlets[1], outlets[0]):  # b0's solo tokens came first, from rank 1
        for rid in ("a0", "a1", "b0", "q0"):
            merged[rid] += outlet.tokens(rid)
    expected = {rid: hf_greedy(model, prompt, MAX_TOKENS)
                for rid, prompt in {"a0": prompts[0], "a1": prompts[1], "b0": prompts[2],
                                    "q0": prompts[3]}.items()}
    for rid in ("a0", "b0", "q0"):
        assert merged[rid] == expected[rid], rid
    assert merged["a1"] == expected["a1"][:moved["a1"]]


def test_once_every_held_request_is_aborted_the_queue_runs_during_the_exchange(
        model, rank1_exchange_held):
    """Nothing waits for requests that are gone: with every held request aborted, a request
    queued during the exchange is served before the exchange ends. (Only rank 1 has requests:
    a micro-batch of the leader's own would have gone out at the drop and be waiting on rank
    1 for its KV, and the pipeline keeps the order of its micro-batches.)"""
    prompts = make_prompts(3, vocab=500, seed=12, lengths=[11, 19, 27])
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    own = {0: {}, 1: {"b0": prompts[1], "b1": prompts[0]}}
    with joined_pair(model, own, params, rank1_exchange_held) as (outlets, threads, joins):
        threads[0].add(AddCommand("q0", prompts[2], params, 0))
        for rid in own[1]:
            threads[0].add(AbortCommand(rid))
        wait_for(lambda: outlets[0].finished("q0"), "q0 served while the KV still moves",
                 timeout=10)  # well inside the links' 30 s: the group must not have broken
        assert not joins[0].done.done()  # the exchange is still held back
        rank1_exchange_held.set()
        joins[0].done.result(timeout=60)
    assert outlets[0].tokens("q0") == hf_greedy(model, prompts[2], MAX_TOKENS)


def test_a_member_committed_before_the_leader_serves_on_solo_until_it_enters(
        model, rank1_exchange_held):
    """Rank 1 gets its join 0.3 s before the leader does: it goes on decoding its request
    solo meanwhile (a worker's requests get tokens rather than wait for a late leader), then
    joins; every token is still transformers'."""
    prompts = make_prompts(2, vocab=500, seed=13, lengths=[12, 17])
    max_tokens = 8 * MAX_TOKENS  # a step takes a few ms here: b0 must not finish solo
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    own = {0: {"a0": prompts[0]}, 1: {"b0": prompts[1]}}
    seen: dict = {}
    with joined_pair(model, own, params, rank1_exchange_held, leader_late_s=0.3,
                     seen=seen) as (outlets, _, joins):
        assert seen["solo_tokens_while_waiting"]["b0"] >= 2
        rank1_exchange_held.set()
        joins[0].done.result(timeout=60)
        for rid in ("a0", "b0"):
            wait_for(lambda rid=rid: outlets[0].finished(rid), f"{rid} to finish")
    merged = {"a0": outlets[0].tokens("a0"),
              "b0": outlets[1].tokens("b0") + outlets[0].tokens("b0")}
    for rid, prompt in (("a0", prompts[0]), ("b0", prompts[1])):
        assert merged[rid] == hf_greedy(model, prompt, max_tokens), rid
