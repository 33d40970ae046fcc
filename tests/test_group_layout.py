"""The group's block naming and swap plan, checked by simulating the bytes: after every member
re-reads its blocks and performs its swaps, each group block id holds, on every member, that
member's layers of the same tokens."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kunserve.worker.group_layout import (
    check_divisible,
    exchange_plan,
    free_group_blocks,
    group_block,
    group_block_table,
    group_num_blocks,
)


def simulate(group_size: int, solo_blocks: int, used: list[set[int]]) -> list[dict[int, tuple]]:
    """Local blocks of every member after re-read and swaps; a block's content is
    (owner member, solo block, stage whose layers it holds)."""
    local = [{b * group_size + j: (m, b, j) for b in range(solo_blocks)
              for j in range(group_size)} for m in range(group_size)]
    plans = [exchange_plan(m, group_size, used) for m in range(group_size)]
    sent = {}  # (from, to, slot on sender) -> content, all sends happen before receives
    for m, plan in enumerate(plans):
        for ex in plan:
            for block in ex.send_blocks:
                sent[(m, ex.peer, block)] = local[m][block]
    for m, plan in enumerate(plans):
        for ex in plan:
            for block in ex.recv_blocks:
                solo, _ = divmod(block, group_size)
                local[m][block] = sent[(ex.peer, m, solo * group_size + m)]
    return local


@given(st.integers(2, 4), st.integers(1, 6), st.data())
def test_every_used_group_block_holds_each_members_layers_of_the_same_tokens(g, n, data):
    used = [data.draw(st.sets(st.integers(0, n - 1))) for _ in range(g)]
    local = simulate(g, n, used)
    for owner in range(g):
        for solo in used[owner]:
            gid = group_block(owner, solo, g)
            for member in range(g):
                assert local[member][gid] == (owner, solo, member)


def test_plans_are_symmetric_and_skip_unused_blocks():
    used = [{0, 2}, {1}, set()]
    plans = {m: {e.peer: e for e in exchange_plan(m, 3, used)} for m in range(3)}
    assert plans[0][1].send_blocks == (1, 7) and plans[0][1].recv_blocks == (4,)
    assert plans[1][0].send_blocks == (3,) and plans[1][0].recv_blocks == (0, 6)
    assert plans[0][2].recv_blocks == () and plans[0][2].send_blocks == (2, 8)
    assert (plans[2][1].send_blocks, plans[2][1].recv_blocks) == ((), (4,))


def test_tables_capacity_and_free_list():
    assert group_block_table(1, [0, 3], 2) == [1, 7]
    assert group_num_blocks(10, 2, [7, 5]) == 25
    free = free_group_blocks(2, 2, [{0}, {1}], num_blocks=6)
    assert free == [1, 2, 4, 5]  # 0 = member 0's block 0, 3 = member 1's block 1


def test_uneven_layer_counts_are_refused_with_the_reason():
    check_divisible(8, 4)
    with pytest.raises(ValueError, match="5 layers do not split into 2"):
        check_divisible(5, 2)
