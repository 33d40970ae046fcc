"""Scheduler: chunked prefill under a token budget, FCFS admission, max_num_seqs, recompute
preemption, finish reasons, abort, and random workloads driven to completion."""

from __future__ import annotations

import random

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from kunserve.worker.block_manager import BlockManager
from kunserve.worker.cost_model import CostModel
from kunserve.worker.request import Request, RequestStatus
from kunserve.worker.sampling_params import SamplingParams
from kunserve.worker.scheduler import Scheduler, SchedulerConfig
from kunserve.worker.scheduler_output import SchedulerOutput

TOKEN = 7  # what the fake model samples unless told otherwise
EOS = 2


# -- factories -------------------------------------------------------------------------------
def make_scheduler(num_blocks: int = 64, block_size: int = 4, max_num_seqs: int = 128,
                   budget: int = 2048, max_model_len: int = 2048) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                                     max_model_len=max_model_len),
                     BlockManager(num_blocks, block_size))


def make_request(request_id: str, prompt_len: int = 8, max_tokens: int = 16,
                 eos_token_ids: tuple[int, ...] = (), base: int = 1000,
                 **params) -> Request:
    """Prompt tokens are ``base, base+1, ...`` so every chunk's token ids are recognisable."""
    return Request(request_id, list(range(base, base + prompt_len)),
                   SamplingParams(max_tokens=max_tokens, **params), eos_token_ids)


def make_requests(n: int, prompt_len: int = 8, **kw) -> list[Request]:
    return [make_request(f"r{i}", prompt_len, base=1000 * (i + 1), **kw) for i in range(n)]


def add_all(sched: Scheduler, requests: list[Request]) -> list[Request]:
    for r in requests:
        sched.add_request(r)
    return requests


def step(sched: Scheduler, token: int | dict[str, int] = TOKEN):
    """One engine step with a fake model: every chunk with ``samples`` gets ``token``."""
    out = sched.schedule()
    sampled = {c.request_id: (token if isinstance(token, int) else token[c.request_id])
               for c in out.chunks if c.samples}
    progressed = sched.update_from_output(out, sampled)
    return out, progressed


def chunk_of(out: SchedulerOutput, request_id: str):
    found = [c for c in out.chunks if c.request_id == request_id]
    assert len(found) <= 1
    return found[0] if found else None


def scheduled_ids(out: SchedulerOutput) -> list[str]:
    return [c.request_id for c in out.chunks]


def run_until_done(sched: Scheduler, max_steps: int = 1000) -> list[SchedulerOutput]:
    outs = []
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return outs
        outs.append(step(sched)[0])
    raise AssertionError(f"not finished after {max_steps} steps")


def assert_all_blocks_free(sched: Scheduler) -> None:
    usage = sched.block_manager.usage()
    assert usage.used == 0 and usage.free == usage.total


# -- queue -----------------------------------------------------------------------------------
def test_duplicate_request_id_raises():
    sched = make_scheduler()
    sched.add_request(make_request("a"))
    with pytest.raises(ValueError):
        sched.add_request(make_request("a"))
    assert sched.num_waiting == 1
    step(sched)  # also while running
    with pytest.raises(ValueError):
        sched.add_request(make_request("a"))
    assert sched.num_running == 1 and sched.num_waiting == 0


def test_empty_scheduler_schedules_nothing():
    sched = make_scheduler()
    out = sched.schedule()
    assert out.is_empty and out.preempted == [] and out.finished == []
    assert not sched.has_unfinished()


# -- chunked prefill and decode --------------------------------------------------------------
def test_prefill_fits_in_one_chunk_then_decodes_cost_one_token():
    sched = make_scheduler(budget=100)
    (r,) = add_all(sched, make_requests(1, prompt_len=10, max_tokens=4))
    out, progressed = step(sched)
    (c,) = out.chunks
    assert c.token_ids == r.prompt_token_ids and c.start_position == 0 and c.samples
    assert out.num_batched_tokens == 10
    assert progressed == [(r, [TOKEN])]
    assert r.num_computed_tokens == 10 and r.num_tokens == 11
    for i in range(3):
        out, _ = step(sched, token=50 + i)
        (c,) = out.chunks
        assert c.num_tokens == 1 and c.samples
        assert c.start_position == 10 + i
        assert c.token_ids == [r.token_slice(10 + i, 11 + i)[0]]
    assert r.output_token_ids == [TOKEN, 50, 51, 52]
    # the decode chunk's input is the previously sampled token
    assert c.token_ids == [51]
    assert r.status == RequestStatus.FINISHED_LENGTH


def test_prefill_is_chunked_by_budget_and_resumes_where_it_stopped():
    sched = make_scheduler(budget=8)
    (r,) = add_all(sched, make_requests(1, prompt_len=20, max_tokens=2))
    prompt = r.prompt_token_ids
    expected = [(0, 8, False), (8, 16, False), (16, 20, True)]
    for start, end, samples in expected:
        out, progressed = step(sched)
        (c,) = out.chunks
        assert c.start_position == start
        assert c.token_ids == prompt[start:end]
        assert c.samples is samples
        assert out.num_batched_tokens == end - start
        assert r.num_computed_tokens == end
        assert r.output_token_ids == ([TOKEN] if samples else [])
        assert progressed == ([(r, [TOKEN])] if samples else [])
        # blocks cover exactly what the chunk writes
        assert len(c.block_table) == sched.block_manager.blocks_needed(end)
    out, _ = step(sched)
    (c,) = out.chunks
    assert c.start_position == 20 and c.token_ids == [TOKEN] and c.samples
    assert r.finished


def test_decodes_are_served_before_a_new_prefill_which_gets_the_rest_of_the_budget():
    sched = make_scheduler(budget=10)
    a, b = add_all(sched, make_requests(2, prompt_len=4, max_tokens=50))
    step(sched)  # both prefills: 8 tokens
    c = add_all(sched, [make_request("c", prompt_len=30, base=9000)])[0]
    out, _ = step(sched)
    assert scheduled_ids(out) == ["r0", "r1", "c"]
    assert [ch.num_tokens for ch in out.chunks] == [1, 1, 8]
    cc = chunk_of(out, "c")
    assert cc.token_ids == c.prompt_token_ids[:8] and cc.start_position == 0 and not cc.samples
    out, _ = step(sched)
    cc = chunk_of(out, "c")
    assert cc.start_position == 8 and cc.token_ids == c.prompt_token_ids[8:16]
    assert out.num_batched_tokens == 10
    assert a.num_output_tokens == b.num_output_tokens == 3


def test_budget_exhausted_by_running_leaves_later_running_unscheduled():
    sched = make_scheduler(budget=6)
    a, b = add_all(sched, make_requests(2, prompt_len=10, max_tokens=3))
    out, _ = step(sched)
    # a gets the whole budget; b is not admitted (no budget left)
    assert scheduled_ids(out) == ["r0"]
    assert sched.num_running == 1 and sched.num_waiting == 1
    out, _ = step(sched)
    assert [(ch.request_id, ch.start_position, ch.num_tokens) for ch in out.chunks] == [
        ("r0", 6, 4), ("r1", 0, 2)]
    assert chunk_of(out, "r0").samples and not chunk_of(out, "r1").samples
    assert b.num_computed_tokens == 2


def test_samples_only_on_chunk_reaching_the_last_token():
    sched = make_scheduler(budget=3)
    add_all(sched, make_requests(1, prompt_len=7, max_tokens=3))
    outs = run_until_done(sched)
    flags = [ch.samples for out in outs for ch in out.chunks]
    # prefill 3 + 3 + 1 (samples), then two decodes
    assert flags == [False, False, True, True, True]


def test_tokens_per_step_never_exceed_budget():
    sched = make_scheduler(num_blocks=256, budget=7, max_num_seqs=5)
    add_all(sched, [make_request(f"r{i}", prompt_len=1 + (i * 5) % 13, max_tokens=1 + i % 6,
                                 base=1000 * (i + 1)) for i in range(12)])
    outs = run_until_done(sched)
    assert all(0 < out.num_batched_tokens <= 7 for out in outs)
    assert all(len(out.chunks) <= 5 for out in outs)
    assert_all_blocks_free(sched)


# -- admission -------------------------------------------------------------------------------
def test_fcfs_head_that_does_not_fit_blocks_everyone_behind_it():
    sched = make_scheduler(num_blocks=6, block_size=4)
    add_all(sched, [make_request("a", prompt_len=12, max_tokens=2, base=1000)])  # 3 blocks
    step(sched)
    big = make_request("big", prompt_len=16, max_tokens=1, base=2000)  # 4 blocks, 3 free
    small = make_request("small", prompt_len=2, max_tokens=1, base=3000)  # 1 block: would fit
    add_all(sched, [big, small])
    out, _ = step(sched)  # a finishes here (max_tokens=2)
    assert scheduled_ids(out) == ["a"]
    assert [r.request_id for r in sched.waiting] == ["big", "small"]
    assert small.num_computed_tokens == 0
    out, _ = step(sched)
    assert scheduled_ids(out) == ["big", "small"]
    run_until_done(sched)
    assert_all_blocks_free(sched)


def test_kv_bound_says_whether_the_last_step_held_a_request_back_for_blocks():
    """The load's ``kv_bound``: set by the step whose queue head did not fit (it stays set
    in the report written after requests finished and freed blocks, until the next step
    admits), clear when only seats or the budget hold the queue back."""
    sched = make_scheduler(num_blocks=6, block_size=4)
    add_all(sched, [make_request("a", prompt_len=12, max_tokens=2, base=1000)])  # 3 blocks
    step(sched)
    assert not sched.kv_bound
    add_all(sched, [make_request("big", prompt_len=16, max_tokens=1, base=2000)])  # 4 > 3
    step(sched)  # a finishes here, freeing its blocks: big still waits for the next step
    assert sched.kv_bound and sched.block_manager.num_free == 6 and sched.num_waiting == 1
    step(sched)  # big admitted
    assert not sched.kv_bound and sched.num_waiting == 0

    seats = make_scheduler(max_num_seqs=2)
    add_all(seats, make_requests(4, prompt_len=3, max_tokens=3))
    step(seats)
    assert seats.num_waiting == 2 and not seats.kv_bound  # seats, not blocks

    preempting = make_scheduler(num_blocks=4, block_size=4)
    add_all(preempting, [make_request("a", prompt_len=8, max_tokens=3, ignore_eos=True),
                         make_request("b", prompt_len=8, max_tokens=4, base=2000)])
    step(preempting)
    out, _ = step(preempting)
    assert out.preempted == ["b"] and preempting.kv_bound


def test_admission_in_arrival_order():
    sched = make_scheduler()
    add_all(sched, make_requests(4, prompt_len=3))
    out, _ = step(sched)
    assert scheduled_ids(out) == ["r0", "r1", "r2", "r3"]
    assert [r.request_id for r in sched.running] == ["r0", "r1", "r2", "r3"]


def test_max_num_seqs_caps_running():
    sched = make_scheduler(max_num_seqs=2)
    reqs = add_all(sched, make_requests(5, prompt_len=3, max_tokens=3))
    out, _ = step(sched)
    assert scheduled_ids(out) == ["r0", "r1"]
    assert sched.num_running == 2 and sched.num_waiting == 3
    for _ in range(2):
        out, _ = step(sched)
        assert scheduled_ids(out) == ["r0", "r1"]
    # r0 and r1 finished in the last step: two slots open
    assert reqs[0].finished and reqs[1].finished
    out, _ = step(sched)
    assert scheduled_ids(out) == ["r2", "r3"]
    for out in run_until_done(sched):
        assert sched.num_running <= 2 and len(out.chunks) <= 2
    assert all(r.status == RequestStatus.FINISHED_LENGTH for r in reqs)


# -- preemption ------------------------------------------------------------------------------
def test_pinned_requests_are_never_preemption_victims():
    """A request a migration is copying out is pinned: the request short of a block waits
    instead of preempting it, and a pinned request short of one waits too."""
    sched = make_scheduler(num_blocks=4, block_size=4)
    a, b = add_all(sched, [make_request("a", prompt_len=8, max_tokens=4, base=1000,
                                        ignore_eos=True),
                           make_request("b", prompt_len=8, max_tokens=4, base=2000,
                                        ignore_eos=True)])
    step(sched, {"a": 11, "b": 21})  # 4 blocks used; each needs a 3rd for its 9th token
    sched.pinned.add("b")
    out, _ = step(sched, {"a": 12, "b": 22})
    assert out.chunks == [] and out.preempted == []
    assert a.status == b.status == RequestStatus.RUNNING
    sched.pinned.clear()  # the migration is over
    out, _ = step(sched, {"a": 12})
    assert out.preempted == ["b"] and scheduled_ids(out) == ["a"]


def test_a_lone_request_short_of_blocks_waits_for_blocks_held_elsewhere():
    """Blocks held outside the scheduler (a drop's requests whose KV is moving) come back:
    the one running request that needs one of them waits, keeping its KV, instead of being
    finished for want of any block."""
    sched = make_scheduler(num_blocks=4, block_size=4)
    sched.block_manager.adopt({"exchanging/x": [2, 3]})
    req = add_all(sched, [make_request("r", prompt_len=8, max_tokens=4, base=1000,
                                       ignore_eos=True)])[0]
    step(sched, {"r": 11})  # 8 prompt tokens fill blocks 0 and 1
    out, _ = step(sched, {"r": 12})  # its 9th token needs a 3rd block: none is free
    assert out.chunks == [] and out.preempted == [] and out.finished == []
    assert req.status == RequestStatus.RUNNING and len(sched.block_manager.block_table("r")) == 2
    sched.block_manager.free("exchanging/x")
    out, _ = step(sched, {"r": 12})
    assert scheduled_ids(out) == ["r"] and req.output_token_ids == [11, 12]


def test_requests_adopted_first_go_ahead_and_are_preempted_last():
    """A drop's held requests join after the group served newer ones: they go first, so when
    blocks run out the newer request is the one preempted."""
    sched = make_scheduler(num_blocks=4, block_size=4)
    new = add_all(sched, [make_request("new", prompt_len=4, max_tokens=4, base=3000)])[0]
    step(sched, {"new": 31})  # 1 block, running
    old = make_request("old", prompt_len=8, max_tokens=4, base=1000, ignore_eos=True)
    old.output_token_ids, old.num_computed_tokens = [11], 8  # its 9th token is not computed
    old.status = RequestStatus.RUNNING
    sched.block_manager.adopt({"old": [1, 2]})
    sched.adopt_all([old], first=True)
    assert [r.request_id for r in sched.running] == ["old", "new"]
    with pytest.raises(ValueError, match="already in the engine"):
        sched.adopt_all([make_request("new")], first=True)
    # 1 block free: old takes it for its 9th token; new, which needs a 2nd block for its
    # 5th token, is preempted (adopted last, old would have been)
    out, _ = step(sched, {"old": 12})
    assert scheduled_ids(out) == ["old"] and out.preempted == ["new"]
    assert new.status == RequestStatus.WAITING and old.output_token_ids == [11, 12]


def test_a_token_cap_of_zero_schedules_nothing_and_lifting_it_serves_again():
    sched = make_scheduler(budget=64)
    add_all(sched, make_requests(2, prompt_len=8))
    sched.cap_tokens(0)
    out = sched.schedule()
    assert out.is_empty and sched.num_waiting == 2
    sched.cap_tokens(None)
    out, _ = step(sched)
    assert scheduled_ids(out) == ["r0", "r1"] and sched.token_budget == 64
    with pytest.raises(ValueError, match="at least 0"):
        sched.cap_tokens(-1)


def test_a_token_cap_ends_once_an_output_of_each_request_it_waits_for_came_back():
    """What a drop's leader does once the moved requests' KV is in: they split evenly over
    the outputs in flight (the queued request does not count: it waits for them), and every
    output stays small until an output of each has come back, so none of them waits behind a
    queued prefill, to go out or (the first stage computing it) to come back; then the full
    budget."""
    sched = make_pipelined(2, max_num_batched_tokens=512, num_blocks=128)
    old = make_requests(4, prompt_len=4, max_tokens=8)
    add_all(sched, old)
    first = sched.schedule()  # prefill the 4 'moved' requests
    second = sched.schedule()
    sched.update_from_output(first, sample_all(first))
    sched.update_from_output(second, sample_all(second))
    add_all(sched, [make_request("queued", prompt_len=300, base=9000)])
    sched.cap_tokens(10, ["r0", "r1", "r2", "r3"])
    a = sched.schedule()  # 4 running sequences: 2 seats an output while capped
    assert scheduled_ids(a) == ["r0", "r1"] and sched.token_budget == 10
    b = sched.schedule()
    assert scheduled_ids(b) == ["r2", "r3"]
    sched.update_from_output(a, sample_all(a))
    assert sched.token_budget == 10  # r2 and r3 are not back yet
    c = sched.schedule()
    assert scheduled_ids(c) == ["r0", "r1"]  # the prefill still waits
    sched.update_from_output(b, sample_all(b))
    assert sched.token_budget == 512  # an output of every request it waited for came back
    d = sched.schedule()  # 5 live sequences: 3 seats, the prefill uncapped
    assert scheduled_ids(d) == ["r2", "r3", "queued"]
    assert chunk_of(d, "queued").num_tokens == 300


def test_a_cap_of_one_output_sends_every_running_request_once_then_nothing():
    """What a drop's leader does with its own moved requests while the others' KV moves:
    one micro-batch of all of them (no even split over the outputs in flight, no queued
    request), then nothing until the next cap; the cap still waits for them to come back."""
    sched = make_pipelined(2, max_num_batched_tokens=512, num_blocks=128)
    add_all(sched, make_requests(4, prompt_len=4, max_tokens=8))
    first, second = sched.schedule(), sched.schedule()  # prefill the 4 'moved' requests
    sched.update_from_output(first, sample_all(first))
    sched.update_from_output(second, sample_all(second))
    add_all(sched, [make_request("queued", prompt_len=300, base=9000)])
    sched.cap_tokens(10, ["r0", "r1", "r2", "r3"], outputs=1)
    a = sched.schedule()
    assert scheduled_ids(a) == ["r0", "r1", "r2", "r3"]  # all of them, the prefill waits
    assert sched.schedule().is_empty and sched.token_budget == 0  # that one output only
    assert sched.capped_until == {"r0", "r1", "r2", "r3"}
    sched.cap_tokens(10, sched.capped_until)  # the others' KV is in: outputs go out again
    b = sched.schedule()  # all 4 still in flight: the prefill's first 10 tokens
    assert scheduled_ids(b) == ["queued"] and chunk_of(b, "queued").num_tokens == 10
    sched.update_from_output(a, sample_all(a))
    assert sched.token_budget == 512 and sched.capped_until == frozenset()
    with pytest.raises(ValueError, match="needs a token cap"):
        sched.cap_tokens(None, outputs=1)


def test_a_token_cap_ends_when_the_requests_it_waits_for_are_gone():
    sched = make_scheduler(budget=64)
    add_all(sched, make_requests(2, prompt_len=8))
    step(sched)  # both running
    sched.cap_tokens(0, ["r0"])
    assert sched.schedule().is_empty and sched.token_budget == 0
    sched.finish_request("r0", RequestStatus.FINISHED_ABORTED)  # an abort
    out, _ = step(sched)
    assert scheduled_ids(out) == ["r1"] and sched.token_budget == 64
    sched.cap_tokens(0, ["r1"])
    sched.running.remove(sched.requests["r1"])
    sched._preempt(sched.requests["r1"], SchedulerOutput())  # it starts over: no wait
    assert scheduled_ids(sched.schedule()) == ["r1"] and sched.token_budget == 64


def test_preempts_most_recently_admitted_and_recomputes_prompt_plus_output():
    sched = make_scheduler(num_blocks=4, block_size=4)
    a = make_request("a", prompt_len=8, max_tokens=3, base=1000, ignore_eos=True)
    b = make_request("b", prompt_len=8, max_tokens=4, base=2000)
    c = make_request("c", prompt_len=1, max_tokens=1, base=3000)
    add_all(sched, [a, b])
    out, _ = step(sched, {"a": 11, "b": 21})
    assert scheduled_ids(out) == ["a", "b"]
    assert sched.block_manager.num_free == 0
    add_all(sched, [c])

    # a needs a 3rd block for its 9th token: b (admitted last) is preempted
    b_blocks = set(sched.block_manager.block_table("b"))
    out, _ = step(sched, {"a": 12})
    assert out.preempted == ["b"]
    assert scheduled_ids(out) == ["a"]  # no admissions (neither b nor c) in this step
    assert b.status == RequestStatus.WAITING and b.num_computed_tokens == 0
    assert b.num_preemptions == 1 and sched.num_preemptions == 1
    assert sched.block_manager.block_table("b") == []
    assert [r.request_id for r in sched.waiting] == ["b", "c"]
    assert [r.request_id for r in sched.running] == ["a"]
    assert set(chunk_of(out, "a").block_table) & b_blocks  # a took one of b's blocks
    assert sched.block_manager.usage().used == 3
    assert b.output_token_ids == [21]  # generated tokens are kept

    # b needs 3 blocks to recompute its 9 tokens, 1 free: FCFS blocks c as well
    out, _ = step(sched, {"a": 13})
    assert scheduled_ids(out) == ["a"] and out.preempted == []
    assert a.status == RequestStatus.FINISHED_LENGTH
    assert a.output_token_ids == [11, 12, 13]

    # a is gone: b recomputes prompt + its generated token in one chunk, then samples
    out, _ = step(sched, {"b": 22, "c": 31})
    assert out.finished == ["a"]
    cb = chunk_of(out, "b")
    assert cb.token_ids == b.prompt_token_ids + [21]
    assert cb.start_position == 0 and cb.samples
    assert b.output_token_ids == [21, 22]
    assert b.num_computed_tokens == 9
    run_until_done(sched)
    assert b.output_token_ids[:2] == [21, 22] and b.num_output_tokens == 4
    assert b.num_preemptions == 1
    assert_all_blocks_free(sched)


def test_preemption_takes_victims_from_the_back_and_keeps_their_order():
    # 4 requests of 1 block each; 4 blocks; each needs a 2nd block on its first decode
    sched = make_scheduler(num_blocks=4, block_size=4)
    reqs = add_all(sched, make_requests(4, prompt_len=4, max_tokens=3))
    step(sched)
    out, _ = step(sched)
    # r0 needs a block: r3 goes; r1 needs a block: r2 goes; r1 gets r2's block
    assert out.preempted == ["r3", "r2"]
    assert scheduled_ids(out) == ["r0", "r1"]
    assert [r.request_id for r in sched.waiting] == ["r2", "r3"]
    assert sched.num_preemptions == 2
    assert [r.num_preemptions for r in reqs] == [0, 0, 1, 1]
    run_until_done(sched)
    assert all(r.num_output_tokens == 3 for r in reqs)
    assert_all_blocks_free(sched)


def test_running_request_can_preempt_itself_when_it_is_the_newest():
    # a takes 3 of 4 blocks, b the last; b decodes into a new block: nobody after b, so b itself
    sched = make_scheduler(num_blocks=4, block_size=4)
    a = make_request("a", prompt_len=9, max_tokens=3, base=1000)  # 3 blocks throughout
    b = make_request("b", prompt_len=4, max_tokens=10, base=2000)  # 1 block, grows to 4
    add_all(sched, [a, b])
    step(sched)
    out, _ = step(sched)  # a: token 10 fits its 3rd block; b: token 5 needs a 2nd block
    assert scheduled_ids(out) == ["a"]
    assert out.preempted == ["b"]
    assert b.num_computed_tokens == 0 and b.status == RequestStatus.WAITING
    assert sched.block_manager.block_table("b") == []
    assert sched.block_manager.usage().used == 3
    run_until_done(sched)
    assert a.num_output_tokens == 3 and b.num_output_tokens == 10
    assert b.num_preemptions == 1 and a.num_preemptions == 0
    assert_all_blocks_free(sched)


def test_preempted_request_recompute_is_chunked_and_samples_at_the_end():
    sched = make_scheduler(num_blocks=4, block_size=4, budget=5)
    a = make_request("a", prompt_len=5, max_tokens=5, base=1000)  # 2 blocks, grows to 3
    b = make_request("b", prompt_len=7, max_tokens=6, base=2000)  # 2 blocks
    add_all(sched, [a, b])
    step(sched, {"a": 11})  # a prefill (5 tokens = whole budget)
    out, _ = step(sched, {"a": 12})  # a decode, b prefill 4
    assert not chunk_of(out, "b").samples
    out, _ = step(sched, {"a": 13, "b": 21})  # a decode, b prefill 3 -> samples
    assert chunk_of(out, "b").samples
    out, _ = step(sched, {"a": 14, "b": 22})  # a's 8th position: still 2 blocks; b decode
    assert out.preempted == []
    out, _ = step(sched, {"a": 15})  # a's 9th position needs a 3rd block: b preempted
    assert out.preempted == ["b"]
    assert b.output_token_ids == [21, 22]
    assert a.finished
    seen = []
    while not b.finished:
        out, _ = step(sched, 30)
        if c := chunk_of(out, "b"):
            seen.append(c)
    full = b.prompt_token_ids + [21, 22]
    # recompute of 9 tokens under a budget of 5: two chunks, only the second samples
    assert [(c.start_position, c.token_ids, c.samples) for c in seen[:2]] == [
        (0, full[:5], False), (5, full[5:], True)]
    assert [(c.start_position, c.token_ids) for c in seen[2:]] == [
        (9, [30]), (10, [30]), (11, [30])]
    assert b.output_token_ids == [21, 22, 30, 30, 30, 30]
    assert_all_blocks_free(sched)


# -- finish reasons --------------------------------------------------------------------------
def test_max_tokens_finishes_with_length():
    sched = make_scheduler()
    (r,) = add_all(sched, make_requests(1, max_tokens=3))
    outs = run_until_done(sched)
    assert len(outs) == 3
    assert r.status == RequestStatus.FINISHED_LENGTH and r.status.finish_reason == "length"
    assert r.num_output_tokens == 3
    assert_all_blocks_free(sched)


def test_eos_finishes_with_stop():
    sched = make_scheduler()
    (r,) = add_all(sched, [make_request("a", max_tokens=10, eos_token_ids=(EOS, 99))])
    step(sched, 5)
    step(sched, 99)
    assert r.status == RequestStatus.FINISHED_STOPPED and r.status.finish_reason == "stop"
    assert r.output_token_ids == [5, 99]
    assert not sched.has_unfinished()
    assert_all_blocks_free(sched)


def test_ignore_eos_keeps_going_until_max_tokens():
    sched = make_scheduler()
    (r,) = add_all(sched, [make_request("a", max_tokens=4, eos_token_ids=(EOS,),
                                        ignore_eos=True)])
    for _ in range(4):
        step(sched, EOS)
    assert r.output_token_ids == [EOS] * 4
    assert r.status == RequestStatus.FINISHED_LENGTH


def test_stop_token_ids_finish_with_stop_even_with_ignore_eos():
    sched = make_scheduler()
    (r,) = add_all(sched, [make_request("a", max_tokens=10, stop_token_ids=[42],
                                        ignore_eos=True)])
    step(sched, 5)
    assert not r.finished
    step(sched, 42)
    assert r.status == RequestStatus.FINISHED_STOPPED
    assert r.output_token_ids == [5, 42]


def test_stop_on_the_last_allowed_token_is_stop_not_length():
    sched = make_scheduler()
    (r,) = add_all(sched, [make_request("a", max_tokens=2, eos_token_ids=(EOS,))])
    step(sched, 5)
    step(sched, EOS)
    assert r.status == RequestStatus.FINISHED_STOPPED


def test_reaching_max_model_len_finishes_with_length():
    sched = make_scheduler(max_model_len=12)
    (r,) = add_all(sched, make_requests(1, prompt_len=8, max_tokens=100))
    outs = run_until_done(sched)
    assert r.status == RequestStatus.FINISHED_LENGTH
    assert r.num_tokens == 12 and r.num_output_tokens == 4
    # the last token is never fed back: at most max_model_len - 1 positions are computed
    assert max(c.start_position + c.num_tokens for o in outs for c in o.chunks) == 11
    assert_all_blocks_free(sched)


def test_finished_request_is_reported_in_next_output_once():
    sched = make_scheduler()
    add_all(sched, make_requests(2, max_tokens=1))
    out, _ = step(sched)
    assert out.finished == []
    assert not sched.has_unfinished()
    out = sched.schedule()
    assert sorted(out.finished) == ["r0", "r1"] and out.is_empty
    assert sched.schedule().finished == []


# -- abort -----------------------------------------------------------------------------------
def test_abort_running_frees_blocks_and_is_reported_next_step():
    sched = make_scheduler()
    a, b = add_all(sched, make_requests(2, prompt_len=9, max_tokens=10))
    step(sched)
    used = sched.block_manager.usage().used
    a_blocks = len(sched.block_manager.block_table("r0"))
    assert sched.finish_request("r0", RequestStatus.FINISHED_ABORTED) is a
    assert a.status == RequestStatus.FINISHED_ABORTED and a.status.finish_reason == "abort"
    assert sched.block_manager.block_table("r0") == []
    assert sched.block_manager.usage().used == used - a_blocks
    assert [r.request_id for r in sched.running] == ["r1"]
    out, _ = step(sched)
    assert out.finished == ["r0"]
    assert scheduled_ids(out) == ["r1"]
    out, _ = step(sched)
    assert out.finished == []


def test_abort_waiting_request():
    sched = make_scheduler(max_num_seqs=1)
    a, b = add_all(sched, make_requests(2))
    step(sched)
    assert sched.finish_request("r1", RequestStatus.FINISHED_ABORTED) is b
    assert sched.num_waiting == 0
    out, _ = step(sched)
    assert out.finished == ["r1"] and scheduled_ids(out) == ["r0"]


def test_abort_unknown_or_twice_returns_none():
    sched = make_scheduler()
    assert sched.finish_request("nope", RequestStatus.FINISHED_ABORTED) is None
    add_all(sched, make_requests(1))
    assert sched.finish_request("r0", RequestStatus.FINISHED_ABORTED) is not None
    assert sched.finish_request("r0", RequestStatus.FINISHED_ABORTED) is None
    assert sched.schedule().finished == ["r0"]


def test_abort_between_schedule_and_update_is_ignored_by_update():
    sched = make_scheduler()
    a, b = add_all(sched, make_requests(2, max_tokens=5))
    out = sched.schedule()
    sched.finish_request("r0", RequestStatus.FINISHED_ABORTED)
    progressed = sched.update_from_output(out, {"r0": TOKEN, "r1": TOKEN})
    assert progressed == [(b, [TOKEN])]
    assert a.output_token_ids == [] and a.status == RequestStatus.FINISHED_ABORTED
    assert sched.block_manager.block_table("r0") == []
    assert sched.schedule().finished == ["r0"]


def test_abort_preempted_request():
    sched = make_scheduler(num_blocks=4, block_size=4)
    reqs = add_all(sched, make_requests(4, prompt_len=4, max_tokens=3))
    step(sched)
    out, _ = step(sched)
    assert out.preempted == ["r3", "r2"]
    assert sched.finish_request("r2", RequestStatus.FINISHED_ABORTED) is reqs[2]
    assert [r.request_id for r in sched.waiting] == ["r3"]
    run_until_done(sched)
    assert_all_blocks_free(sched)


# -- known gap -------------------------------------------------------------------------------
def test_request_outgrowing_the_whole_cache_still_finishes():
    # capacity 4 blocks * 4 = 16 tokens; max_model_len 64 allows 63 positions
    sched = make_scheduler(num_blocks=4, block_size=4, budget=8, max_model_len=64)
    (r,) = add_all(sched, make_requests(1, prompt_len=10, max_tokens=40))
    run_until_done(sched, max_steps=500)
    assert r.finished
    assert r.status.finish_reason == "length"
    assert r.num_computed_tokens == 16 and r.num_tokens == 17  # the cache was full
    assert_all_blocks_free(sched)


# -- property: random workloads to completion ------------------------------------------------
@st.composite
def workloads(draw):
    block_size = draw(st.integers(1, 6))
    max_model_len = draw(st.integers(4, 40))
    # any single request fits the whole cache (the engine's precondition for progress)
    min_blocks = -(-max_model_len // block_size)
    num_blocks = draw(st.integers(min_blocks, min_blocks + 12))
    budget = draw(st.integers(1, 24))
    max_num_seqs = draw(st.integers(1, 6))
    n = draw(st.integers(1, 10))
    specs = []
    for i in range(n):
        prompt_len = draw(st.integers(1, max_model_len - 1))
        specs.append(dict(
            prompt_len=prompt_len,
            max_tokens=draw(st.integers(1, 30)),
            eos=draw(st.booleans()),
            ignore_eos=draw(st.booleans()),
            arrive_at=draw(st.integers(0, 8)),
            abort_at=draw(st.none() | st.integers(0, 30)),
            base=1000 * (i + 1),
        ))
    return dict(block_size=block_size, max_model_len=max_model_len, num_blocks=num_blocks,
                budget=budget, max_num_seqs=max_num_seqs, specs=specs)


def check_invariants(sched: Scheduler, live: dict[str, Request]) -> None:
    bm = sched.block_manager
    held = []
    for rid, r in sched.requests.items():
        table = bm.block_table(rid)
        held += table
        if r.status == RequestStatus.WAITING:
            assert table == [] and r.num_computed_tokens == 0
        else:
            assert r.status == RequestStatus.RUNNING
            assert len(table) >= bm.blocks_needed(r.num_computed_tokens)
    assert len(held) == len(set(held)), "a block is held by two requests"
    assert bm.usage().used == len(held)
    assert {r.request_id for r in sched.running} | {r.request_id for r in sched.waiting} == set(
        sched.requests)
    assert len(sched.running) + len(sched.waiting) == len(sched.requests)
    assert len(sched.running) <= sched.config.max_num_seqs
    assert set(sched.requests) == set(live)


@settings(max_examples=150, deadline=None)
@given(w=workloads(), seed=st.integers(0, 2**16))
def test_random_workloads_finish_and_free_every_block(w, seed):
    rng = random.Random(seed)
    sched = make_scheduler(num_blocks=w["num_blocks"], block_size=w["block_size"],
                           max_num_seqs=w["max_num_seqs"], budget=w["budget"],
                           max_model_len=w["max_model_len"])
    bm = sched.block_manager
    requests = {f"r{i}": make_request(f"r{i}", s["prompt_len"], s["max_tokens"],
                                      eos_token_ids=(EOS,) if s["eos"] else (),
                                      base=s["base"], ignore_eos=s["ignore_eos"])
                for i, s in enumerate(w["specs"])}
    specs = dict(zip(requests, w["specs"], strict=True))
    live: dict[str, Request] = {}
    reported: set[str] = set()
    finished_ids: set[str] = set()
    # bound: once a request is the oldest running one it gains >= 1 token every step
    max_steps = 10 + sum(s["arrive_at"] + s["prompt_len"] + s["max_tokens"] + 2
                         for s in w["specs"])
    for t in range(max_steps):
        for rid, s in specs.items():
            if s["arrive_at"] == t:
                sched.add_request(requests[rid])
                live[rid] = requests[rid]
            if s["abort_at"] == t and rid in live:
                assert sched.finish_request(rid, RequestStatus.FINISHED_ABORTED) is not None
                del live[rid]
                finished_ids.add(rid)
        if t > max(s["arrive_at"] for s in w["specs"]) and not sched.has_unfinished():
            break
        waiting_before = {r.request_id for r in sched.waiting}
        before = {rid: (r.num_computed_tokens, r.num_tokens) for rid, r in live.items()}

        out = sched.schedule()
        assert set(out.finished) <= finished_ids and not set(out.finished) & reported
        reported |= set(out.finished)
        assert out.num_batched_tokens <= w["budget"]
        ids = scheduled_ids(out)
        assert len(ids) == len(set(ids)) <= w["max_num_seqs"]
        assert not set(ids) & set(out.preempted)
        if out.preempted:
            assert not set(ids) & waiting_before, "admitted in a step that preempted"
            assert sched.waiting and [r.request_id for r in sched.waiting][
                :len(out.preempted)] == out.preempted[::-1]
        for rid in out.preempted:
            r = requests[rid]
            assert r.num_computed_tokens == 0 and bm.block_table(rid) == []
        for c in out.chunks:
            r = requests[c.request_id]
            computed, total = before[c.request_id]
            assert c.num_tokens >= 1
            assert c.start_position == computed  # preempted ones are not scheduled
            assert c.token_ids == (r.prompt_token_ids + r.output_token_ids)[
                c.start_position:c.start_position + c.num_tokens]
            assert c.samples == (c.start_position + c.num_tokens == total)
            assert len(c.block_table) >= bm.blocks_needed(c.start_position + c.num_tokens)
            assert c.block_table == bm.block_table(c.request_id)
        sampled = {c.request_id: rng.choice([EOS, 3, 4, 5, 6, 8, 9]) for c in out.chunks
                   if c.samples}
        sched.update_from_output(out, sampled)
        for c in out.chunks:
            r = requests[c.request_id]
            assert r.num_computed_tokens == before[c.request_id][0] + c.num_tokens
            if r.finished:
                assert r.status in (RequestStatus.FINISHED_LENGTH,
                                    RequestStatus.FINISHED_STOPPED)
                live.pop(c.request_id, None)
                finished_ids.add(c.request_id)
        check_invariants(sched, live)
    else:
        raise AssertionError(f"workload not finished after {max_steps} steps")

    event(f"preemptions>0: {sched.num_preemptions > 0}")
    assert not sched.has_unfinished() and not live
    assert sched.num_running == sched.num_waiting == 0
    assert bm.usage().used == 0 and bm.num_free == w["num_blocks"]
    assert set(sched.schedule().finished) | reported == set(requests)
    for rid, r in requests.items():
        assert r.finished
        s = specs[rid]
        if r.status == RequestStatus.FINISHED_ABORTED:
            continue
        out_ids = r.output_token_ids
        assert 1 <= len(out_ids) <= s["max_tokens"]
        assert r.num_tokens <= w["max_model_len"]
        if r.status == RequestStatus.FINISHED_STOPPED:
            assert s["eos"] and not s["ignore_eos"] and out_ids[-1] == EOS
        else:
            assert len(out_ids) == s["max_tokens"] or r.num_tokens >= w["max_model_len"]
        if s["eos"] and not s["ignore_eos"]:
            assert EOS not in out_ids[:-1]


# -- micro-batches in flight (a pipeline group) ----------------------------------------------
def make_pipelined(num_micro_batches: int, **kw) -> Scheduler:
    bm_kw = {k: kw.pop(k) for k in ("num_blocks", "block_size") if k in kw}
    return Scheduler(SchedulerConfig(num_micro_batches=num_micro_batches, **kw),
                     BlockManager(bm_kw.get("num_blocks", 64), bm_kw.get("block_size", 4)))


def sample_all(out: SchedulerOutput, token: int = TOKEN) -> dict[str, int]:
    return {c.request_id: token for c in out.chunks if c.samples}


def test_in_flight_request_is_skipped_until_its_output_comes_back():
    sched = make_pipelined(2)
    reqs = add_all(sched, make_requests(4, prompt_len=5, max_tokens=3))
    first, second = sched.schedule(), sched.schedule()
    # the live sequences split evenly over the two micro-batches
    assert scheduled_ids(first) == ["r0", "r1"] and scheduled_ids(second) == ["r2", "r3"]
    assert sched.num_in_flight == 4 and sched.is_in_flight("r0")
    assert sched.schedule().is_empty  # everyone is in flight
    sched.update_from_output(first, {"r0": 11, "r1": 12})
    assert not sched.is_in_flight("r0") and sched.is_in_flight("r2")
    third = sched.schedule()
    assert scheduled_ids(third) == ["r0", "r1"]
    assert [(c.start_position, c.token_ids) for c in third.chunks] == [(5, [11]), (5, [12])]
    sched.update_from_output(second, sample_all(second))
    sched.update_from_output(third, sample_all(third))
    assert [r.num_output_tokens for r in reqs] == [2, 2, 1, 1]


def test_chunked_prefill_waits_for_its_previous_chunk():
    sched = make_pipelined(2, max_num_batched_tokens=4)
    (r,) = add_all(sched, make_requests(1, prompt_len=10))
    first = sched.schedule()
    assert [(c.start_position, c.num_tokens) for c in first.chunks] == [(0, 4)]
    assert sched.schedule().is_empty
    sched.update_from_output(first, {})
    second = sched.schedule()
    assert [(c.start_position, c.num_tokens) for c in second.chunks] == [(4, 4)]
    assert r.num_computed_tokens == 4


def test_a_request_needing_blocks_held_by_an_in_flight_one_waits_then_preempts_it():
    sched = make_pipelined(2, num_blocks=4, block_size=4)
    old = make_request("old", prompt_len=4, max_tokens=5, base=1000)  # 1 block, then 2
    new = make_request("new", prompt_len=12, max_tokens=5, base=2000)  # 3 blocks
    waiting = make_request("waiting", prompt_len=1, max_tokens=1, base=3000)
    add_all(sched, [old, new])
    first, second = sched.schedule(), sched.schedule()
    assert scheduled_ids(first) == ["old"] and scheduled_ids(second) == ["new"]
    assert sched.block_manager.num_free == 0
    sched.update_from_output(first, {"old": 11})
    add_all(sched, [waiting])
    # old needs a 2nd block; only "new" could free one and it is in flight: old waits, nobody
    # is preempted and nobody is admitted
    stalled = sched.schedule()
    assert stalled.is_empty and stalled.preempted == []
    assert new.num_preemptions == 0 and sched.num_waiting == 1
    sched.update_from_output(second, {"new": 21})
    out = sched.schedule()
    assert out.preempted == ["new"] and scheduled_ids(out) == ["old"]
    assert new.status == RequestStatus.WAITING and new.output_token_ids == [21]


def test_the_victim_is_the_newest_request_not_in_flight():
    sched = make_pipelined(3, num_blocks=5, block_size=4)
    a = make_request("a", prompt_len=4, max_tokens=5, base=1000)
    b = make_request("b", prompt_len=4, max_tokens=5, base=2000)
    c = make_request("c", prompt_len=12, max_tokens=5, base=3000)
    add_all(sched, [a, b, c])
    outs = [sched.schedule() for _ in range(3)]
    assert [scheduled_ids(o) for o in outs] == [["a"], ["b"], ["c"]]
    sched.update_from_output(outs[0], {"a": 1})
    sched.update_from_output(outs[1], {"b": 2})
    out = sched.schedule()  # a needs a block: c is newest but in flight, so b goes
    assert out.preempted == ["b"] and scheduled_ids(out) == ["a"]
    assert sched.block_manager.block_table("c") == outs[2].chunks[0].block_table


def test_abort_in_flight_ignores_its_chunk_and_holds_the_id_until_it_returns():
    sched = make_pipelined(2)
    add_all(sched, make_requests(2, prompt_len=5, max_tokens=3))
    first, second = sched.schedule(), sched.schedule()
    assert sched.finish_request("r0", RequestStatus.FINISHED_ABORTED) is not None
    assert sched.block_manager.block_table("r0") == []
    with pytest.raises(ValueError, match="still in flight"):
        sched.add_request(make_request("r0"))
    progressed = sched.update_from_output(first, {"r0": TOKEN})
    assert progressed == []
    sched.add_request(make_request("r0", base=5000))  # its old chunk is back: the id is free
    sched.update_from_output(second, sample_all(second))
    run_until_done(sched)
    assert_all_blocks_free(sched)


def test_updating_an_output_twice_is_an_error():
    sched = make_pipelined(2)
    add_all(sched, make_requests(1))
    out = sched.schedule()
    sched.update_from_output(out, sample_all(out))
    with pytest.raises(ValueError, match="no chunk in flight"):
        sched.update_from_output(out, sample_all(out))


def test_seats_spread_sequences_over_micro_batches():
    sched = make_pipelined(4)
    add_all(sched, make_requests(9, prompt_len=2))
    outs = [sched.schedule() for _ in range(4)]
    assert [len(o.chunks) for o in outs] == [3, 3, 3, 0]
    assert sorted(i for o in outs for i in scheduled_ids(o)) == sorted(sched.requests)


@settings(max_examples=150, deadline=None)
@given(w=workloads(), depth=st.integers(2, 4), seed=st.integers(0, 2**16),
       lookahead_min_tokens=st.none() | st.integers(1, 8))
def test_random_workloads_with_micro_batches_in_flight(w, depth, seed, lookahead_min_tokens):
    """Outputs go out ``depth`` at a time and come back in order: each chunk continues
    exactly where the request's last scheduled chunk ended and carries its own tokens, the
    blocks of a chunk in flight stay its request's, and everything finishes with every block
    free. Without lookahead no request is in two outputs in flight; with it (a cost model and
    ``lookahead_min_tokens``) a request goes out again only with known tokens (the chunk in
    flight does not sample) and is never preempted meanwhile."""
    rng = random.Random(seed)
    model = None if lookahead_min_tokens is None else CostModel(2e-8, 1e-8, 4e-6, 2e-3)
    sched = Scheduler(SchedulerConfig(max_num_seqs=w["max_num_seqs"],
                                      max_num_batched_tokens=w["budget"],
                                      max_model_len=w["max_model_len"],
                                      num_micro_batches=depth, cost_model=model,
                                      lookahead_min_tokens=lookahead_min_tokens or 1),
                      BlockManager(w["num_blocks"], w["block_size"]))
    bm = sched.block_manager
    requests = {f"r{i}": make_request(f"r{i}", s["prompt_len"], s["max_tokens"],
                                      eos_token_ids=(EOS,) if s["eos"] else (),
                                      base=s["base"], ignore_eos=s["ignore_eos"])
                for i, s in enumerate(w["specs"])}
    specs = dict(zip(requests, w["specs"], strict=True))
    in_flight: list[SchedulerOutput] = []
    max_steps = depth * (10 + sum(s["arrive_at"] + s["prompt_len"] + s["max_tokens"] + 2
                                  for s in w["specs"]))
    for t in range(max_steps):
        for rid, s in specs.items():
            if s["arrive_at"] == t:
                sched.add_request(requests[rid])
            if s["abort_at"] == t and rid in sched.requests:
                sched.finish_request(rid, RequestStatus.FINISHED_ABORTED)
        if t > max(s["arrive_at"] for s in w["specs"]) and not sched.has_unfinished() \
                and not in_flight:
            break
        while len(in_flight) < depth:
            flying: dict[str, int] = {}  # tokens in flight per request
            for c in (c for o in in_flight for c in o.chunks):
                flying[c.request_id] = flying.get(c.request_id, 0) + c.num_tokens
            out = sched.schedule()
            ids = scheduled_ids(out)
            assert len(ids) == len(set(ids)) and not set(out.preempted) & set(flying)
            if model is None:
                assert not set(ids) & set(flying)
            assert out.num_batched_tokens <= w["budget"]
            for c in out.chunks:
                r = requests[c.request_id]
                assert c.start_position == r.num_computed_tokens + flying.get(c.request_id, 0)
                assert c.token_ids == (r.prompt_token_ids + r.output_token_ids)[
                    c.start_position:c.start_position + c.num_tokens]
                assert c.samples == (c.start_position + c.num_tokens == r.num_tokens)
                if c.request_id in flying:
                    event("a chunk went out behind its request's chunk in flight")
            if out.is_empty:
                break
            in_flight.append(out)
        for o in in_flight:
            for c in o.chunks:
                if c.request_id in sched.requests:  # not aborted: its blocks are still its own
                    assert bm.block_table(c.request_id)[:len(c.block_table)] == c.block_table
        if in_flight:
            out = in_flight.pop(0)
            sched.update_from_output(out, {c.request_id: rng.choice([EOS, 3, 4, 5])
                                           for c in out.chunks if c.samples})
        held = [b for rid in sched.requests for b in bm.block_table(rid)]
        assert len(held) == len(set(held)) == bm.usage().used
    else:
        raise AssertionError(f"workload not finished after {max_steps} steps")
    assert not sched.has_unfinished() and sched.num_in_flight == 0
    assert bm.usage().used == 0
    for rid, r in requests.items():
        assert r.finished
        if r.status != RequestStatus.FINISHED_ABORTED:
            assert 1 <= r.num_output_tokens <= specs[rid]["max_tokens"]
