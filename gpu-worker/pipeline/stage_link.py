"""The point-to-point link between the ranks of one pipeline group, for one topology epoch.

Rendezvous goes through a ``torch.distributed.TCPStore`` whose ``host:port`` the plan carries
(rank 0, the group leader, is its master); the process group is built directly on
``PrefixStore(f"epoch-{epoch}", store)``, never through the global ``init_process_group``, so a
worker can make a new group every epoch of its life and one store can serve many epochs.
Gloo on CPU, NCCL on CUDA (the NCCL path is written, not yet run: no GPU here).

Sends are asynchronous (the link keeps each tensor alive until its send completes), receives
block. A message travels in one fixed-size *frame*: a header (its length, the length of a
tensor sent with it, whether that tensor is inside the frame), the msgpack bytes, and the
tensor's bytes when they fit; what does not fit follows as one more message. Frames to rank 0
carry replies (sampled token ids, acknowledgements) and are ``reply_frame_bytes`` (4 KiB);
frames to any other rank carry a micro-batch and its hidden states and are ``frame_bytes``
(default 16 KiB; the worker sizes them for its model with ``frame_bytes_for``). Both ends of a
pair use the same size. Receives are posted for a whole frame, but a message sends only the
bytes it uses (gloo completes a receive with a shorter message), so a large frame costs nothing
on the wire for a small micro-batch, while a tensor that does not fit costs a round trip more;
replies are small, so their frames are. A
tensor sent on its own is received into a tensor of a shape and dtype the receiver knows from
an earlier message. Gloo moves a message only once its receive is posted (the
receiver tells the sender it is ready; on 2 oversubscribed cores that round trip is ~1 ms of
process wake-ups), so the serving path posts the receive of its next frame ahead
(``post_ahead``): a frame of a fixed size can be received before anything about it is known.
Each gloo group has a socket thread; the link asks the kernel for a short time slice for it
(``io_threads.py``), so that on busy cores a frame does not wait out a computing thread's
slice. A peer that dies closes its sockets and the waiting side raises ``StageLinkError`` at
once; a peer that hangs makes it raise after ``timeout_s``. Only waiting for the *next*
micro-batch (an idle stage) uses ``idle_timeout_s`` (default: wait as long as the connection
lives).
The link knows nothing about models or scheduling.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import threading
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
import torch
import torch.distributed as dist

from kunserve.worker.pipeline.io_threads import IO_SLICE_US, shorten_io_slices

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

_TAG_FRAME, _TAG_BYTES, _TAG_TENSOR = 1, 2, 3
FRAME_BYTES = 16 * 1024
REPLY_FRAME_BYTES = 4 * 1024
MAX_PENDING_SENDS = 16
_HEADER_BYTES = 24  # int64: message bytes, tensor bytes, tensor inside the frame (0/1)
_FOREVER = datetime.timedelta(days=365)


class StageLinkError(RuntimeError):
    """A peer of the group died, hung past the timeout, or broke the protocol."""


def _detached(method: F) -> F:
    """Re-raise a failure as a new ``StageLinkError`` with no chained traceback: the frames of
    a traceback would keep the failed ``Work`` alive, and with it the group's sockets, so the
    peers would not notice when this rank gives the epoch up."""

    @functools.wraps(method)
    def wrapper(self: StageLink, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except StageLinkError as exc:
            message = str(exc)
        raise StageLinkError(message)

    return wrapper  # type: ignore[return-value]


@dataclass(frozen=True)
class GroupAddress:
    """Where one epoch's group meets: the plan carries it to every member."""

    host: str
    port: int
    epoch: int
    size: int


def connect_store(host: str, port: int, rank: int, timeout_s: float = 60.0) -> dist.TCPStore:
    """Rank 0 hosts the store (``port`` 0: any free port, see ``store.port``)."""
    return dist.TCPStore(host, port, is_master=rank == 0, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=timeout_s))


def meet(host: str, port: int, group_id: str, epoch: int, rank: int, size: int, *,
         timeout_s: float, **link_kwargs: Any) -> StageLink:
    """Join a group at a store someone else hosts (in the mesh: the planner), under the
    group's own key prefix, so that several groups can form at one store in one epoch.
    Blocks until every member arrived or ``timeout_s`` passed, which is also how long the
    link waits for a silent peer before calling it dead."""
    store = dist.TCPStore(host, port, is_master=False, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=timeout_s))
    return StageLink(dist.PrefixStore(group_id, store), rank, size, epoch, timeout_s=timeout_s,
                     **link_kwargs)


class StageLink:
    def __init__(self, store: dist.Store, rank: int, size: int, epoch: int, *,
                 timeout_s: float = 60.0, idle_timeout_s: float | None = None,
                 device: torch.device | str = "cpu", bind_host: str | None = None,
                 frame_bytes: int = FRAME_BYTES,
                 reply_frame_bytes: int = REPLY_FRAME_BYTES,
                 io_slice_us: int = IO_SLICE_US) -> None:
        if not 0 <= rank < size:
            raise ValueError(f"rank {rank} is not in a group of {size}")
        self.rank, self.size, self.epoch = rank, size, epoch
        self.device = torch.device(device)
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.idle_timeout = (_FOREVER if idle_timeout_s is None
                             else datetime.timedelta(seconds=idle_timeout_s))
        self._store = store  # kept alive with the group, which may still use it
        self._group = _make_group(dist.PrefixStore(f"epoch-{epoch}", store), rank, size,
                                  self.device, self.timeout, bind_host)
        if self.device.type == "cpu":  # the group's new socket thread runs when a frame comes
            shorten_io_slices(io_slice_us)
        # sends not known complete, oldest first (each keeps its tensor alive): a message's
        # (frames and what follows them), bounded by ``_reap``; bulk tensors', until ``flush``
        self._pending: deque[dist.Work] = deque()
        self._bulk: list[dist.Work] = []
        if min(frame_bytes, reply_frame_bytes) < 2 * _HEADER_BYTES:
            raise ValueError("a frame must hold its header and some bytes")
        self.frame_bytes, self.reply_frame_bytes = frame_bytes, reply_frame_bytes
        # frame receives posted ahead, per source rank, in the order they will complete
        self._ahead: defaultdict[int, deque[tuple[dist.Work, torch.Tensor]]] = \
            defaultdict(deque)

    @classmethod
    def connect(cls, address: GroupAddress, rank: int, **kwargs: Any) -> StageLink:
        """Open the store named by the plan (hosting it on rank 0) and form the group."""
        store = connect_store(address.host, address.port, rank,
                              kwargs.get("timeout_s", 60.0))
        return cls(store, rank, address.size, address.epoch, **kwargs)

    # -- who ---------------------------------------------------------------------------------
    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1

    @property
    def last_rank(self) -> int:
        return self.size - 1

    # -- plain data (and a tensor with it) --------------------------------------------------
    @_detached
    def send_message(self, message: msgspec.Struct, dst: int,
                     tensor: torch.Tensor | None = None) -> None:
        """Send ``message``, and ``tensor`` with it (``Received.tensor`` takes it back)."""
        self.send_frame(msgspec.msgpack.encode(message), dst, tensor)

    @_detached
    def recv_message(self, kind: type[T], src: int, idle: bool = False) -> T:
        """Receive one message decoded as ``kind`` (a struct or a union of tagged structs);
        ``idle``: the sender may legitimately have nothing to say for a long time."""
        return self.decode(self.recv_frame(src, idle).data, kind, src)

    def decode(self, data: bytes, kind: type[T], src: int) -> T:
        try:
            return msgspec.msgpack.decode(data, type=kind)
        except msgspec.DecodeError as exc:
            raise StageLinkError(f"epoch {self.epoch}: rank {src} sent a message that is not "
                                 f"{kind}: {exc}") from exc

    @_detached
    def send_frame(self, data: bytes, dst: int, tensor: torch.Tensor | None = None) -> None:
        size = self._frame_size(dst)
        room = size - _HEADER_BYTES
        nbytes = 0 if tensor is None else tensor.numel() * tensor.element_size()
        offset = _HEADER_BYTES + _aligned(len(data))
        inline = tensor is not None and tensor.device.type == "cpu" and offset + nbytes <= size
        frame = torch.empty(size, dtype=torch.uint8)
        frame[:_HEADER_BYTES].view(torch.int64).copy_(
            torch.tensor([len(data), nbytes, int(inline)], dtype=torch.int64))
        head = min(len(data), room)
        if head:
            frame[_HEADER_BYTES:_HEADER_BYTES + head] = torch.frombuffer(
                bytearray(data[:head]), dtype=torch.uint8)
        used = _HEADER_BYTES + head
        if inline:
            frame[offset:offset + nbytes] = tensor.contiguous().view(-1).view(torch.uint8)
            used = offset + nbytes
        # only the bytes used travel: gloo completes a receive posted for a whole frame with
        # a shorter message (the header says what is in it)
        self._send(frame[:used], dst, _TAG_FRAME)
        if len(data) > room:
            self._send(torch.frombuffer(bytearray(data[room:]), dtype=torch.uint8), dst,
                       _TAG_BYTES)
        if tensor is not None and not inline:
            self._send(tensor.contiguous(), dst, _TAG_TENSOR)
        self._reap()

    @_detached
    def recv_frame(self, src: int, idle: bool = False) -> Received:
        """The next message from ``src`` (its frame's receive posted ahead, or now)."""
        timeout = self.idle_timeout if idle else self.timeout
        size = self._frame_size(self.rank)
        if self._ahead[src]:
            work, frame = self._ahead[src].popleft()
            self._wait(work, f"a message from rank {src}", timeout)
        else:
            frame = self._recv(torch.empty(size, dtype=torch.uint8), src, _TAG_FRAME,
                               "a message", timeout)
        frame = frame.cpu()
        length, nbytes, inline = frame[:_HEADER_BYTES].view(torch.int64).tolist()
        room = size - _HEADER_BYTES
        data = frame[_HEADER_BYTES:_HEADER_BYTES + min(length, room)].numpy().tobytes()
        if length > room:
            data += self._recv(torch.empty(length - room, dtype=torch.uint8), src, _TAG_BYTES,
                               "a message body", self.timeout).numpy().tobytes()
        offset = _HEADER_BYTES + _aligned(length)
        return Received(self, src, data, nbytes,
                        frame[offset:offset + nbytes] if inline else None)

    @_detached
    def post_ahead(self, src: int) -> None:
        """Post the receive of a coming message from ``src`` now, so it moves as soon as it is
        sent; ``recv_*`` takes such receives first, in order. Post only for a message that
        will come: a receive still posted when the link closes is abandoned."""
        frame = torch.empty(self._frame_size(self.rank), dtype=torch.uint8, device=self.device)
        self._ahead[src].append((self._post(frame, src, _TAG_FRAME), frame))

    # -- arrivals, through the store (no message: nothing to wait for) ---------------------
    def announce(self, name: str) -> None:
        """Count this rank in at ``name`` (e.g. it entered a drop); best effort."""
        with contextlib.suppress(RuntimeError):  # the store is gone: nobody will ask
            self._store.add(f"epoch-{self.epoch}/{name}", 1)

    def arrivals(self, name: str) -> int | None:
        """How many ranks announced ``name`` so far (None: the store did not answer).
        Gloo cannot tell whether a message has arrived without waiting for it."""
        try:
            return self._store.add(f"epoch-{self.epoch}/{name}", 0)
        except RuntimeError:
            return None

    # -- tensors -----------------------------------------------------------------------------
    @_detached
    def send_tensor(self, tensor: torch.Tensor, dst: int) -> None:
        """A bulk send (KV slices, parameters): kept until ``flush``, never waited for
        before, since its receiver may post the receive only after sending its own."""
        self._send(tensor.contiguous(), dst, _TAG_TENSOR, self._bulk)

    @_detached
    def recv_tensor(self, shape: tuple[int, ...], dtype: torch.dtype, src: int) -> torch.Tensor:
        return self._recv(torch.empty(shape, dtype=dtype), src, _TAG_TENSOR,
                          f"a {tuple(shape)} tensor", self.timeout)

    @_detached
    def post_recv(self, buffer: torch.Tensor, src: int) -> dist.Work:
        """Post the receive of a tensor from ``src`` into ``buffer`` (on the link's device)
        and return at once; ``wait`` completes it. Several may be posted: they complete in
        the order posted."""
        return self._post(buffer, src, _TAG_TENSOR)

    @_detached
    def wait(self, work: dist.Work, what: str) -> None:
        """Wait for a receive ``post_recv`` posted (raises if the peer died or hung)."""
        self._wait(work, what, self.timeout)

    @property
    def num_pending_sends(self) -> int:
        """A message's sends not yet known complete (each keeps its frame alive)."""
        return len(self._pending)

    # -- lifetime ----------------------------------------------------------------------------
    @_detached
    def flush(self) -> None:
        """Wait until every send has left (raises if a peer is gone)."""
        pending = [*self._pending, *self._bulk]
        self._pending, self._bulk = deque(), []
        for work in pending:
            self._wait(work, "send", self.timeout)

    def close(self) -> None:
        """Flush (best effort) and tear the group down; the store is the caller's."""
        try:
            self.flush()
        except StageLinkError:
            pass
        self._pending.clear()
        self._bulk.clear()
        self._ahead.clear()
        self._group = None

    # -- internals ---------------------------------------------------------------------------
    def _frame_size(self, dst: int) -> int:
        """The size of a frame sent to ``dst``: replies go to the leader."""
        return self.reply_frame_bytes if dst == 0 else self.frame_bytes

    def _send(self, tensor: torch.Tensor, dst: int, tag: int,
              into: deque[dist.Work] | list[dist.Work] | None = None) -> None:
        tensor = tensor.to(self.device)
        (self._pending if into is None else into).append(
            self._call(lambda: self._group.send([tensor], dst, tag), f"send to rank {dst}"))

    def _recv(self, buffer: torch.Tensor, src: int, tag: int, what: str,
              timeout: datetime.timedelta) -> torch.Tensor:
        buffer = buffer.to(self.device)
        self._wait(self._post(buffer, src, tag), f"{what} from rank {src}", timeout)
        return buffer

    def _post(self, buffer: torch.Tensor, src: int, tag: int) -> dist.Work:
        return self._call(lambda: self._group.recv([buffer], src, tag),
                          f"receive from rank {src}")

    def _reap(self) -> None:
        """Forget a message's completed sends, oldest first, raising the error of a failed
        one. Gloo marks a send complete only once it is waited for, so past
        ``MAX_PENDING_SENDS`` the oldest are waited for: by then they have long left (the
        receiver posts ahead and takes messages in order without waiting on this rank), and
        the frames kept alive stay bounded (without it a group kept every frame it sent)."""
        pending = self._pending
        while pending and (len(pending) > MAX_PENDING_SENDS or pending[0].is_completed()):
            self._wait(pending.popleft(), "send", self.timeout)

    def _call(self, op: Callable[[], dist.Work], what: str) -> dist.Work:
        if self._group is None:
            raise StageLinkError(f"epoch {self.epoch}: the link is closed ({what})")
        try:
            return op()
        except RuntimeError as exc:
            raise StageLinkError(f"epoch {self.epoch}, rank {self.rank}: {what} failed (the "
                                 f"peer died or its connection broke): {_first_line(exc)}"
                                 ) from exc

    def _wait(self, work: dist.Work, what: str, timeout: datetime.timedelta) -> None:
        try:
            work.wait(timeout)
        except RuntimeError as exc:
            limit = ("" if timeout == _FOREVER
                     else f" or did not answer within {timeout.total_seconds():g} s")
            raise StageLinkError(
                f"epoch {self.epoch}, rank {self.rank}: waiting for {what} failed (the peer "
                f"died{limit}): {_first_line(exc)}") from exc


@dataclass
class Received:
    """One message's bytes; ``tensor`` takes the tensor sent with it."""

    link: StageLink
    src: int
    data: bytes
    tensor_bytes: int
    _inline: torch.Tensor | None  # (tensor_bytes,) uint8, a view of the frame

    @property
    def tensor_in_frame(self) -> bool:
        return self._inline is not None

    def tensor(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if self._inline is not None:
            return self._inline.view(dtype).view(shape)
        return self.link.recv_tensor(shape, dtype, self.src)


def close_in_background(*links: StageLink | None) -> None:
    """Close links nothing uses any more on a helper thread. Tearing a gloo group down waits
    for its I/O loop to let go of every socket (13-21 ms per group measured here), which a
    restore or a migration must not make every request wait for."""
    open_links = [link for link in links if link is not None]
    if open_links:
        threading.Thread(target=lambda: [link.close() for link in open_links],
                         name="stage-link-close", daemon=True).start()


def frame_bytes_for(hidden_size: int, itemsize: int, tokens: int = 512) -> int:
    """An activation frame that holds a micro-batch message (8 KiB of room) and the hidden
    states of ``tokens`` tokens, so that a decode micro-batch or a prefill chunk of up to that
    many tokens moves in one message (a bigger one sends its hidden states as a second
    message, whose receive is not posted ahead: a round trip more). Only the used bytes of a
    frame travel, so a large frame costs a receive buffer, not bandwidth. At least
    ``FRAME_BYTES``, rounded up to 4 KiB."""
    need = 8 * 1024 + tokens * hidden_size * itemsize
    return max(FRAME_BYTES, -(-need // 4096) * 4096)


def _aligned(n: int) -> int:
    """``n`` rounded up to 8 bytes (a tensor after the message is read in place)."""
    return -(-n // 8) * 8


def _make_group(store: dist.Store, rank: int, size: int, device: torch.device,
                timeout: datetime.timedelta, bind_host: str | None) -> dist.ProcessGroup:
    """Gloo for CPU tensors, NCCL for CUDA tensors; built without the global default group."""
    if device.type == "cuda":
        from torch.distributed import ProcessGroupNCCL  # CUDA builds only

        options = ProcessGroupNCCL.Options()
        options._timeout = timeout
        return ProcessGroupNCCL(store, rank, size, options)
    options = dist.ProcessGroupGloo._Options()
    options._timeout = timeout
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=bind_host)
                        if bind_host else dist.ProcessGroupGloo.create_default_device()]
    return dist.ProcessGroupGloo(store, rank, size, options)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
