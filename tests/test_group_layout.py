"""The drop and restore layouts, checked by simulating the bytes.

Each member's storage is a list of cells of one layer of one block (what a block of ``n``
layers is made of: ``n`` consecutive cells). A cell's content is the (request, token block,
layer) it holds. Every member packs what its pieces send, re-reads its storage with the new
geometry and writes what it receives, as ``kv_transfer.py`` does; afterwards every block of
every request must hold, on every member, that member's layers of the right tokens."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kunserve.worker.group_layout import (
    assign_requests,
    drop_layout,
    restore_pieces,
    solo_tables,
    stages,
)


def move(storages, pieces, old_layers, new_layers):
    """Apply ``pieces``: ``old_layers[m]`` / ``new_layers[m]`` = (first layer, layers per
    block) of member m's geometry before and after."""
    packed = []
    for piece in pieces:
        start, per_block = old_layers[piece.src]
        cells = [storages[piece.src].get(b * per_block + layer - start)
                 for b in piece.src_blocks for layer in range(piece.layer_start,
                                                              piece.layer_end)]
        packed.append(cells)
    for piece, cells in zip(pieces, packed, strict=True):
        start, per_block = new_layers[piece.dst]
        it = iter(cells)
        for b in piece.dst_blocks:
            for layer in range(piece.layer_start, piece.layer_end):
                storages[piece.dst][b * per_block + layer - start] = next(it)


def solo_storage(tables, num_layers):
    return {b * num_layers + layer: (rid, k, layer)
            for rid, table in tables.items() for k, b in enumerate(table)
            for layer in range(num_layers)}


def random_tables(data, member, num_blocks, max_requests=3):
    free = list(range(num_blocks))
    data.draw(st.randoms()).shuffle(free)
    tables = {}
    for i in range(data.draw(st.integers(0, max_requests))):
        n = data.draw(st.integers(1, 3))
        if n > len(free):
            break
        tables[f"m{member}-r{i}"], free = free[:n], free[n:]
    return tables


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 4), st.integers(2, 9), st.integers(2, 8), st.data())
def test_drop_then_restore_keeps_every_slice(g, num_layers, solo_blocks, data):
    if num_layers < g:
        num_layers = g
    tables = [random_tables(data, m, solo_blocks) for m in range(g)]
    ranges = stages(num_layers, g)
    # the same bytes re-read as thinner blocks, plus the freed parameters' (any amount that
    # holds every member's KV: here a solo cache's worth)
    capacity = [2 * solo_blocks * num_layers // r.size for r in ranges]
    layout = drop_layout(num_layers, tables, capacity)
    assert layout.zero_copy == (num_layers % g == 0)
    storages = [solo_storage(t, num_layers) for t in tables]
    move(storages, layout.pieces, [(0, num_layers)] * g, [(r.start, r.size) for r in ranges])
    for rid, table in layout.tables.items():
        for k, block in enumerate(table):
            for member, r in enumerate(ranges):
                for layer in range(r.start, r.end):
                    assert storages[member][block * r.size + layer - r.start] == (rid, k, layer)
    if layout.zero_copy:  # a member's own slice never moves
        assert all(p.src != p.dst for p in layout.pieces)

    needed = {rid: len(t) for rid, t in layout.tables.items()}
    assignment = assign_requests(needed, g, solo_blocks)
    new_tables = solo_tables(layout.tables, assignment)
    pieces = restore_pieces(num_layers, g, layout.tables, assignment, new_tables)
    move(storages, pieces, [(r.start, r.size) for r in ranges], [(0, num_layers)] * g)
    for rid, table in new_tables.items():
        member = assignment[rid]
        assert max(table, default=-1) < solo_blocks
        for k, block in enumerate(table):
            for layer in range(num_layers):
                assert storages[member][block * num_layers + layer] == (rid, k, layer)


def test_zero_copy_names_and_pieces():
    tables = [{"a": [0, 2]}, {"b": [1]}]
    layout = drop_layout(4, tables, [8, 8])
    assert layout.tables == {"a": [0, 4], "b": [3]}
    assert [(p.src, p.dst, p.layer_start, p.layer_end, p.src_blocks, p.dst_blocks)
            for p in layout.pieces] == [(0, 1, 2, 4, (0, 2), (0, 4)), (1, 0, 0, 2, (1,), (3,))]


def test_uneven_layout_copies_compactly():
    layout = drop_layout(5, [{"a": [3]}, {"b": [0, 1]}], [5, 7])
    assert not layout.zero_copy and layout.num_blocks == 5
    assert layout.tables == {"a": [0], "b": [1, 2]}
    assert {(p.src, p.dst) for p in layout.pieces} == {(0, 0), (0, 1), (1, 0), (1, 1)}


def test_drop_refuses_a_group_too_small_for_the_members_kv():
    with pytest.raises(ValueError, match="holds 3 blocks"):
        drop_layout(5, [{"a": [0, 1]}, {"b": [0, 1]}], [3, 9])


def test_restore_assignment_balances_and_refuses_what_does_not_fit():
    assert assign_requests({"a": 3, "b": 2, "c": 2}, 2, 4) == {"a": 0, "b": 1, "c": 1}
    assert assign_requests({"w": 0}, 2, 4) == {"w": 0}  # a waiting request holds no blocks
    with pytest.raises(ValueError, match="restore when the load is lower"):
        assign_requests({"a": 3, "b": 3, "c": 3}, 2, 4)
