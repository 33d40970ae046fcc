"""The block-major KV cache: layout, lazily committed zeroed storage, and the re-read that a
parameter drop relies on (one block of L layers = g blocks of L/g layers, no copy)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kunserve.worker.kv_cache import KVCache
from kunserve.worker.memory_budget import KVGeometry

GEOMETRY = KVGeometry(layers_held=4, block_size=4, num_kv_heads=2, head_dim=8, dtype_bytes=4)


def fill(cache: KVCache) -> None:
    """Give every (block, layer, k/v) slab a distinct value: block*100 + layer*10 + kv."""
    for layer, (k, v) in enumerate(cache.layer_caches()):
        for block in range(cache.num_blocks):
            k[block] = block * 100 + layer * 10
            v[block] = block * 100 + layer * 10 + 1


def test_storage_starts_zeroed_and_views_are_block_major():
    cache = KVCache(GEOMETRY, num_blocks=3, dtype=torch.float32)
    assert cache.nbytes == 3 * GEOMETRY.block_bytes == cache.storage.nbytes
    assert float(cache.storage.abs().sum()) == 0.0
    fill(cache)
    blocks = cache.storage.view(3, 4, 2, 4, 2, 8)  # (blocks, layers, k/v, tokens, kvh, hd)
    assert float(blocks[2, 1, 0].unique()) == 210 and float(blocks[2, 1, 1].unique()) == 211


@pytest.mark.parametrize("group", [2, 4])
def test_reshape_rereads_each_block_as_g_thinner_blocks_without_copying(group):
    old_blocks, extra = 3, 5
    thin = dataclasses.replace(GEOMETRY, layers_held=GEOMETRY.layers_held // group)
    capacity = old_blocks * GEOMETRY.block_bytes + extra * thin.block_bytes
    cache = KVCache(GEOMETRY, old_blocks, torch.float32, capacity_bytes=capacity)
    fill(cache)
    address = cache.storage.data_ptr()
    cache.reshape(thin, old_blocks * group + extra)
    assert cache.storage.data_ptr() == address
    per = GEOMETRY.layers_held // group
    for new_block in range(old_blocks * group):
        old_block, part = divmod(new_block, group)
        for local, (k, v) in enumerate(cache.layer_caches()):
            old_layer = part * per + local
            assert float(k[new_block].unique()) == old_block * 100 + old_layer * 10
            assert float(v[new_block].unique()) == old_block * 100 + old_layer * 10 + 1
    for k, v in cache.layer_caches():  # the freed-parameter blocks start empty
        assert float(k[old_blocks * group:].abs().sum() + v[old_blocks * group:].abs().sum()) == 0
    assert cache.nbytes == capacity


def test_reshape_beyond_the_reserved_range_is_refused():
    cache = KVCache(GEOMETRY, 2, torch.float32)
    with pytest.raises(ValueError, match="do not fit"):
        cache.reshape(GEOMETRY, 3)


def test_spare_regions_populate_and_release_leave_the_blocks_in_use_alone():
    """What a restore stages its KV exchange in: the runs of free blocks wholly past the bytes
    the solo blocks will take; committing them keeps every byte, releasing the tail zeroes
    only the tail."""
    geometry = KVGeometry(layers_held=4, block_size=16, num_kv_heads=2, head_dim=64,
                          dtype_bytes=4)  # 64 KiB blocks: whole pages
    block = geometry.block_bytes
    cache = KVCache(geometry, 8, torch.float32)
    fill(cache)
    keep = 3 * block
    base = cache.storage.data_ptr()

    def runs(regions):
        return [((r.data_ptr() - base) // block, r.numel() // block) for r in regions]

    assert runs(cache.spare_regions({4, 6}, keep)) == [(3, 1), (5, 1), (7, 1)]
    assert runs(cache.spare_regions(set(), keep - 1)) == [(3, 5)]  # block 2 is partly kept
    assert runs(cache.spare_regions(set(range(8)), 0)) == []
    before = cache.storage.clone()
    cache.populate(keep, cache.capacity_bytes)  # False on kernels before 5.14: nothing done
    assert torch.equal(cache.storage, before)
    cache.release(keep)
    head = keep // 4  # float32 elements
    assert torch.equal(cache.storage[:head], before[:head])
    assert float(cache.storage[head:].abs().sum()) == 0
