"""Where every KV slice goes when instances merge into a pipeline group, and back. Pure.

Solo, each of the ``g`` members holds ``L`` layers per block; in the group, member ``r`` holds
the layers of stage ``r`` (``LayerRange.for_stage``) and one block id means the same tokens on
every member, because the leader's scheduler keeps one block table per request for the group.

Drop. When ``g`` divides ``L`` the layout is zero-copy: after ``KVCache.reshape`` member ``r``'s
local block ``b·g + j`` is its solo block ``b``'s slice of stage ``j``'s layers, in place.
Member ``m``'s solo block ``b`` is named group block ``b·g + m``: member ``m`` already holds its
own slice of it where the group expects it (nothing moves), and each other slice crosses to the
member that holds those layers. When ``g`` does not divide ``L`` a block's bytes do not split
into whole blocks of the new geometry, so the used blocks get compact new ids and every slice
is copied (the member's own slice locally).

Restore. Each request is assigned to one member (``assign_requests``), which gets new solo
blocks for it; every member sends its stage's slice of the request's group blocks there.

Both directions are a list of ``KVPiece``: every member derives the same list from the same
inputs, packs what it sends (and its local copies) out of the old geometry, re-reads its
storage with the new geometry, then writes what it receives. Packing everything first makes the
order of writes irrelevant: a slot that is both sent and overwritten is read before it is
written. ``kv_transfer.py`` moves the bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kunserve.worker.layer_range import LayerRange


@dataclass(frozen=True)
class KVPiece:
    """Layers ``[layer_start, layer_end)`` of ``src_blocks`` (the sender's numbering before
    the change) land in ``dst_blocks`` (the receiver's numbering after it), pairwise."""

    src: int
    dst: int
    layer_start: int
    layer_end: int
    src_blocks: tuple[int, ...]
    dst_blocks: tuple[int, ...]

    @property
    def num_layers(self) -> int:
        return self.layer_end - self.layer_start


@dataclass(frozen=True)
class DropLayout:
    zero_copy: bool
    num_blocks: int  # the group's blocks (the same count on every member)
    tables: dict[str, list[int]]  # request id -> group block table
    pieces: list[KVPiece]


def stages(num_layers: int, group_size: int) -> list[LayerRange]:
    return [LayerRange.for_stage(r, group_size, num_layers) for r in range(group_size)]


def drop_layout(num_layers: int, tables: Sequence[Mapping[str, list[int]]],
                capacities: Sequence[int]) -> DropLayout:
    """``tables[m]``: member ``m``'s solo block tables; ``capacities[m]``: how many blocks of
    its stage's geometry member ``m``'s KV bytes hold once it keeps only that stage."""
    g = len(tables)
    ranges = stages(num_layers, g)
    zero_copy = num_layers % g == 0
    num_blocks = min(capacities)
    rename: list[dict[int, int]] = []
    next_id = 0
    for member, member_tables in enumerate(tables):
        used = sorted({b for table in member_tables.values() for b in table})
        if zero_copy:
            rename.append({b: b * g + member for b in used})
        else:
            rename.append({b: next_id + i for i, b in enumerate(used)})
            next_id += len(used)
    highest = max((i for names in rename for i in names.values()), default=-1)
    if highest >= num_blocks:
        raise ValueError(f"the group holds {num_blocks} blocks but the members' KV needs "
                         f"block {highest}")
    group_tables = {rid: [rename[m][b] for b in table]
                    for m, member_tables in enumerate(tables)
                    for rid, table in member_tables.items()}
    pieces = []
    for member, names in enumerate(rename):
        if not names:
            continue
        src = tuple(names)
        dst = tuple(names[b] for b in src)
        for holder, layers in enumerate(ranges):
            if zero_copy and holder == member:
                continue  # already in place
            pieces.append(KVPiece(member, holder, layers.start, layers.end, src, dst))
    return DropLayout(zero_copy, num_blocks, group_tables, pieces)


def assign_requests(blocks_needed: Mapping[str, int], group_size: int,
                    solo_blocks: int) -> dict[str, int]:
    """Which member each request lives on after a restore: largest first, each to the member
    with the most free solo blocks left (ties: the lowest rank). Raises when the group's KV
    does not fit the solo instances (the restore must wait for the load to fall)."""
    free = [solo_blocks] * group_size
    assignment = {}
    for rid in sorted(blocks_needed, key=lambda r: (-blocks_needed[r], r)):
        member = max(range(group_size), key=lambda m: (free[m], -m))
        if blocks_needed[rid] > free[member]:
            total = sum(blocks_needed.values())
            raise ValueError(f"the group's requests hold {total} blocks, more than "
                             f"{group_size} solo instances of {solo_blocks} blocks can take "
                             "request by request; restore when the load is lower")
        free[member] -= blocks_needed[rid]
        assignment[rid] = member
    return assignment


def solo_tables(group_tables: Mapping[str, list[int]],
                assignment: Mapping[str, int]) -> dict[str, list[int]]:
    """New solo block tables after a restore: each member numbers its requests' blocks from
    0 in request-id order (the order ``assign_requests`` and every member agree on)."""
    next_free: dict[int, int] = {}
    tables = {}
    for rid in sorted(group_tables):
        member = assignment[rid]
        start = next_free.get(member, 0)
        tables[rid] = list(range(start, start + len(group_tables[rid])))
        next_free[member] = start + len(group_tables[rid])
    return tables


def restore_pieces(num_layers: int, group_size: int, group_tables: Mapping[str, list[int]],
                   assignment: Mapping[str, int],
                   new_tables: Mapping[str, list[int]]) -> list[KVPiece]:
    """Every member sends its stage's slice of each request's group blocks to the request's
    member, one piece per (holder, member) pair."""
    pieces = []
    for holder, layers in enumerate(stages(num_layers, group_size)):
        for member in range(group_size):
            rids = [r for r in sorted(group_tables) if assignment[r] == member
                    and group_tables[r]]
            if not rids:
                continue
            src = tuple(b for r in rids for b in group_tables[r])
            dst = tuple(b for r in rids for b in new_tables[r])
            pieces.append(KVPiece(holder, member, layers.start, layers.end, src, dst))
    return pieces
