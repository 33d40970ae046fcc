"""KV-cache storage in the block-major layout of DESIGN §3.

    storage view: (num_blocks, layers_held, 2, block_size, kv_heads, head_dim)

A block holds every held layer's keys and values for ``block_size`` tokens, so the bytes of one
block of L layers are exactly the bytes of g blocks of L/g layers: a worker that drops layers
re-reads its storage with a new geometry instead of copying. The storage is one flat tensor;
on CPU ``torch.empty`` only reserves address space and the kernel commits pages when they are
first written, so unused blocks cost no memory.

The storage starts zeroed: attention masks the slots past a request's context with a zero
weight, and 0 * NaN from uninitialised memory would still be NaN. On CPU the storage is an
anonymous memory map: the kernel hands out zero pages and commits each one only when it is
first written, so a large budget costs address space, not memory, until blocks are used.
"""

from __future__ import annotations

import mmap

import torch

from kunserve.worker.memory_budget import KVGeometry


class KVCache:
    """``capacity_bytes`` (default: exactly ``num_blocks`` blocks) is the range reserved up
    front; ``reshape`` may later re-read the same bytes as more, thinner blocks."""

    def __init__(self, geometry: KVGeometry, num_blocks: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", capacity_bytes: int | None = None) -> None:
        self.geometry = geometry
        self.num_blocks = num_blocks
        capacity = capacity_bytes if capacity_bytes is not None else num_blocks * geometry.block_bytes
        if capacity < num_blocks * geometry.block_bytes:
            raise ValueError("the reserved range is smaller than the initial blocks")
        self.storage = _zeroed_storage(capacity // dtype.itemsize, dtype, torch.device(device))
        self._layers = self._layer_views()

    def reshape(self, geometry: KVGeometry, num_blocks: int) -> None:
        """Re-read the storage as ``num_blocks`` blocks of ``geometry`` without copying.

        With ``L`` layers per block before and ``L/g`` after, old block ``b`` becomes new
        blocks ``b·g .. b·g+g-1``, new block ``b·g+j`` holding old layers ``[j·L/g, (j+1)·L/g)``
        of the same tokens; blocks past ``old_blocks·g`` are new memory.
        """
        if num_blocks * geometry.block_bytes > self.storage.numel() * self.storage.element_size():
            raise ValueError(f"{num_blocks} blocks of {geometry.block_bytes} bytes do not fit "
                             f"the reserved {self.storage.nbytes} bytes")
        self.geometry, self.num_blocks = geometry, num_blocks
        self._layers = self._layer_views()

    def _block_elements(self) -> int:
        g = self.geometry
        return g.layers_held * 2 * g.block_size * g.num_kv_heads * g.head_dim

    def _layer_views(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        g = self.geometry
        blocks = self.storage[: self.num_blocks * self._block_elements()].view(
            self.num_blocks, g.layers_held, 2, g.block_size, g.num_kv_heads, g.head_dim)
        return [(blocks[:, i, 0], blocks[:, i, 1]) for i in range(g.layers_held)]

    def layer_caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per held layer, (k, v) views of shape (num_blocks, block_size, kv_heads, hd)."""
        return self._layers

    @property
    def nbytes(self) -> int:
        """Bytes of the blocks in use (the reserved range may be larger)."""
        return self.num_blocks * self.geometry.block_bytes


def _zeroed_storage(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if device.type != "cpu":
        return torch.zeros(numel, dtype=dtype, device=device)
    region = mmap.mmap(-1, max(1, numel * dtype.itemsize))  # zero pages, committed on write
    return torch.frombuffer(region, dtype=dtype, count=numel)
