"""Host memory that preempted requests' KV blocks are swapped to and back from (the
``infercept`` policy's preemption; DESIGN §5).

One host block mirrors one device block of every held layer, so a swap is a gather of whole
blocks from the cache's block-major storage into the host pool, or the reverse. On CUDA the
pool is pinned and the copies cross PCIe; on CPU both sides are host memory and the copy is a
real memory copy of the same bytes. Bytes and seconds are counted, so the bandwidth a swap
gets is measured, not assumed. The scheduler decides what moves (``SchedulerOutput.swap_out``
and ``swap_in``); this only copies.
"""

from __future__ import annotations

import time

import torch

from kunserve.worker.kv_cache import KVCache


class SwapSpace:
    def __init__(self, cache: KVCache, num_blocks: int) -> None:
        self.cache = cache
        g = cache.geometry
        pin = cache.storage.device.type == "cuda"
        self.blocks = torch.zeros((num_blocks, g.layers_held, 2, g.block_size, g.num_kv_heads,
                                   g.head_dim), dtype=cache.storage.dtype, pin_memory=pin)
        self.bytes_copied = 0
        self.seconds = 0.0

    @property
    def num_blocks(self) -> int:
        return self.blocks.shape[0]

    def apply(self, swap_out: list[tuple[int, int]], swap_in: list[tuple[int, int]]) -> None:
        """Copy (device, host) pairs out, then (host, device) pairs in."""
        start = time.perf_counter()
        device = self.cache.blocks()
        if swap_out:
            src, dst = _indices(swap_out)
            self.blocks.index_copy_(0, dst, device.index_select(0, src.to(device.device)).cpu())
            self.bytes_copied += len(swap_out) * self.cache.geometry.block_bytes
        if swap_in:
            src, dst = _indices(swap_in)
            device.index_copy_(0, dst.to(device.device),
                               self.blocks.index_select(0, src).to(device.device))
            self.bytes_copied += len(swap_in) * self.cache.geometry.block_bytes
        self.seconds += time.perf_counter() - start

    @property
    def bandwidth(self) -> float:
        """Bytes per second over every swap so far (0 before the first)."""
        return self.bytes_copied / self.seconds if self.seconds else 0.0


def _indices(pairs: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    src, dst = zip(*pairs, strict=True)
    return torch.tensor(src, dtype=torch.int64), torch.tensor(dst, dtype=torch.int64)
