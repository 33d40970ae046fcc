"""Paged KV-cache block allocation with exact accounting. Pure Python.

The block manager hands out block ids from a free list and keeps each request's block table.
It knows nothing about tensors: ``kv_cache.py`` owns the storage those ids index.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class BlockUsage:
    total: int
    used: int
    free: int

    @property
    def usage(self) -> float:
        return self.used / self.total if self.total else 0.0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._tables: dict[str, list[int]] = {}

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def usage(self) -> BlockUsage:
        free = len(self._free)
        return BlockUsage(total=self.num_blocks, used=self.num_blocks - free, free=free)

    def block_table(self, request_id: str) -> list[int]:
        return self._tables.get(request_id, [])

    def num_new_blocks(self, request_id: str, num_tokens: int) -> int:
        """Blocks a request must add to hold ``num_tokens`` tokens in total."""
        return max(0, self.blocks_needed(num_tokens) - len(self.block_table(request_id)))

    def allocate(self, request_id: str, num_tokens: int) -> bool:
        """Grow the request's table to hold ``num_tokens`` tokens; False (and no change) when
        the free list is too short."""
        needed = self.num_new_blocks(request_id, num_tokens)
        if needed > len(self._free):
            return False
        table = self._tables.setdefault(request_id, [])
        table.extend(self._free.popleft() for _ in range(needed))
        return True

    def free(self, request_id: str) -> None:
        """Return all of a request's blocks; a no-op for a request that holds none."""
        self._free.extend(self._tables.pop(request_id, ()))

    def adopt(self, tables: dict[str, list[int]]) -> None:
        """Take over block tables made elsewhere (requests handed over with their KV)."""
        taken = {b for table in tables.values() for b in table}
        if len(taken) != sum(len(t) for t in tables.values()) or any(
                not 0 <= b < self.num_blocks for b in taken):
            raise ValueError("adopted block tables overlap or name blocks outside the cache")
        held = {b for table in self._tables.values() for b in table}
        if taken & held or any(rid in self._tables for rid in tables):
            raise ValueError("adopted blocks or requests are already held here")
        self._free = deque(b for b in self._free if b not in taken)
        self._tables.update({rid: list(table) for rid, table in tables.items() if table})

    def grow(self, num_new_blocks: int) -> None:
        """Append blocks with new ids at the end (memory freed elsewhere became KV cache)."""
        self._free.extend(range(self.num_blocks, self.num_blocks + num_new_blocks))
        self.num_blocks += num_new_blocks
