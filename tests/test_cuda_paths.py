"""The CUDA paths of the drop: the NCCL process group of a pipeline group and the KV range that
grows by mapping physical memory behind reserved virtual addresses (CUDA VMM). They are written
but unverified until run on a GPU: without one these tests skip and say so."""

from __future__ import annotations

import datetime

import pytest
import torch

from kunserve.worker import cuda_vmm
from kunserve.worker.kv_cache import KVCache
from kunserve.worker.memory_budget import KVGeometry

NO_GPU = "no CUDA device here: the NCCL group and the CUDA VMM growth are unverified"
needs_vmm = pytest.mark.skipif(not cuda_vmm.available(),
                               reason=f"{NO_GPU} (or cuda-python is not installed)")


@needs_vmm
def test_the_kv_range_grows_in_place_and_keeps_its_blocks():
    geometry = KVGeometry(layers_held=4, block_size=16, num_kv_heads=2, head_dim=64,
                          dtype_bytes=2)
    cache = KVCache(geometry, 8, torch.float16, device="cuda",
                    capacity_bytes=64 * geometry.block_bytes)
    k, _ = cache.layer_caches()[1]
    k[3].fill_(1.5)
    address = cache.storage.data_ptr()
    half = KVGeometry(2, 16, 2, 64, 2)  # a member keeping 2 of the 4 layers
    cache.reshape(half, 40, layer_start=2)
    assert cache.storage.data_ptr() == address  # nothing moved
    # old block 3, layer 1 is new block 6 (layers 0-1 of the old block), held layer 1
    assert torch.all(cache.layer_blocks(3)[6, 0] == 1.5)
    assert torch.all(cache.layer_blocks(2)[39] == 0)  # new memory is zeroed


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason=f"{NO_GPU} (needs 2 devices)")
def test_a_stage_link_on_cuda_uses_nccl():
    import torch.multiprocessing as mp

    from kunserve.worker.pipeline.stage_link import StageLink

    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True,
                                       wait_for_workers=False,
                                       timeout=datetime.timedelta(seconds=30))
    ctx = mp.get_context("spawn")
    peer = ctx.Process(target=_nccl_peer, args=(store.port,))
    peer.start()
    link = StageLink(store, 0, 2, epoch=1, device="cuda:0")
    link.send_tensor(torch.arange(8, device="cuda:0", dtype=torch.float32), 1)
    link.flush()
    peer.join(60)
    assert peer.exitcode == 0


def _nccl_peer(port: int) -> None:
    from kunserve.worker.pipeline.stage_link import StageLink

    store = torch.distributed.TCPStore("127.0.0.1", port, is_master=False)
    link = StageLink(store, 1, 2, epoch=1, device="cuda:1")
    got = link.recv_tensor((8,), torch.float32, 0)
    assert got.tolist() == list(range(8))
