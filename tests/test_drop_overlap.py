"""A drop whose KV exchange overlaps serving, between real engine processes.

Two spawned processes each serve their own requests solo, then drop into one group with the
epoch's second link (``reconfigure.drop(..., layer_link)``), as a worker does. Rank 1's half
of the exchange (``KVMove.finish``) is held back until the leader has looked a few times, so
the test shows, not hopes, the order the leader serves in: at the drop, one micro-batch of the
leader's own requests goes out (their first stage's KV never moved; rank 1 enters the drop
late, so the leader computed that stage while it waited) and waits on rank 1 for its slices; then, while the KV moves, nothing else runs, neither rank 1's requests nor the ones
queued at the drop (the moved ones go first, and the exchange keeps the cores); once the KV is
in place, every moved request has its first token before or with the queued ones' first. Then every request's tokens, across solo, group
and solo again, must be exactly transformers' greedy tokens; a request aborted while held
never runs again and no block stays held. A second test kills rank 1 in its exchange: the
leader falls back to solo and finishes every request, rank 1's included, with no token lost
or repeated."""

from __future__ import annotations

import datetime
import mmap
import sys
import time
from collections import defaultdict

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from kunserve.worker.engine import EngineConfig
from kunserve.worker.sampling_params import SamplingParams
from tests.conftest import collect_members, hf_greedy, make_prompts

HOST = "127.0.0.1"
MAX_TOKENS = 16
SOLO_STEPS = 4
HANDSHAKE_S = 0.3  # rank 1 writes its slices this long after the leader stepped
HELD_STEPS = 5  # the leader's looks while the KV moves
LATE_S = 0.2  # rank 1 enters the drop this late
PHASES = ("solo", "group", "solo again")
LLAMA = dict(arch="llama", layers=4, hidden_size=64, heads=4, kv_heads=2,
             intermediate_size=128, vocab_size=512, seed=5)


def member_main(port: int, rank: int, config: EngineConfig, prompts: dict[str, list[int]],
                queued: dict[str, list[int]], mode: str, late: int, results: mp.Queue) -> None:
    import os

    from kunserve.worker.engine import LLMEngine
    from kunserve.worker.pipeline import kv_transfer, reconfigure
    from kunserve.worker.pipeline.stage_link import StageLink, StageLinkError

    store = dist.TCPStore(HOST, port, is_master=False, timeout=datetime.timedelta(seconds=60))
    if rank == 1:  # rank 1's exchange waits for the leader (or dies)
        finish = kv_transfer.KVMove.finish

        def held_finish(self):
            if mode == "die":
                os._exit(1)
            store.wait(["leader-stepped"], datetime.timedelta(seconds=60))
            time.sleep(HANDSHAKE_S)  # the leader must wait for rank 1's KVInPlace
            return finish(self)

        kv_transfer.KVMove.finish = held_finish
    try:
        engine = LLMEngine(config)
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
        tokens: dict[str, dict[str, list[int]]] = {p: defaultdict(list) for p in PHASES}
        report: dict = {}

        def take(outputs, phase: str) -> set[str]:
            for out in outputs:
                assert out.error is None, out.error
                tokens[phase][out.request_id] += out.new_token_ids
            return {out.request_id for out in outputs if out.new_token_ids}

        for rid, prompt in prompts.items():
            engine.add_request(prompt, params, rid)
        for _ in range(SOLO_STEPS):
            take(engine.step(), "solo")
        results.put((rank, "solo", tokens.pop("solo"), None))  # before rank 1 may die
        tokens["solo"] = {}
        link = StageLink(store, rank, 2, epoch=1, timeout_s=60, bind_host=HOST)
        layer_link = StageLink(dist.PrefixStore("layers", store), rank, 2, epoch=1,
                               timeout_s=60, bind_host=HOST)
        if rank == 0:
            for rid, prompt in queued.items():  # queued at the drop: no KV anywhere
                engine.add_request(prompt, params, rid)
        if rank == late:  # still in its last solo step (rank 1: the leader computes its
            time.sleep(LATE_S)  # requests' first stage meanwhile)
        solo_storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                         for t in engine.stages[0].parameters()}
        membership = reconfigure.drop(engine, link, "g1", layer_link)
        if rank == 0:
            kept = {t.untyped_storage().data_ptr() for t in engine.stages[0].parameters()}
            report["dropped_pages_bytes"] = sum(whole_pages(address, nbytes) for address, nbytes
                                                in solo_storages.items() if address not in kept)
            report["rows_ahead_used"] = engine.runner.rows_ahead_used
            report["ahead_s"] = membership.phases.get("first_stage_ahead")
        if rank == 1:
            begin = membership.stage_runner.run()
            if begin is not None:
                reconfigure.restore(engine, membership, begin)
            while engine.has_unfinished():
                take(engine.step(), "solo again")
            results.put((rank, tokens, report, None))
            return
        exchange = membership.exchange
        held = sorted(exchange.held)
        report["held"] = held
        # the leader's own requests went out at once: their stage 0 ran here during the drop
        report["in_flight_at_drop"] = [sorted(c.request_id for c in out.chunks)
                                       for out in engine._in_flight]
        cancelled = held[0]  # aborted while its KV moves
        assert exchange.cancel(cancelled)
        engine.abort_request(cancelled)
        report["cancelled"] = cancelled
        try:
            for _ in range(HELD_STEPS):  # what a worker's engine thread checks before a step
                report.setdefault("waits_for_kv", []).append(
                    reconfigure.waits_for_kv(engine, membership))
                report.setdefault("budget_while_held", []).append(
                    engine.scheduler.token_budget)
                time.sleep(0.01)
            report["exchange_done_while_held"] = exchange.done()
            store.set("leader-stepped", "1")
            start = time.monotonic()
            adopted = reconfigure.complete_drop(engine, membership)
            report["completed_after_s"] = time.monotonic() - start
            report["adopted"] = sorted(adopted)
            report["budget_after_adopting"] = engine.scheduler.token_budget
            first_token_step: dict[str, int] = {}
            for index in range(6):
                for rid in take(engine.step(), "group"):
                    first_token_step.setdefault(rid, index)
            report["first_token_step"] = first_token_step
            release = membership.params_release  # after the group's first round
            report["params_released"] = release.released.wait(10)
            report["returned_bytes"] = release.returned_bytes
            report["budget_after"] = engine.scheduler.token_budget
            report["max_num_batched_tokens"] = config.max_num_batched_tokens
            blocks = engine.block_manager
            report["held_tables_left"] = [k for k in blocks._tables
                                          if k.startswith(reconfigure._HOLD)]
            report["blocks_used"] = blocks.usage().used
            report["tables_used"] = sum(len(blocks.block_table(r))
                                        for r in engine.scheduler.requests)
            take(engine.drain(), "group")
            begin = reconfigure.plan_restore(engine, membership)
            reconfigure.restore(engine, membership, begin)
        except (StageLinkError, reconfigure.GroupFailed) as exc:
            report["failed"] = str(exc)
            if membership.link._group is not None:  # a step found the group broken
                reconfigure.fall_back(engine, membership)
        while engine.has_unfinished():
            take(engine.step(), "solo again")
        results.put((rank, tokens, report, None))
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        import traceback

        results.put((rank, {}, {}, traceback.format_exc() or repr(exc)))


def whole_pages(address: int, nbytes: int) -> int:
    """The bytes of the whole pages inside ``[address, address + nbytes)``."""
    page = mmap.PAGESIZE
    return max(0, (address + nbytes) // page * page - -(-address // page) * page)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    from kunserve.tiny_model import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("overlap") / "llama4", **LLAMA))


def run_pair(model: str, mode: str, late: int = 1):
    prompts = make_prompts(7, vocab=500, seed=4, lengths=[6, 21, 13, 30, 9, 17, 25])
    # a1's next token (13 + SOLO_STEPS tokens) is the first of a new block
    share = {0: {"a0": prompts[0], "a1": prompts[2]},
             1: {"b0": prompts[1], "b1": prompts[3], "b2": prompts[4]}}
    queued = {"q0": prompts[5], "q1": prompts[6]}
    ctx = mp.get_context("spawn")
    store = dist.TCPStore(HOST, 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=60))
    results = ctx.Queue()
    config = EngineConfig(model=model, num_threads=1)
    processes = [ctx.Process(target=member_main, daemon=True,
                             args=(store.port, r, config, share[r], queued if r == 0 else {},
                                   mode, late, results))
                 for r in range(2)]
    for process in processes:
        process.start()
    solo, got = collect_members(results, processes, 1 if mode == "die" else 2, 2)
    merged: dict[str, list[int]] = defaultdict(list)
    by_phase = [list(solo.values())]
    by_phase += [[tokens[phase] for _, tokens, _, _ in got] for phase in PHASES[1:]]
    for per_rank in by_phase:  # in the order they happened; a request is on one rank per phase
        for tokens in per_rank:
            for rid, ids in tokens.items():
                merged[rid] += ids
    prompt_of = {**share[0], **share[1], **queued}
    leader = next(report for rank, _, report, _ in got if rank == 0)
    return merged, prompt_of, leader


def test_the_moved_requests_go_first_and_nothing_runs_while_their_kv_moves(model):
    merged, prompt_of, leader = run_pair(model, "hold")
    # rank 1's requests wait for their KV; the leader's own (their stage 0's KV stayed in
    # place) went out as one micro-batch during the drop, and nothing else
    assert leader["held"] == ["b0", "b1", "b2"]
    assert leader["in_flight_at_drop"] == [["a0", "a1"]]
    # their first stage ran while the leader waited for rank 1, before the group formed:
    # the micro-batch took those rows (a1's token needed a new block then)
    assert leader["rows_ahead_used"] == 2 and leader["ahead_s"] > 0
    assert leader["exchange_done_while_held"] is False  # it waited during the exchange
    assert leader["waits_for_kv"] == [True] * HELD_STEPS  # no step: it would wait for rank 1
    assert leader["budget_while_held"] == [0] * HELD_STEPS  # not even the queued requests
    cancelled = leader["cancelled"]
    assert leader["adopted"] == [r for r in leader["held"] if r != cancelled]
    # nothing while held; then about one decode micro-batch (at least 32 tokens) until an
    # output of each moved request has come back; then the full budget again
    full = leader["max_num_batched_tokens"]
    assert 32 <= leader["budget_after_adopting"] < full and leader["budget_after"] == full
    first = leader["first_token_step"]  # each request's first token, by step after that
    moved = [*leader["in_flight_at_drop"][0], *leader["adopted"]]
    assert set(first) == {*moved, "q0", "q1"}
    assert max(first[r] for r in moved) <= min(first["q0"], first["q1"])
    assert first["a0"] == first["a1"] == 0  # the micro-batch that went out during the drop
    assert leader["completed_after_s"] >= HANDSHAKE_S  # it waited for rank 1's slices
    assert leader["held_tables_left"] == []
    # the dropped layers' whole pages went back to the kernel (RSS; on Linux), no more
    assert leader["params_released"] and leader["dropped_pages_bytes"] > 0
    if sys.platform.startswith("linux"):
        assert leader["returned_bytes"] == leader["dropped_pages_bytes"]
    assert leader["blocks_used"] == leader["tables_used"]  # nothing held, nothing leaked
    for rid, prompt in prompt_of.items():
        expected = hf_greedy(model, prompt, MAX_TOKENS)
        if rid == cancelled:  # its solo tokens, then nothing
            assert merged[rid] == expected[:SOLO_STEPS], rid
        else:
            assert merged[rid] == expected, rid


def test_a_leader_that_came_last_computes_its_requests_first_stage_at_the_drop(model):
    """The leader entered the drop after rank 1: nothing was computed ahead, so the
    micro-batch of its own requests runs its first stage during the drop (keeping them
    back until the exchange is over, behind the held ones, made their gap 2-3x longer in
    ``kunserve bench drop``); every token is still transformers'."""
    merged, prompt_of, leader = run_pair(model, "hold", late=0)
    assert leader["held"] == ["b0", "b1", "b2"]
    assert leader["in_flight_at_drop"] == [["a0", "a1"]]
    assert leader["rows_ahead_used"] == 0 and leader["ahead_s"] is None
    assert leader["budget_while_held"] == [0] * HELD_STEPS  # nothing else runs
    assert leader["completed_after_s"] >= HANDSHAKE_S
    assert leader["held_tables_left"] == []
    # the dropped layers' whole pages went back to the kernel (RSS; on Linux), no more
    assert leader["params_released"] and leader["dropped_pages_bytes"] > 0
    if sys.platform.startswith("linux"):
        assert leader["returned_bytes"] == leader["dropped_pages_bytes"]
    cancelled = leader["cancelled"]
    for rid, prompt in prompt_of.items():
        expected = hf_greedy(model, prompt, MAX_TOKENS)
        assert merged[rid] == (expected[:SOLO_STEPS] if rid == cancelled else expected), rid


def test_a_member_dying_in_the_overlapped_exchange_loses_no_request(model):
    merged, prompt_of, leader = run_pair(model, "die")
    assert "the group broke" in leader["failed"] or "rank 1" in leader["failed"]
    cancelled = leader["cancelled"]
    for rid, prompt in prompt_of.items():
        expected = hf_greedy(model, prompt, MAX_TOKENS)
        if rid == cancelled:
            assert merged[rid] == expected[:SOLO_STEPS], rid
        else:
            assert merged[rid] == expected, rid
