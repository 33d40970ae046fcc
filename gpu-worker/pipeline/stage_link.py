"""The point-to-point link between the ranks of one pipeline group, for one topology epoch.

Rendezvous goes through a ``torch.distributed.TCPStore`` whose ``host:port`` the plan carries
(rank 0, the group leader, is its master); the process group is built directly on
``PrefixStore(f"epoch-{epoch}", store)``, never through the global ``init_process_group``, so a
worker can make a new group every epoch of its life and one store can serve many epochs.
Gloo on CPU, NCCL on CUDA (the NCCL path is written, not yet run: no GPU here).

Sends are asynchronous (the link keeps each tensor alive until its send completes), receives
block: a plain-data message is its byte length (int64) then the msgpack bytes (uint8); a
tensor's shape and dtype are known to the receiver from an earlier message. A peer that dies
closes its sockets and the waiting side raises ``StageLinkError`` at once; a peer that hangs
makes it raise after ``timeout_s``. Only waiting for the *next* micro-batch (an idle stage)
uses ``idle_timeout_s`` (default: wait as long as the connection lives).
The link knows nothing about models or scheduling.
"""

from __future__ import annotations

import datetime
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
import torch
import torch.distributed as dist

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

_TAG_LENGTH, _TAG_BYTES, _TAG_TENSOR = 1, 2, 3
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


class StageLink:
    def __init__(self, store: dist.Store, rank: int, size: int, epoch: int, *,
                 timeout_s: float = 60.0, idle_timeout_s: float | None = None,
                 device: torch.device | str = "cpu", bind_host: str | None = None) -> None:
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
        self._pending: list[dist.Work] = []  # sends not known complete (each holds its tensor)

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

    # -- plain data --------------------------------------------------------------------------
    @_detached
    def send_message(self, message: msgspec.Struct, dst: int) -> None:
        self.send_bytes(msgspec.msgpack.encode(message), dst)

    @_detached
    def recv_message(self, kind: type[T], src: int, idle: bool = False) -> T:
        """Receive one message decoded as ``kind`` (a struct or a union of tagged structs);
        ``idle``: the sender may legitimately have nothing to say for a long time."""
        data = self.recv_bytes(src, idle)
        try:
            return msgspec.msgpack.decode(data, type=kind)
        except msgspec.DecodeError as exc:
            raise StageLinkError(f"epoch {self.epoch}: rank {src} sent a message that is not "
                                 f"{kind}: {exc}") from exc

    @_detached
    def send_bytes(self, data: bytes, dst: int) -> None:
        payload = torch.frombuffer(bytearray(data), dtype=torch.uint8)  # (B,)
        self._send(torch.tensor([payload.numel()], dtype=torch.int64), dst, _TAG_LENGTH)
        self._send(payload, dst, _TAG_BYTES)

    @_detached
    def recv_bytes(self, src: int, idle: bool = False) -> bytes:
        length = self._recv(torch.empty(1, dtype=torch.int64), src, _TAG_LENGTH,
                            "a message", self.idle_timeout if idle else self.timeout)
        payload = self._recv(torch.empty(int(length.item()), dtype=torch.uint8), src,
                             _TAG_BYTES, "a message body", self.timeout)  # (B,)
        return payload.cpu().numpy().tobytes()

    # -- tensors -----------------------------------------------------------------------------
    @_detached
    def send_tensor(self, tensor: torch.Tensor, dst: int) -> None:
        self._send(tensor.contiguous(), dst, _TAG_TENSOR)

    @_detached
    def recv_tensor(self, shape: tuple[int, ...], dtype: torch.dtype, src: int) -> torch.Tensor:
        return self._recv(torch.empty(shape, dtype=dtype), src, _TAG_TENSOR,
                          f"a {tuple(shape)} tensor", self.timeout)

    # -- lifetime ----------------------------------------------------------------------------
    @_detached
    def flush(self) -> None:
        """Wait until every send has left (raises if a peer is gone)."""
        pending, self._pending = self._pending, []
        for work in pending:
            self._wait(work, "send", self.timeout)

    def close(self) -> None:
        """Flush (best effort) and tear the group down; the store is the caller's."""
        try:
            self.flush()
        except StageLinkError:
            pass
        self._pending.clear()
        self._group = None

    # -- internals ---------------------------------------------------------------------------
    def _send(self, tensor: torch.Tensor, dst: int, tag: int) -> None:
        tensor = tensor.to(self.device)
        self._pending.append(self._call(lambda: self._group.send([tensor], dst, tag),
                                        f"send to rank {dst}"))
        self._reap()

    def _recv(self, buffer: torch.Tensor, src: int, tag: int, what: str,
              timeout: datetime.timedelta) -> torch.Tensor:
        buffer = buffer.to(self.device)
        work = self._call(lambda: self._group.recv([buffer], src, tag),
                          f"receive from rank {src}")
        self._wait(work, f"{what} from rank {src}", timeout)
        return buffer

    def _reap(self) -> None:
        """Forget completed sends, raising the error of a failed one."""
        still = []
        for work in self._pending:
            if work.is_completed():
                self._wait(work, "send", self.timeout)
            else:
                still.append(work)
        self._pending = still

    def _call(self, op: Callable[[], dist.Work], what: str) -> dist.Work:
        if self._group is None:
            raise StageLinkError(f"epoch {self.epoch}: the link is closed ({what})")
        try:
            return op()
        except RuntimeError as exc:
            raise StageLinkError(f"epoch {self.epoch}, rank {self.rank}: {what} failed: "
                                 f"{_first_line(exc)}") from exc

    def _wait(self, work: dist.Work, what: str, timeout: datetime.timedelta) -> None:
        try:
            work.wait(timeout)
        except RuntimeError as exc:
            limit = ("" if timeout == _FOREVER
                     else f" or did not answer within {timeout.total_seconds():g} s")
            raise StageLinkError(
                f"epoch {self.epoch}, rank {self.rank}: waiting for {what} failed (the peer "
                f"died{limit}): {_first_line(exc)}") from exc


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
