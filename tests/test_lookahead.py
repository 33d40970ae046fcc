"""Lookahead micro-batching: the recursive equal-cost split (every token once, halves within
one token's cost, the minimum token count), and the scheduler serving by it with micro-batches
in flight (a prefill chunked across two outputs in flight); random workloads with lookahead
run to completion in test_scheduler.py."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kunserve.worker.block_manager import BlockManager
from kunserve.worker.cost_model import CostModel
from kunserve.worker.lookahead import (
    Work,
    cost,
    cut_at,
    equal_cost_cut,
    num_tokens,
    split,
    tokens_within,
    truncate,
)
from kunserve.worker.request import RequestStatus
from kunserve.worker.scheduler import Scheduler, SchedulerConfig
from kunserve.worker.scheduler_output import SchedulerOutput
from tests.test_scheduler import add_all, make_request, make_requests

# roughly the shape of a measured model: the linear term dominates short chunks, attention
# long ones
MODEL = CostModel(prefix_attention=2e-8, self_attention=1e-8, linear=4e-6, constant=2e-3)


def work_items():
    return st.lists(st.builds(Work, st.sampled_from("abcdefghij"), st.integers(0, 3000),
                              st.integers(1, 600)),
                    min_size=1, max_size=12, unique_by=lambda w: w.request_id)


models = st.builds(CostModel, st.floats(0, 1e-7), st.floats(0, 1e-7), st.floats(0, 1e-5),
                   st.floats(0, 1e-2))


def covered(pieces: list[list[Work]]) -> dict[str, list[tuple[int, int]]]:
    """Per request, the token ranges the pieces give it, in order."""
    spans: dict[str, list[tuple[int, int]]] = {}
    for piece in pieces:
        for w in piece:
            spans.setdefault(w.request_id, []).append((w.prefix, w.prefix + w.num_tokens))
    return spans


def assert_exact_cover(work: list[Work], pieces: list[list[Work]]) -> None:
    """Every token of the work in exactly one piece, order kept, each request contiguous."""
    flat = [w for piece in pieces for w in piece]
    assert [w.request_id for w in flat if w.num_tokens > 0] == [
        w.request_id for w in flat]  # no empty chunk
    spans = covered(pieces)
    assert list(spans) == [w.request_id for w in work]
    for w in work:
        ranges = spans[w.request_id]
        assert ranges[0][0] == w.prefix and ranges[-1][1] == w.prefix + w.num_tokens
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    for piece in pieces:
        assert len({w.request_id for w in piece}) == len(piece)  # once per micro-batch


# -- the split -------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(work=work_items(), parts=st.integers(1, 8), model=models, min_tokens=st.integers(1, 300))
def test_every_queued_token_is_in_exactly_one_micro_batch(work, parts, model, min_tokens):
    pieces = split(work, parts, model, min_tokens)
    assert 1 <= len(pieces) <= parts
    assert_exact_cover(work, pieces)
    if len(pieces) > 1:
        assert all(num_tokens(p) >= min_tokens for p in pieces)


@settings(max_examples=200, deadline=None)
@given(work=work_items(), model=models)
def test_halves_cost_the_same_within_one_token(work, model):
    pieces = split(work, 2, model)
    if len(pieces) == 1:  # one token in all: nothing to cut
        assert num_tokens(work) == 1
        return
    left, right = pieces
    bound = model.token_cost_bound((w.prefix, w.num_tokens) for w in work)
    assert abs(cost(left, model) - cost(right, model)) <= bound * (1 + 1e-9) + 1e-15


@settings(max_examples=100, deadline=None)
@given(work=work_items(), model=models)
def test_three_parts_cut_two_thirds_of_the_work_off_first(work, model):
    """parts = 3: the first cut's left side holds two micro-batches, so it carries twice the
    right side's work (each micro-batch's constant being the same)."""
    left, right = cut_at(work, equal_cost_cut(work, 2, 1, model))
    work_cost = [cost(side, model) - model.constant if side else 0.0 for side in (left, right)]
    bound = model.token_cost_bound((w.prefix, w.num_tokens) for w in work)
    assert abs(work_cost[0] - 2 * work_cost[1]) <= 2 * bound * (1 + 1e-9) + 1e-15
    assert len(split(work, 3, model)) == min(3, num_tokens(work))


def test_a_long_prompt_is_chunked_where_the_cost_halves():
    long = Work("long", 0, 1000)
    left, right = split([long], 2, MODEL)
    assert [(w.prefix, w.num_tokens) for w in left] == [(0, left[0].num_tokens)]
    assert right[0].prefix == left[0].num_tokens
    # the second half reads the first half as its prefix: it gets fewer tokens
    assert left[0].num_tokens > 500 > right[0].num_tokens
    assert cost(left, MODEL) == pytest.approx(cost(right, MODEL), rel=0.01)


def test_decodes_with_long_contexts_weigh_more_than_their_tokens():
    decodes = [Work(f"d{i}", 2000, 1) for i in range(16)]
    prefill = Work("p", 0, 256)
    left, right = split([*decodes, prefill], 2, MODEL)
    assert num_tokens(left) < num_tokens(right)
    assert [w.request_id for w in left] == [f"d{i}" for i in range(16)] + ["p"]


def test_min_tokens_stops_the_recursion():
    work = [Work(str(i), 0, 10) for i in range(8)]  # 80 tokens
    assert [num_tokens(p) for p in split(work, 4, MODEL, min_tokens=20)] == [20, 20, 20, 20]
    assert [num_tokens(p) for p in split(work, 4, MODEL, min_tokens=30)] == [40, 40]
    assert [num_tokens(p) for p in split(work, 4, MODEL, min_tokens=41)] == [80]
    assert split([], 4, MODEL) == []


def test_cut_and_truncate_chunk_the_request_they_fall_in():
    work = [Work("a", 5, 10), Work("b", 0, 10)]
    assert cut_at(work, 13) == ([Work("a", 5, 10), Work("b", 0, 3)], [Work("b", 3, 7)])
    assert cut_at(work, 10) == ([Work("a", 5, 10)], [Work("b", 0, 10)])
    assert truncate(work, 4) == [Work("a", 5, 4)]
    assert truncate(work, 40) == work


# -- the scheduler -----------------------------------------------------------------------------
def lookahead_scheduler(depth: int = 2, budget: int = 64, min_tokens: int = 4, num_blocks=256,
                        block_size: int = 4, max_num_seqs: int = 128, max_model_len=2048,
                        model: CostModel = MODEL) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                                     max_model_len=max_model_len, num_micro_batches=depth,
                                     cost_model=model, lookahead_min_tokens=min_tokens),
                     BlockManager(num_blocks, block_size))


def chunk_work(out: SchedulerOutput) -> list[tuple[int, int]]:
    return [(c.start_position, c.num_tokens) for c in out.chunks]


def test_a_burst_goes_out_in_micro_batches_of_equal_cost():
    sched = lookahead_scheduler(depth=2, budget=64)
    add_all(sched, make_requests(3, prompt_len=40))  # 120 tokens: two outputs' worth
    first, second = sched.schedule(), sched.schedule()
    # the cut chunks r1; its rest goes out while its first part is still in flight
    assert [c.request_id for c in first.chunks] == ["r0", "r1"]
    assert [c.request_id for c in second.chunks] == ["r1", "r2"]
    r1_first, r1_rest = first.chunks[1], second.chunks[0]
    assert r1_rest.start_position == r1_first.num_tokens and not r1_first.samples
    assert r1_rest.samples and r1_rest.start_position + r1_rest.num_tokens == 40
    bound = MODEL.token_cost_bound([(0, 40)])
    assert abs(MODEL.predict(chunk_work(first)) - MODEL.predict(chunk_work(second))) <= bound
    assert sched.schedule().is_empty  # everything is in flight
    sched.update_from_output(first, {"r0": 11})
    sched.update_from_output(second, {"r1": 12, "r2": 13})
    assert [r.output_token_ids for r in sched.requests.values()] == [[11], [12], [13]]
    assert sched.num_in_flight == 0


def test_a_long_prompt_fills_both_stages():
    sched = lookahead_scheduler(depth=2, budget=256)
    (r,) = add_all(sched, make_requests(1, prompt_len=300))
    first, second = sched.schedule(), sched.schedule()
    assert chunk_work(first)[0][0] == 0 and chunk_work(second)[0][0] == first.chunks[0].num_tokens
    assert first.chunks[0].num_tokens + second.chunks[0].num_tokens == 300
    assert second.chunks[0].token_ids == r.prompt_token_ids[first.chunks[0].num_tokens:]
    sched.update_from_output(first, {})
    assert r.num_computed_tokens == first.chunks[0].num_tokens
    assert sched.is_in_flight("r0")  # its second chunk is still out
    sched.update_from_output(second, {"r0": 5})
    assert r.num_computed_tokens == 300 and r.output_token_ids == [5]


def test_out_of_order_updates_are_refused():
    sched = lookahead_scheduler(depth=2, budget=256)
    add_all(sched, make_requests(1, prompt_len=300))
    sched.schedule()
    second = sched.schedule()
    with pytest.raises(ValueError, match="schedule order"):
        sched.update_from_output(second, {"r0": 5})


def test_aborting_a_request_with_two_chunks_in_flight_ignores_both():
    sched = lookahead_scheduler(depth=2, budget=256)
    add_all(sched, make_requests(1, prompt_len=300))
    first, second = sched.schedule(), sched.schedule()
    sched.finish_request("r0", RequestStatus.FINISHED_ABORTED)
    with pytest.raises(ValueError, match="still in flight"):
        sched.add_request(make_request("r0"))
    assert sched.update_from_output(first, {}) == []
    with pytest.raises(ValueError, match="still in flight"):
        sched.add_request(make_request("r0"))
    assert sched.update_from_output(second, {"r0": 1}) == []
    sched.add_request(make_request("r0"))  # both chunks are back: the id is free
    assert sched.block_manager.usage().used == 0


def test_decodes_alone_are_served_as_without_lookahead():
    sched = lookahead_scheduler(depth=2, budget=64, min_tokens=5)
    add_all(sched, make_requests(4, prompt_len=2, max_tokens=5))
    outs = [sched.schedule(), sched.schedule()]  # 8 prompt tokens: too few to cut
    assert [len(o.chunks) for o in outs] == [4, 0]
    sched.update_from_output(outs[0], {f"r{i}": 7 for i in range(4)})
    # decodes only: even shares of the sequences, as the scheduler does without a model
    assert [len(sched.schedule().chunks) for _ in range(3)] == [2, 2, 0]


def test_tokens_within_is_the_longest_fresh_chunk_that_fits_the_time():
    model = CostModel(0.0, 0.0, 1.0, 5.0)  # 1 s a token, 5 s a micro-batch
    assert tokens_within(model, 12.0, limit=100) == 7
    assert tokens_within(model, 12.0, limit=3) == 3
    assert tokens_within(model, 5.5, limit=100) == 0  # not even one token
    quadratic = CostModel(0.0, 1.0, 0.0, 0.0)  # n^2
    assert tokens_within(quadratic, 99.0, limit=1000) == 9


def test_a_token_cap_bounds_every_lookahead_micro_batch_until_it_lifts():
    sched = lookahead_scheduler(depth=2, budget=256)
    add_all(sched, make_requests(1, prompt_len=300))
    sched.cap_tokens(40)
    capped = [sched.schedule(), sched.schedule()]  # the plan is cut at the cap
    assert [c.num_tokens for o in capped for c in o.chunks] and all(
        sum(c.num_tokens for c in o.chunks) <= 40 for o in capped)
    for out in capped:
        sched.update_from_output(out, {})
    sched.cap_tokens(None)
    assert sum(c.num_tokens for c in sched.schedule().chunks) > 40


def test_lookahead_waits_while_a_cap_waits_for_moved_requests_to_come_back():
    """A drop's leader, its moved requests' KV just in, a prefill queued: while the cap waits
    for them, they split evenly over the micro-batches in flight and the prefill waits (no
    lookahead plan would keep them together); once an output of each came back, lookahead
    plans again."""
    sched = lookahead_scheduler(depth=2, budget=256)
    moved = add_all(sched, make_requests(4, prompt_len=4))
    warm = [sched.schedule(), sched.schedule()]
    for out in warm:
        sched.update_from_output(out, {c.request_id: 7 for c in out.chunks})
    assert all(r.output_token_ids == [7] for r in moved)
    add_all(sched, [make_request("queued", prompt_len=300, base=9000)])
    sched.cap_tokens(40, [r.request_id for r in moved])
    first, second = sched.schedule(), sched.schedule()
    assert [c.request_id for c in first.chunks] == ["r0", "r1"]
    assert [c.request_id for c in second.chunks] == ["r2", "r3"]
    sched.update_from_output(first, {"r0": 8, "r1": 8})
    sched.update_from_output(second, {"r2": 8, "r3": 8})
    assert sched.token_budget == 256
    third = sched.schedule()  # the plan again: decodes and a chunk of the queued prompt
    assert "queued" in [c.request_id for c in third.chunks]
