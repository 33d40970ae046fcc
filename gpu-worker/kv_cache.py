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
        device = torch.device(device)
        if device.type == "cuda" and cuda_vmm.available():
            self._device_range = cuda_vmm.GrowableDeviceRange(capacity, device)
            self._device_range.grow(num_blocks * geometry.block_bytes)
            self.storage = self._device_range.bytes[: capacity - capacity % dtype.itemsize
                                                    ].view(dtype)
        else:
            self.storage = _zeroed_storage(capacity // dtype.itemsize, dtype, device)
        self._layers = self._layer_views()

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

    @property
    def capacity_bytes(self) -> int:
        """The reserved range: what ``reshape`` may grow into."""
        return self.storage.nbytes

    @property
    def nbytes(self) -> int:
        """Bytes of the blocks in use (the reserved range may be larger)."""
        return self.num_blocks * self.geometry.block_bytes


def _zeroed_storage(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if device.type != "cpu":
        return torch.zeros(numel, dtype=dtype, device=device)
    region = mmap.mmap(-1, max(1, numel * dtype.itemsize))  # zero pages, committed on write
    return torch.frombuffer(region, dtype=dtype, count=numel)
