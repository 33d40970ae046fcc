"""Moves KV slices between the members of a group while their caches change geometry.

``group_layout.py`` says which slices go where (``KVPiece``); this module moves the bytes, the
same way on every member, one message per layer of a piece (so a chunk is one layer's slice of
the blocks, never the whole cache at once), in the order ``exchange_order`` gives: round
``k`` = 1 .. g-1 sends to rank + k and receives from rank - k, so in every round each member
sends to one peer and receives from one, and each sender's first message is its receiver's:

1. post the receives, into ``staging`` where the packed slices left room (they take it first:
   each lives until sent, while receive buffers are reused), else into at most
   ``RECEIVE_DEPTH`` fresh buffers, reused as they drain. Gloo moves a message only once its
   receive is posted, so posting them first lets every peer stream while this member packs;
2. pack: copy out of the old geometry every slice this member sends or copies locally, one
   tensor (n_blocks, 2, block_size, kv_heads, head_dim) per layer, and send each packed layer
   at once (asynchronous), so the send of layer i overlaps the packing of layer i+1;
3. re-read the storage with the new geometry (``KVCache.reshape``: no copy), write the local
   slices;
4. wait for the receives in order and scatter each into the new geometry while the later ones
   are still arriving.

Packing everything before any write makes the order of writes irrelevant; no member ever
waits on a peer before its own sends are posted, so no pair waits on each other.

Steps 1-3 are ``start_move``, step 4 is ``KVMove.finish`` (which also posts the receives
that waited for a drained fresh buffer). The staging outlives ``finish`` until
``KVMove.release``: a drop's staging is the parameters it frees, and giving tens of MB back
to the kernel (``munmap``) takes milliseconds of CPU that the peers still moving bytes need,
so the drop releases it after the exchange and the group's first round, on a low-priority
thread (``reconfigure.ParamsRelease``) that takes what the serving threads leave of the cores.
``move_kv`` runs both (and the release) while the group is not serving. A drop runs them
apart (``reconfigure.drop``): 1-3 on the engine thread with nothing else running, then 4 on a
helper thread while the group already serves; it moves the KV over the epoch's second link, so
an activation never queues behind a KV chunk. Since
every member posted all its sends in 1-3, a ``finish`` only ever waits for bytes a live peer
has already queued: it cannot wait on another member's helper thread.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import mmap
import os
import threading
import time
from collections import deque
from dataclasses import dataclass

import torch

from kunserve.worker.group_layout import KVPiece
from kunserve.worker.kv_cache import KVCache
from kunserve.worker.memory_budget import KVGeometry
from kunserve.worker.pipeline.io_threads import linux_libc
from kunserve.worker.pipeline.stage_link import StageLink, StageLinkError

RECEIVE_DEPTH = 4  # fresh receive buffers in flight when ``staging`` has no room


@dataclass
class MoveStats:
    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_copied: int = 0  # local pieces (the uneven layout, restore)
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # this process's CPU time meanwhile, every thread (gloo's too)
    # ``time.perf_counter`` stamps (one clock for every process of a host): a member that
    # starts first waits for the others inside its ``seconds``
    started_at: float = 0.0
    ended_at: float = 0.0


def exchange_order(pieces: list[KVPiece], rank: int,
                   size: int) -> tuple[list[KVPiece], list[KVPiece]]:
    """(what ``rank`` packs: its outgoing pieces, by peer rank + 1, rank + 2, ..., then its
    local ones; what it receives: by peer rank - 1, rank - 2, ...). Stable: the pieces between
    one pair keep their order, so sends and receives match on every member."""
    outgoing = sorted((p for p in pieces if p.src == rank),
                      key=lambda p: (p.dst - rank - 1) % size)  # the local pieces last
    incoming = sorted((p for p in pieces if p.dst == rank and p.src != rank),
                      key=lambda p: (rank - p.src) % size)
    return outgoing, incoming


def move_kv(cache: KVCache, link: StageLink | None, rank: int, pieces: list[KVPiece],
            geometry: KVGeometry, num_blocks: int, layer_start: int,
            staging: list[torch.Tensor] | None = None) -> MoveStats:
    """Apply ``pieces`` on member ``rank`` and leave ``cache`` re-read as ``num_blocks``
    blocks of ``geometry`` starting at model layer ``layer_start``. ``staging``: memory the
    packed and received slices may use, already-touched pages where fresh buffers would pay a
    page fault per page (a drop passes the parameters it is freeing, a restore the free
    blocks past what the solo geometry uses); none of it may overlap a block being moved."""
    move = start_move(cache, link, rank, pieces, geometry, num_blocks, layer_start, staging)
    stats = move.finish()
    move.release()
    return stats


@torch.inference_mode()
def start_move(cache: KVCache, link: StageLink | None, rank: int, pieces: list[KVPiece],
               geometry: KVGeometry, num_blocks: int, layer_start: int,
               staging: list[torch.Tensor] | None = None) -> KVMove:
    """Steps 1-3 of ``move_kv`` (same arguments): when this returns, every receive and send of
    this member is posted, ``cache`` has its new geometry and the local slices are in place;
    ``finish`` (on any one thread) waits for the slices from the peers."""
    start, cpu_start = time.perf_counter(), time.process_time()
    stats = MoveStats()
    buffers = _Staging(staging or [])
    outgoing, incoming = exchange_order(pieces, rank, link.size if link is not None else 1)
    dtype = cache.storage.dtype
    # staging goes to the packed slices first (each lives until sent), then to receive buffers
    # (those are reused as they drain): (n_blocks, 2, block_size, kv_heads, head_dim) each
    before, slot = (_slot(g) for g in (cache.geometry, geometry))
    packed = [[buffers.take((len(piece.src_blocks), *before), dtype)
               for _ in range(piece.num_layers)] for piece in outgoing]
    receives = _Receives(link, buffers, [(piece, layer, (len(piece.dst_blocks), *slot))
                                         for piece in incoming
                                         for layer in range(piece.layer_start, piece.layer_end)],
                         cache.storage)
    local = []
    for piece, outs in zip(outgoing, packed, strict=True):  # pack; what leaves goes at once,
        rows = _Rows(piece.src_blocks)                        # layer by layer (sends are async)
        layers = []
        for layer, out in zip(range(piece.layer_start, piece.layer_end), outs, strict=True):
            tensor = rows.gather(cache.layer_blocks(layer), out)
            if piece.dst == rank:
                layers.append(tensor)
                continue
            assert link is not None
            link.send_tensor(tensor, piece.dst)
            stats.bytes_sent += tensor.nbytes
        if piece.dst == rank:
            local.append((piece, layers))
    cache.reshape(geometry, num_blocks, layer_start)
    for piece, layers in local:
        rows = _Rows(piece.dst_blocks)
        for layer, tensor in zip(range(piece.layer_start, piece.layer_end), layers,
                                 strict=True):
            rows.scatter(cache.layer_blocks(layer), tensor)
            stats.bytes_copied += tensor.nbytes
    stats.started_at = start
    return KVMove(cache, link, receives, stats, cpu_start)


class KVMove:
    """A move whose sends are posted and whose slices from the peers are on their way."""

    def __init__(self, cache: KVCache, link: StageLink | None, receives: _Receives,
                 stats: MoveStats, cpu_start: float) -> None:
        self._cache, self._link, self._receives = cache, link, receives
        self.stats, self._cpu_start = stats, cpu_start
        self._stopped = threading.Event()

    def stop(self) -> None:
        """From another thread: write nothing more into the cache (``finish`` raises at its
        next slice)."""
        self._stopped.set()

    @torch.inference_mode()
    def finish(self) -> MoveStats:
        """Wait for each slice from the peers and write it into its blocks, then for this
        member's sends; raises ``StageLinkError`` when a peer died or hung. ``cpu_seconds``
        counts the whole process's CPU time (every thread: gloo's, a serving one's)."""
        stats, cache = self.stats, self._cache
        rows_of: dict[int, _Rows] = {}
        for piece, layer, buffer in self._receives:
            if self._stopped.is_set():  # forgets the posted receives, raises
                self._receives._fail("the move was stopped (the group fell back)")
            rows = rows_of.setdefault(id(piece), _Rows(piece.dst_blocks))
            rows.scatter(cache.layer_blocks(layer), buffer)
            stats.bytes_received += buffer.nbytes
        if self._link is not None:
            self._link.flush()
        stats.ended_at = time.perf_counter()
        stats.seconds = stats.ended_at - stats.started_at
        stats.cpu_seconds = time.process_time() - self._cpu_start
        return stats

    def release(self) -> float:
        """Let the staging go (after ``finish``, or after it failed); returns the seconds
        that took."""
        start = time.perf_counter()
        self._receives = None  # its buffers: the staging, a drop's freed parameters
        return time.perf_counter() - start


def lower_this_threads_priority() -> None:
    """Nice 19 for the calling thread alone (Linux: a thread id is a process id to
    ``setpriority``); elsewhere, or when refused, nothing changes."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass


def return_pages(tensors: list[torch.Tensor]) -> int:
    """Give the whole pages of each CPU tensor's storage back to the kernel
    (``madvise(MADV_DONTNEED)``) and return how many bytes that was. The storages read as
    zeros afterwards: nothing may use them again. Freeing the tensors does not do this: the C
    library kept the freed blocks in its heap for reuse (a member's resident memory did not
    fall after a drop). The call goes through ctypes, which lets go of the GIL meanwhile, so
    this process's serving threads run beside it. Elsewhere than Linux, and for tensors not on the CPU, nothing
    happens."""
    advise = _madvise()
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage() for t in tensors
                if t.device.type == "cpu"}
    returned = 0
    for address, storage in storages.items() if advise is not None else ():
        start = -(-address // mmap.PAGESIZE) * mmap.PAGESIZE
        end = (address + storage.nbytes()) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > start and advise(start, end - start, _MADV_DONTNEED) == 0:
            returned += end - start
    return returned


_MADV_DONTNEED = 4  # Linux


@functools.cache
def _madvise():
    """libc's ``madvise`` (None off Linux)."""
    libc = linux_libc()
    if libc is None:
        return None
    advise = libc.madvise
    advise.argtypes, advise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return advise


def _slot(geometry: KVGeometry) -> tuple[int, ...]:
    """One layer of one block: (2, block_size, kv_heads, head_dim)."""
    return (2, geometry.block_size, geometry.num_kv_heads, geometry.head_dim)


class _Receives:
    """The receives of one move, posted ahead (see the module doc) and handed out in order as
    they complete: iterating waits for each. A buffer comes from ``staging`` when it has room,
    else fresh, at most ``RECEIVE_DEPTH`` of those in flight, each reused once drained."""

    def __init__(self, link: StageLink | None, staging: _Staging,
                 wanted: list[tuple[KVPiece, int, tuple[int, ...]]], like: torch.Tensor) -> None:
        self._link, self._staging, self._like = link, staging, like
        self._wanted = deque(wanted)  # (piece, layer, shape), in receive order
        self._posted: deque = deque()  # (piece, layer, buffer, work, fresh)
        self._spare: list[torch.Tensor] = []  # drained fresh buffers
        self._fresh = 0  # fresh buffers in flight
        self._post()

    def _post(self) -> None:
        while self._wanted:
            piece, layer, shape = self._wanted[0]
            buffer, fresh = self._staging.take(shape, self._like.dtype), False
            if buffer is None:
                fresh = True
                buffer = next((b for b in self._spare if b.shape == shape), None)
                if buffer is not None:
                    self._spare.remove(buffer)
                elif self._fresh < RECEIVE_DEPTH:
                    self._spare.clear()  # another shape from here on
                    buffer = torch.empty(shape, dtype=self._like.dtype, device=self._like.device)
                else:
                    return  # the next drained buffer takes it
            assert self._link is not None
            failed = None
            try:
                work = self._link.post_recv(buffer, piece.src)
            except StageLinkError as exc:
                failed = str(exc)
            if failed is not None:
                self._fail(failed)
            self._wanted.popleft()
            self._fresh += int(fresh)
            self._posted.append((piece, layer, buffer, work, fresh))

    def __iter__(self):
        while self._posted:
            piece, layer, buffer, work, fresh = self._posted.popleft()
            assert self._link is not None
            failed = None
            try:
                self._link.wait(work, f"layer {layer}'s KV from rank {piece.src}")
            except StageLinkError as exc:
                failed = str(exc)
            if failed is not None:
                work = None
                self._fail(failed)
            yield piece, layer, buffer
            if fresh:
                self._fresh -= 1
                self._spare.append(buffer)
                self._post()

    def _fail(self, message: str) -> None:
        """Raise with no chained traceback and forget every posted receive: each holds the
        group, whose sockets must close when this member gives the epoch up (as
        ``stage_link._detached`` does for the link's own calls)."""
        self._posted.clear()
        self._wanted.clear()
        raise StageLinkError(message)


class _Staging:
    """Hands out tensors carved from a list of flat byte buffers, first fit, never reused."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self._free = [t.reshape(-1).view(torch.uint8) for t in tensors if t.is_contiguous()]

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        nbytes = dtype.itemsize
        for dim in shape:
            nbytes *= dim
        for i, buffer in enumerate(self._free):
            offset = (-buffer.data_ptr()) % dtype.itemsize  # aligned for dtype
            if buffer.numel() >= offset + nbytes:
                self._free[i] = buffer[offset + nbytes:]
                return buffer[offset:offset + nbytes].view(dtype).view(shape)
        return None


class _Rows:
    """Blocks of one piece as rows of a layer's (num_blocks, ...) view: a strided slice when
    they are evenly spaced (a drop's interleaved names, a run of blocks: a plain strided copy,
    ~3x faster than ``index_copy_`` here), else an index."""

    def __init__(self, blocks: tuple[int, ...]) -> None:
        self.count = len(blocks)
        step = blocks[1] - blocks[0] if len(blocks) > 1 else 1
        even = step > 0 and all(b - a == step for a, b in itertools.pairwise(blocks))
        self._slice = slice(blocks[0], blocks[-1] + 1, step) if blocks and even else None
        self._index = None if self._slice is not None else torch.tensor(blocks, dtype=torch.int64)

    def gather(self, layer: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        """These rows of ``layer`` packed into ``out`` (or a new tensor: never a view of
        ``layer``, which is rewritten before the packed rows are sent)."""
        if out is None:
            out = torch.empty((self.count, *layer.shape[1:]), dtype=layer.dtype,
                              device=layer.device)
        if self._slice is not None:
            return out.copy_(layer[self._slice])
        return torch.index_select(layer, 0, self._index, out=out)

    def scatter(self, layer: torch.Tensor, packed: torch.Tensor) -> None:
        if self._slice is not None:
            layer[self._slice].copy_(packed)
        else:
            layer.index_copy_(0, self._index, packed)


def pack_blocks(cache: KVCache, blocks: tuple[int, ...]) -> list[torch.Tensor]:
    """Every layer's KV of ``blocks``, copied out: one (len(blocks), 2, block_size,
    kv_heads, head_dim) tensor per layer the cache holds (a migration's chunks)."""
    rows = _Rows(blocks)
    first = cache.layer_start
    return [rows.gather(cache.layer_blocks(layer), None)
            for layer in range(first, first + cache.geometry.layers_held)]


def write_blocks(cache: KVCache, blocks: tuple[int, ...], layers: list[torch.Tensor]) -> None:
    """The inverse of ``pack_blocks``: ``layers[i]`` into ``blocks`` of the cache's i-th
    layer."""
    rows = _Rows(blocks)
    for i, packed in enumerate(layers):
        rows.scatter(cache.layer_blocks(cache.layer_start + i), packed)
