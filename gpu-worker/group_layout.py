"""How a pipeline group of ``g`` instances names its KV blocks and which slices it swaps.

Pure arithmetic, no torch: the drop protocol (issue 4) moves the bytes.

Before the drop every member holds the whole model and ``N`` solo blocks of ``L`` layers (same
model, same budget). After ``KVCache.reshape`` to ``L/g`` layers per block, member ``r``'s local
block ``b·g + j`` holds the tokens of its solo block ``b`` for stage ``j``'s layers, in place.
The group names blocks so that one id means the same tokens on every member: member ``r``'s
solo block ``b`` becomes group block ``b·g + r``. Member ``r`` already holds its own layers of
that block (local ``b·g + r``); the other slices are swapped pairwise: ``r``'s local ``b·g + j``
(its tokens, stage ``j``'s layers) goes to member ``j``'s local ``b·g + r``, and ``j``'s local
``b·g + r`` (``j``'s tokens, stage ``r``'s layers) comes back into ``r``'s local ``b·g + j``.
Every slot is written once, so no block is copied inside a member. Blocks past ``N·g`` are the
freed parameter memory, the same ids on every member.

This layout needs ``L`` divisible by ``g`` (a block of ``L`` layers splits into ``g`` whole
blocks); other layer counts need a copying layout, which this module does not provide.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Exchange:
    """What member ``rank`` swaps with ``peer``: it sends ``send_blocks`` (local ids) and
    receives into ``recv_blocks`` (local ids); a block in both lists is sent before it is
    overwritten."""

    peer: int
    send_blocks: tuple[int, ...]
    recv_blocks: tuple[int, ...]


def check_divisible(num_layers: int, group_size: int) -> None:
    if group_size < 1 or num_layers % group_size:
        raise ValueError(f"{num_layers} layers do not split into {group_size} whole stages; "
                         "the zero-copy layout needs a divisor of the layer count")


def group_block(member: int, solo_block: int, group_size: int) -> int:
    """The group id of ``member``'s solo block."""
    return solo_block * group_size + member


def group_block_table(member: int, solo_table: list[int], group_size: int) -> list[int]:
    return [group_block(member, b, group_size) for b in solo_table]


def exchange_plan(rank: int, group_size: int, used: list[set[int]]) -> list[Exchange]:
    """Member ``rank``'s swaps with every peer; ``used[m]`` = solo blocks member ``m`` had in
    use at the drop. Blocks no one uses are not moved."""
    plans = []
    for peer in range(group_size):
        if peer == rank:
            continue
        send = tuple(b * group_size + peer for b in sorted(used[rank]))
        recv = tuple(b * group_size + peer for b in sorted(used[peer]))
        if send or recv:
            plans.append(Exchange(peer, send, recv))
    return plans


def group_num_blocks(solo_blocks: int, group_size: int, extra_blocks: list[int]) -> int:
    """Blocks of the group: every member's re-read solo blocks, plus the freed-parameter
    blocks that every member has (the smallest member's count)."""
    return solo_blocks * group_size + min(extra_blocks)


def free_group_blocks(solo_blocks: int, group_size: int, used: list[set[int]],
                      num_blocks: int) -> list[int]:
    """Group ids free after the drop: solo blocks nobody used and all the new blocks."""
    taken = {group_block(m, b, group_size) for m, blocks in enumerate(used) for b in blocks}
    return [i for i in range(num_blocks) if i not in taken]
