"""Block manager: exact accounting, all-or-nothing allocation, no block id shared, grow."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kunserve.worker.block_manager import BlockManager, BlockUsage


def make_bm(num_blocks: int = 8, block_size: int = 4) -> BlockManager:
    return BlockManager(num_blocks, block_size)


def all_held(bm: BlockManager, request_ids) -> list[int]:
    return [b for rid in request_ids for b in bm.block_table(rid)]


def assert_consistent(bm: BlockManager, request_ids) -> None:
    """Every id in [0, num_blocks) is either free or held by exactly one request."""
    held = all_held(bm, request_ids)
    free = list(bm._free)
    assert len(held) == len(set(held)), "a block id is held twice"
    assert len(free) == len(set(free)), "a block id is free twice"
    assert not set(held) & set(free), "a held block is also free"
    assert sorted(held + free) == list(range(bm.num_blocks))
    usage = bm.usage()
    assert usage == BlockUsage(total=bm.num_blocks, used=len(held), free=len(free))
    assert bm.num_free == len(free)


# -- basics ----------------------------------------------------------------------------------
def test_needs_at_least_one_block():
    with pytest.raises(ValueError):
        BlockManager(0, 4)


@pytest.mark.parametrize("tokens, blocks", [(0, 0), (1, 1), (3, 1), (4, 1), (5, 2), (8, 2),
                                            (9, 3), (100, 25), (101, 26)])
def test_blocks_needed_rounds_up(tokens, blocks):
    assert make_bm(block_size=4).blocks_needed(tokens) == blocks


def test_blocks_needed_block_size_one():
    assert BlockManager(4, 1).blocks_needed(7) == 7


def test_fresh_manager_is_all_free():
    bm = make_bm(8)
    assert bm.usage() == BlockUsage(total=8, used=0, free=8)
    assert bm.usage().usage == 0.0
    assert bm.num_free == 8
    assert bm.block_table("nobody") == []


def test_allocate_exact_accounting():
    bm = make_bm(8, 4)
    assert bm.allocate("a", 5)  # 2 blocks
    assert len(bm.block_table("a")) == 2
    assert bm.usage() == BlockUsage(total=8, used=2, free=6)
    assert bm.allocate("b", 12)  # 3 blocks
    assert bm.usage() == BlockUsage(total=8, used=5, free=3)
    assert bm.usage().usage == pytest.approx(5 / 8)
    assert_consistent(bm, ["a", "b"])


def test_allocate_grows_incrementally_and_keeps_existing_blocks():
    bm = make_bm(8, 4)
    assert bm.allocate("a", 4)
    first = list(bm.block_table("a"))
    assert len(first) == 1
    assert bm.num_new_blocks("a", 4) == 0
    assert bm.num_new_blocks("a", 5) == 1
    assert bm.num_new_blocks("a", 13) == 3
    assert bm.allocate("a", 5)  # one more token crosses a block boundary
    table = bm.block_table("a")
    assert len(table) == 2 and table[:1] == first
    assert bm.allocate("a", 8)  # same block count: no change
    assert len(bm.block_table("a")) == 2
    assert bm.usage().used == 2


def test_allocate_fewer_tokens_never_shrinks():
    bm = make_bm(8, 4)
    assert bm.allocate("a", 12)
    assert bm.num_new_blocks("a", 1) == 0
    assert bm.allocate("a", 1)
    assert len(bm.block_table("a")) == 3
    assert bm.usage().used == 3


def test_allocate_is_all_or_nothing():
    bm = make_bm(4, 4)
    assert bm.allocate("a", 8)  # 2 of 4 blocks
    before_table = list(bm.block_table("a"))
    before_usage = bm.usage()
    assert not bm.allocate("b", 12)  # needs 3, only 2 free: nothing taken
    assert bm.block_table("b") == []
    assert bm.usage() == before_usage
    assert not bm.allocate("a", 17)  # needs 3 more, only 2 free
    assert bm.block_table("a") == before_table
    assert bm.usage() == before_usage
    assert bm.allocate("b", 8)  # exactly the rest fits
    assert bm.usage() == BlockUsage(total=4, used=4, free=0)
    assert bm.allocate("a", 8)  # needs nothing more: fine even when full
    assert not bm.allocate("c", 1)
    assert_consistent(bm, ["a", "b", "c"])


def test_free_returns_all_blocks_and_unknown_is_noop():
    bm = make_bm(8, 4)
    assert bm.allocate("a", 9)
    assert bm.allocate("b", 4)
    bm.free("a")
    assert bm.block_table("a") == []
    assert bm.usage() == BlockUsage(total=8, used=1, free=7)
    bm.free("a")  # twice: no-op
    bm.free("never-seen")
    assert bm.usage() == BlockUsage(total=8, used=1, free=7)
    assert_consistent(bm, ["a", "b"])
    bm.free("b")
    assert bm.usage() == BlockUsage(total=8, used=0, free=8)
    assert_consistent(bm, ["a", "b"])


def test_freed_blocks_can_be_reused_by_another_request():
    bm = make_bm(2, 4)
    assert bm.allocate("a", 8)
    assert not bm.allocate("b", 1)
    freed = set(bm.block_table("a"))
    bm.free("a")
    assert bm.allocate("b", 8)
    assert set(bm.block_table("b")) == freed


def test_grow_appends_new_ids():
    bm = make_bm(4, 4)
    assert bm.allocate("a", 16)  # everything
    assert not bm.allocate("b", 1)
    bm.grow(3)
    assert bm.num_blocks == 7
    assert bm.usage() == BlockUsage(total=7, used=4, free=3)
    assert bm.allocate("b", 12)
    assert sorted(bm.block_table("b")) == [4, 5, 6]
    assert_consistent(bm, ["a", "b"])


def test_grow_ids_do_not_collide_with_held_or_free_ids():
    bm = make_bm(4, 4)
    assert bm.allocate("a", 4)
    bm.grow(2)
    bm.grow(1)
    assert bm.num_blocks == 7
    assert_consistent(bm, ["a"])
    assert bm.allocate("b", 24)  # the other 6
    assert_consistent(bm, ["a", "b"])
    assert bm.num_free == 0


def test_grow_zero_is_noop():
    bm = make_bm(4, 4)
    bm.grow(0)
    assert bm.usage() == BlockUsage(total=4, used=0, free=4)


# -- property --------------------------------------------------------------------------------
REQUEST_IDS = ["r0", "r1", "r2", "r3", "r4"]

op_strategy = st.one_of(
    st.tuples(st.just("allocate"), st.sampled_from(REQUEST_IDS), st.integers(0, 40)),
    st.tuples(st.just("free"), st.sampled_from(REQUEST_IDS + ["ghost"]), st.just(0)),
    st.tuples(st.just("grow"), st.just(""), st.integers(0, 3)),
)


@settings(max_examples=300, deadline=None)
@given(num_blocks=st.integers(1, 12), block_size=st.integers(1, 5),
       ops=st.lists(op_strategy, max_size=60))
def test_random_allocate_free_never_shares_a_block(num_blocks, block_size, ops):
    bm = BlockManager(num_blocks, block_size)
    held: dict[str, int] = {}  # model: blocks each request holds
    for op, rid, n in ops:
        if op == "allocate":
            old = list(bm.block_table(rid))
            free_before = bm.num_free
            needed = max(0, bm.blocks_needed(n) - len(old))
            ok = bm.allocate(rid, n)
            assert ok == (needed <= free_before)
            table = bm.block_table(rid)
            if ok:
                assert table[:len(old)] == old
                assert len(table) == len(old) + needed
                assert len(table) >= bm.blocks_needed(n)
                assert bm.num_free == free_before - needed
                held[rid] = len(table)
            else:
                assert table == old
                assert bm.num_free == free_before
        elif op == "free":
            free_before = bm.num_free
            bm.free(rid)
            assert bm.block_table(rid) == []
            assert bm.num_free == free_before + held.pop(rid, 0)
        else:
            total_before = bm.num_blocks
            bm.grow(n)
            assert bm.num_blocks == total_before + n
        assert_consistent(bm, REQUEST_IDS + ["ghost"])
        assert bm.usage().used == sum(held.values())
    for rid in REQUEST_IDS:
        bm.free(rid)
    assert bm.usage().free == bm.num_blocks
