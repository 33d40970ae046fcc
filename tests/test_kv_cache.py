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


def _faults_while(write) -> int:
    """Minor page faults this thread takes while ``write`` runs."""
    import resource

    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    write()
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before


def test_committed_blocks_take_no_page_fault_on_their_first_write():
    """Attention reads whole blocks before their slots are written. A committed block's
    first write after that read costs no fault; an uncommitted one faults on its pages (the
    copy of the kernel's zero page, the slow path ``commit_through`` is for)."""
    geometry = KVGeometry(layers_held=4, block_size=16, num_kv_heads=2, head_dim=64,
                          dtype_bytes=4)  # 64 KiB blocks: 16 pages each
    cache = KVCache(geometry, 8, torch.float32)
    blocks = cache.blocks()
    assert float(blocks.sum()) == 0  # read: every page maps the zero page
    if not cache.populate(0, geometry.block_bytes):
        pytest.skip("this kernel has no MADV_POPULATE_WRITE (Linux 5.14+)")
    cache.release(0)  # back to untouched (the probe above committed block 0)
    assert float(blocks.sum()) == 0
    cache.commit_through(3)
    pages = 4 * geometry.block_bytes // 4096
    stray = 2  # the interpreter's own (a tensor object for the slice)
    assert _faults_while(lambda: blocks[:4].fill_(1.0)) <= stray
    assert _faults_while(lambda: blocks[4:].fill_(2.0)) >= pages // 4  # (large folios: fewer)
    # a release forgets what it gave back: committing again covers it
    cache.release(2 * geometry.block_bytes)
    assert float(blocks[2:].sum()) == 0
    cache.commit_through(5)
    assert _faults_while(lambda: blocks[2:6].fill_(3.0)) <= stray
    assert float(blocks[:2].sum()) == 2 * geometry.block_bytes // 4  # kept: ones


def test_a_kv_move_keeps_its_staging_until_release():
    """A drop stages its exchange in the parameters it frees; giving them back to the kernel
    takes milliseconds, so ``finish`` keeps them and the drop releases them once the
    exchange is reported."""
    from torch.multiprocessing.reductions import StorageWeakRef

    from kunserve.worker.group_layout import KVPiece
    from kunserve.worker.pipeline.kv_transfer import start_move

    cache = KVCache(GEOMETRY, 4, torch.float32)
    fill(cache)
    expected = [cache.layer_blocks(layer)[:2].clone() for layer in range(4)]
    piece = KVPiece(src=0, dst=0, layer_start=0, layer_end=4, src_blocks=(0, 1),
                    dst_blocks=(2, 3))
    staging = torch.empty(1 << 16)
    weak = StorageWeakRef(staging.untyped_storage())
    move = start_move(cache, None, 0, [piece], GEOMETRY, 4, 0, [staging])
    del staging
    stats = move.finish()
    assert stats.bytes_copied == 4 * 2 * GEOMETRY.block_bytes // 4
    assert all(torch.equal(cache.layer_blocks(layer)[2:], expected[layer]) for layer in range(4))
    assert not weak.expired()
    move.release()
    assert weak.expired()


def test_every_step_commits_the_blocks_it_writes_first(llama_dir, monkeypatch):
    """The engine's stage commits up to the block holding the newest token before each step
    (here the highest block of the request's table: a fresh engine hands out ascending ids)."""
    from kunserve.worker.engine import EngineConfig, LLMEngine
    from kunserve.worker.sampling_params import SamplingParams

    committed = []
    commit = KVCache.commit_through
    monkeypatch.setattr(KVCache, "commit_through",
                        lambda self, block: committed.append(block) or commit(self, block))
    engine = LLMEngine(EngineConfig(model=llama_dir, num_threads=1))
    engine.add_request(list(range(5, 45)), SamplingParams(max_tokens=20, temperature=0.0,
                                                          ignore_eos=True), "a")
    steps = 0
    while engine.has_unfinished():
        engine.step()
        table = engine.block_manager.block_table("a")
        if table:  # still running: its blocks are this step's
            steps += 1
            assert committed[-1] == max(table)
    assert steps == 19 and len(committed) == 20 and max(committed) >= 3  # 60 tokens: 4 blocks
