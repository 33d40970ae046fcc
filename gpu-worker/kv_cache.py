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
first written, so a large budget costs address space, not memory, until blocks are used. On
CUDA the range is reserved virtual memory with physical memory mapped behind the blocks in use
(``cuda_vmm.py``, unverified: no GPU here); without cuda-python, a plain allocation of the whole
range.

On CPU, a block's pages are committed before the first step writes into it
(``commit_through``). Attention reads whole blocks, so a page of a block's unwritten slots that
is read first maps the kernel's shared zero page, and its first write then copies it and
flushes the TLB of every CPU the process's threads ran on: about 16 us a page measured here,
against 2.5 us for a page written first and 0.7 us for one committed ahead (a throwaway
script; README). In a block that decode fills, three of every four pages of a layer's keys or
values took that path; so did a drop's KV exchange, which writes into pages only read before.
"""

from __future__ import annotations

import mmap

import torch

from kunserve.worker import cuda_vmm
from kunserve.worker.memory_budget import KVGeometry


class KVCache:
    """``capacity_bytes`` (default: exactly ``num_blocks`` blocks) is the range reserved up
    front; ``reshape`` may later re-read the same bytes as more, thinner blocks."""

    def __init__(self, geometry: KVGeometry, num_blocks: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", capacity_bytes: int | None = None,
                 layer_start: int = 0) -> None:
        self.geometry = geometry
        self.num_blocks = num_blocks
        self.layer_start = layer_start  # the model layer of held layer 0
        capacity = capacity_bytes if capacity_bytes is not None else num_blocks * geometry.block_bytes
        if capacity < num_blocks * geometry.block_bytes:
            raise ValueError("the reserved range is smaller than the initial blocks")
        self._device_range = None
        self._mmap: mmap.mmap | None = None  # the CPU storage's anonymous mapping
        self._committed = 0  # ``commit_through``: bytes [0, this) are committed
        device = torch.device(device)
        if device.type == "cuda" and cuda_vmm.available():
            self._device_range = cuda_vmm.GrowableDeviceRange(capacity, device)
            self._device_range.grow(num_blocks * geometry.block_bytes)
            self.storage = self._device_range.bytes[: capacity - capacity % dtype.itemsize
                                                    ].view(dtype)
        elif device.type == "cpu":  # zero pages, committed on first write
            self._mmap = mmap.mmap(-1, max(1, capacity - capacity % dtype.itemsize),
                                   flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            self.storage = torch.frombuffer(self._mmap, dtype=dtype,
                                            count=capacity // dtype.itemsize)
        else:
            self.storage = torch.zeros(capacity // dtype.itemsize, dtype=dtype, device=device)
        self._layers = self._layer_views()

    def populate(self, start: int, end: int) -> bool:
        """Commit the pages of bytes ``[start, end)`` now, leaving their contents as they are
        (safe while blocks there are read and written), so that later first writes pay no
        page fault. CPU only, Linux 5.14+ (MADV_POPULATE_WRITE); False where unavailable."""
        region = self._mmap
        start, end = _pages(start, end)
        if region is None or end <= start:
            return False
        try:
            region.madvise(_MADV_POPULATE_WRITE, start, end - start)
        except (OSError, ValueError):
            return False
        return True

    def commit_through(self, block: int) -> None:
        """Commit the pages of blocks ``0 .. block`` of the current geometry unless they are
        (a step calls it with the highest block it writes into; the block manager hands every
        id out in ascending order before it reuses one, so few of those pages sit idle). CPU
        only: elsewhere nothing happens."""
        end = min(-(-(block + 1) * self.geometry.block_bytes // mmap.PAGESIZE) * mmap.PAGESIZE,
                  self.storage.nbytes)
        if end > self._committed:
            self.populate(self._committed, end)
            self._committed = end

    def release(self, start: int) -> None:
        """Give the pages past byte ``start`` back to the kernel (CPU; they read as zeros
        again): the blocks of a thinner geometry that a restore leaves unused."""
        region = self._mmap
        start, end = _pages(start, self.storage.nbytes)
        self._committed = min(self._committed, start)
        if region is not None and end > start:
            region.madvise(mmap.MADV_DONTNEED, start, end - start)

    def reshape(self, geometry: KVGeometry, num_blocks: int, layer_start: int = 0) -> None:
        """Re-read the storage as ``num_blocks`` blocks of ``geometry`` without copying.

        With ``L`` layers per block before and ``L/g`` after, old block ``b`` becomes new
        blocks ``b·g .. b·g+g-1``, new block ``b·g+j`` holding old layers ``[j·L/g, (j+1)·L/g)``
        of the same tokens; blocks past ``old_blocks·g`` are new memory.
        """
        if num_blocks * geometry.block_bytes > self.storage.numel() * self.storage.element_size():
            raise ValueError(f"{num_blocks} blocks of {geometry.block_bytes} bytes do not fit "
                             f"the reserved {self.storage.nbytes} bytes")
        if self._device_range is not None:  # map (or release) memory behind the new blocks
            needed = num_blocks * geometry.block_bytes
            self._device_range.grow(needed)
            self._device_range.shrink(needed)
        self.geometry, self.num_blocks, self.layer_start = geometry, num_blocks, layer_start
        self._layers = self._layer_views()

    def _block_elements(self) -> int:
        g = self.geometry
        return g.layers_held * 2 * g.block_size * g.num_kv_heads * g.head_dim

    def blocks(self) -> torch.Tensor:
        """The blocks in use, (num_blocks, layers_held, 2, block_size, kv_heads, head_dim)."""
        return self._blocks()

    def _blocks(self) -> torch.Tensor:
        g = self.geometry
        return self.storage[: self.num_blocks * self._block_elements()].view(
            self.num_blocks, g.layers_held, 2, g.block_size, g.num_kv_heads, g.head_dim)

    def _layer_views(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        blocks = self._blocks()
        return [(blocks[:, i, 0], blocks[:, i, 1]) for i in range(self.geometry.layers_held)]

    def layer_blocks(self, layer: int) -> torch.Tensor:
        """Model layer ``layer``'s keys and values in every block, as a view of shape
        (num_blocks, 2, block_size, kv_heads, head_dim)."""
        index = layer - self.layer_start
        if not 0 <= index < self.geometry.layers_held:
            raise ValueError(f"layer {layer} is not held here")
        return self._blocks()[:, index]

    def layer_caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per held layer, (k, v) views of shape (num_blocks, block_size, kv_heads, hd)."""
        return self._layers

    def spare_regions(self, used: set[int], keep_bytes: int) -> list[torch.Tensor]:
        """Flat uint8 tensors over the runs of free blocks (not in ``used``) that lie wholly
        past the first ``keep_bytes`` of the range: scratch memory for a move that ends with
        the range re-read as blocks within those first bytes (a restore), once ``populate``
        committed their pages. CPU only (on CUDA there are no page faults to save)."""
        if self._mmap is None:
            return []
        block = self.geometry.block_bytes
        # a second tensor over the mapping: copies between a cache view and these regions
        # would otherwise be refused as overlapping (one storage), though no element does
        flat = torch.frombuffer(self._mmap, dtype=torch.uint8)
        regions, run = [], None  # run: [first, end) of the current run of free blocks
        for b in range(-(-keep_bytes // block), self.num_blocks + 1):
            if b < self.num_blocks and b not in used:
                run = [run[0] if run else b, b + 1]
            elif run:
                regions.append(flat[run[0] * block:run[1] * block])
                run = None
        return regions

    @property
    def capacity_bytes(self) -> int:
        """The reserved range: what ``reshape`` may grow into."""
        return self.storage.nbytes

    @property
    def nbytes(self) -> int:
        """Bytes of the blocks in use (the reserved range may be larger)."""
        return self.num_blocks * self.geometry.block_bytes


_MADV_POPULATE_WRITE = 23  # linux/mman.h; Python's mmap module does not name it


def _pages(start: int, end: int) -> tuple[int, int]:
    """``[start, end)`` shrunk to whole pages."""
    page = mmap.PAGESIZE
    return -(-start // page) * page, end // page * page
